#!/usr/bin/env bash
# Quickstart, part 1: build weir and its plugins, run the orders example, query the output.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-plugins.sh
echo "==> building weir (release)"
cargo build --release -p weir
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
weir="$target_dir/release/weir"
echo "==> weir validate examples/orders/pipeline.toml"
"$weir" validate examples/orders/pipeline.toml
echo "==> weir run examples/orders/pipeline.toml"
# exit code 3: success with warnings (the example has a few orders without a country)
"$weir" run examples/orders/pipeline.toml || [ $? -eq 3 ]
echo "==> weir checks"
"$weir" checks --pipeline examples/orders/pipeline.toml --run "$("$weir" runs --pipeline examples/orders/pipeline.toml --limit 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')"
echo "==> querying the output with DuckDB"
py=$(./scripts/python-env.sh)
"$py" - <<'PY'
import duckdb
con = duckdb.connect()
print(con.sql("""
    select order_date, count(*) as orders, count(distinct order_id) as distinct_ids,
           round(sum(amount), 2) as revenue
    from read_parquet('examples/orders/out/stg_orders/**/*.parquet', hive_partitioning = true)
    group by order_date order by order_date"""))
print(con.sql("""
    select day, country, order_count, round(revenue, 2) as revenue
    from 'examples/orders/out/mart_revenue_daily/*.parquet'
    order by revenue desc limit 5"""))
PY
echo "weir binary: $weir   (outputs: examples/orders/out/)"
