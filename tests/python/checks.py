"""Check results as weir counts them, against DuckDB's count over the same data.

Builds a customers dimension and an orders table with nulls, duplicate ids and orders of
unknown customers; runs them through weir (the checks warn, so the data is published as
staged); then compares `weir checks --json` with DuckDB over the published Parquet.
"""
import json
import os
import pathlib
import random
import subprocess
import tempfile

import duckdb

from report import check, finish

rng = random.Random(7)



weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))

with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    (d / "customers.csv").write_text("customer_id\n" + "".join(f"{i}\n" for i in range(0, 300)))
    lines = ["order_id,customer_id,country"]
    for i in range(5000):
        oid = rng.randrange(4800)  # some ids repeat
        cust = rng.randrange(320)  # some customers do not exist
        country = "" if rng.random() < 0.03 else rng.choice(["DE", "FR", "NL"])
        lines.append(f"{oid},{cust},{country}")
    (d / "orders.csv").write_text("\n".join(lines) + "\n")
    (d / "pipeline.toml").write_text(
        """[pipeline]
name = "checked"
batch_size = 700

[sources.raw_customers]
format = "csv"
path = "customers.csv"

[sources.raw_orders]
format = "csv"
path = "orders.csv"
schema = { order_id = "int64", customer_id = "int64", country = "string" }

[steps.customers]
input = "raw_customers"
output = { path = "out/customers" }

[steps.orders]
input = "raw_orders"
output = { path = "out/orders" }

[[steps.orders.checks]]
check = "not_null"
column = "country"
severity = "warn"

[[steps.orders.checks]]
check = "unique"
column = "order_id"
severity = "warn"

[[steps.orders.checks]]
check = "relationships"
column = "customer_id"
to = { step = "customers", column = "customer_id" }
severity = "warn"
"""
    )
    run = subprocess.run([weir, "run", "pipeline.toml", "--quiet"], cwd=d, env=env)
    check("weir run succeeds with warnings (exit 3)", run.returncode == 3, str(run.returncode))
    out = subprocess.run([weir, "checks", "--pipeline", "pipeline.toml", "--json"], cwd=d, env=env, capture_output=True, text=True)
    counted = {c["check"]: c["failing_rows"] for c in json.loads(out.stdout)}

    con = duckdb.connect()
    orders = f"'{d}/out/orders/*.parquet'"
    nulls = con.execute(f"select count(*) from {orders} where country is null").fetchone()[0]
    dups = con.execute(f"select count(*) - count(distinct order_id) from {orders} where order_id is not null").fetchone()[0]
    misses = con.execute(
        f"select count(*) from {orders} o where customer_id not in (select customer_id from '{d}/out/customers/*.parquet')"
    ).fetchone()[0]
    check("null count agrees with DuckDB", counted.get("not_null(country)") == nulls, f"{counted} vs {nulls}")
    check("duplicate count agrees with DuckDB", counted.get("unique(order_id)") == dups, f"{counted} vs {dups}")
    check("relationship misses agree with DuckDB", counted.get("relationships(customer_id)") == misses, f"{counted} vs {misses}")
    check("the data has all three problems", nulls > 0 and dups > 0 and misses > 0, f"{nulls} {dups} {misses}")

finish("checks")
