#!/usr/bin/env bash
# Prints the path of a Python with duckdb, pyarrow, polars, pandas, fastavro, jsonschema and openapi-spec-validator, creating a virtualenv for them
# if needed ($WEIR_VENV, default ~/.cache/weir/venv, shared across clones).
set -euo pipefail
venv="${WEIR_VENV:-$HOME/.cache/weir/venv}"
if ! "$venv/bin/python" -c 'import duckdb, pyarrow, polars, pandas, fastavro, jsonschema, referencing, rfc3339_validator, rfc3986_validator, openapi_spec_validator' >/dev/null 2>&1; then
  echo "==> installing duckdb, pyarrow, polars, pandas, fastavro, jsonschema into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check duckdb pyarrow polars pandas fastavro 'jsonschema[format-nongpl]' openapi-spec-validator >&2
fi
echo "$venv/bin/python"
