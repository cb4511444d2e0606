#!/usr/bin/env bash
# Prints the path of a Python for the tests, creating its virtualenv if needed (shared across
# clones):
#   scripts/python-env.sh        duckdb, pyarrow, polars, pandas, fastavro, jsonschema and
#                                openapi-spec-validator ($WEIR_VENV, default ~/.cache/weir/venv)
#   scripts/python-env.sh delta  the Delta Lake readers: the `deltalake` package and DuckDB
#                                1.4.4 with its delta extension from PyPI (DuckDB's own
#                                `INSTALL delta` downloads, which this machine cannot), pyarrow
#                                (and moto's S3 server for the object-storage tests)
#                                ($WEIR_DELTA_VENV, default ~/.cache/weir/venv-delta)
set -euo pipefail
if [ "${1:-}" = "delta" ]; then
  venv="${WEIR_DELTA_VENV:-$HOME/.cache/weir/venv-delta}"
  if ! "$venv/bin/python" -c 'import deltalake, duckdb, pyarrow, moto.server, boto3, importlib.util as u; assert duckdb.__version__ == "1.4.4"; assert u.find_spec("duckdb_ext") is not None' >/dev/null 2>&1; then
    echo "==> installing deltalake, duckdb 1.4.4 and its delta extension, pyarrow into $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check deltalake 'duckdb==1.4.4' duckdb-ext-delta pyarrow 'moto[server]' >&2
  fi
  echo "$venv/bin/python"
  exit 0
fi
venv="${WEIR_VENV:-$HOME/.cache/weir/venv}"
if ! "$venv/bin/python" -c 'import duckdb, pyarrow, polars, pandas, fastavro, jsonschema, referencing, rfc3339_validator, rfc3986_validator, openapi_spec_validator' >/dev/null 2>&1; then
  echo "==> installing duckdb, pyarrow, polars, pandas, fastavro, jsonschema into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check duckdb pyarrow polars pandas fastavro 'jsonschema[format-nongpl]' openapi-spec-validator >&2
fi
echo "$venv/bin/python"
