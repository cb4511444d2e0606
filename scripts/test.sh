#!/usr/bin/env bash
# Quickstart, part 2: the whole test suite.
#   lint (fmt, clippy for host and wasm), plugins built for wasm32-wasip2, unit tests of
#   every crate (plugins run natively through the SDK harness), end-to-end tests of the
#   `weir` binary (example, hostile plugins, config and input errors, crash recovery,
#   backfills, quality gates), the example's output read back by DuckDB, pyarrow and Polars,
#   and check results compared with DuckDB's counts.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

echo "==> cargo fmt --check"
cargo fmt --all -- --check

./scripts/build-plugins.sh

echo "==> clippy (host, wasm32-wasip2)"
cargo clippy --release --workspace --all-targets -- -D warnings
cargo clippy --release --target wasm32-wasip2 -p weir-sdk -p weir-plugin-mask -p weir-plugin-dedup \
  -p weir-plugin-cast -p weir-plugin-aggregate -p weir-plugin-hostile -p weir-plugin-formats -p weir-plugin-filter \
  -p weir-plugin-hostile-rule -p weir-plugin-http-json -p weir-plugin-hostile-extractor -p weir-bench-record -- -D warnings

echo "==> building weir"
cargo build --release -p weir

echo "==> cargo test"
cargo test --release --workspace

echo "==> reading the example's output with DuckDB, pyarrow and Polars"
py=$(./scripts/python-env.sh)
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
WEIR_BIN="$target_dir/release/weir" "$py" tests/python/readers.py
echo "==> merge and append outputs, read back by DuckDB and pyarrow against an oracle"
WEIR_BIN="$target_dir/release/weir" "$py" tests/python/merge.py
echo "==> Delta tables, read back by the deltalake package and DuckDB's delta extension"
WEIR_BIN="$target_dir/release/weir" "$(./scripts/python-env.sh delta)" tests/python/delta.py
echo "==> Delta tables on S3-compatible storage (a private moto server), read back by deltalake"
WEIR_BIN="$target_dir/release/weir" "$(./scripts/python-env.sh delta)" tests/python/s3.py
echo "==> text sources (dialects, encodings, compression) against pyarrow and DuckDB"
WEIR_BIN="$target_dir/release/weir" "$py" tests/python/sources.py
echo "==> check results against DuckDB"
WEIR_BIN="$target_dir/release/weir" "$py" tests/python/checks.py
echo "==> OpenLineage events against the official JSON Schemas; metrics through a real Pushgateway and Prometheus"
./scripts/install-services.sh
WEIR_BIN="$target_dir/release/weir" "$py" tests/python/observe.py
echo "==> a PostgreSQL source against a private PostgreSQL server, compared with psql value by value"
WEIR_DELTA_PYTHON="$(./scripts/python-env.sh delta)" WEIR_BIN="$target_dir/release/weir" "$py" tests/python/postgres.py
echo "==> extractor plugins and grants (a local HTTP API)"
WEIR_BIN="$target_dir/release/weir" "$py" tests/python/extract.py
echo "==> weir serve: every endpoint over HTTP, its OpenAPI document, Prometheus scraping /metrics, kill -9 and restart"
WEIR_BIN="$target_dir/release/weir" "$py" tests/python/serve.py

echo "==> benchmark harness at its smallest scale: every runner's output equals native's"
cargo build --release -p weir-bench
WEIR_PYTHON="$py" "$target_dir/release/weir-bench" run --rows 3000 --check-only --dir "$target_dir/bench-check"
echo "==> the same for W1 with every runner writing snappy (weir-bench --compression)"
WEIR_PYTHON="$py" "$target_dir/release/weir-bench" run --rows 3000 --check-only --workloads W1 \
  --compression snappy --dir "$target_dir/bench-check"
if "$target_dir/release/weir-bench" run --compression 'zstd(30)' 2>"$target_dir/bench-check/err"; then
  echo "weir-bench accepted zstd(30)"; exit 1
fi
grep -q 'use zstd(N) with N from 1 to 22, snappy or none' "$target_dir/bench-check/err"
