#!/usr/bin/env bash
# Build the first-party plugins (and the hostile test fixture) as wasm32-wasip2 components
# and copy them to dist/plugins/<name>.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "==> rustup target add wasm32-wasip2"
  rustup target add wasm32-wasip2
fi
plugins=(mask dedup cast aggregate filter formats hostile hostile-rule hostile-extractor http-json)
# cast carries the time zone database (arrow's chrono-tz feature); built in one cargo call
# with the others, the feature would reach them all and add about 0.9 MB to each
args=()
for p in "${plugins[@]}"; do [ "$p" = cast ] || args+=(-p "weir-plugin-$p"); done
echo "==> building plugins: ${plugins[*]} (and the benchmark's per-record transform)"
cargo build --release --target wasm32-wasip2 "${args[@]}" -p weir-bench-record
cargo build --release --target wasm32-wasip2 -p weir-plugin-cast
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p dist/plugins
for p in "${plugins[@]}"; do
  cp "$target_dir/wasm32-wasip2/release/weir_plugin_${p//-/_}.wasm" "dist/plugins/$p.wasm"
done
mkdir -p dist/bench
cp "$target_dir/wasm32-wasip2/release/weir_bench_record.wasm" dist/bench/record.wasm
ls -l dist/plugins dist/bench
