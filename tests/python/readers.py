"""The example's output, as the tools our users query with see it.

Runs the orders example (with the weir binary in $WEIR_BIN) in a temporary copy, then reads
both datasets with DuckDB, pyarrow and Polars and checks they agree with each other and
with the input: one row per order, no raw email, revenue equal to a direct sum.
"""
import csv
import os
import pathlib
import shutil
import subprocess
import tempfile

import duckdb
import polars as pl
import pyarrow.dataset as ds

from report import check, finish

root = pathlib.Path(__file__).resolve().parents[2]



with tempfile.TemporaryDirectory() as tmp:
    ex = pathlib.Path(tmp) / "orders"
    shutil.copytree(root / "examples/orders", ex, ignore=shutil.ignore_patterns("out"))
    text = (ex / "pipeline.toml").read_text().replace("../../dist/plugins", str(root / "dist/plugins"))
    (ex / "pipeline.toml").write_text(text)
    env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))
    code = subprocess.run([os.environ["WEIR_BIN"], "run", "pipeline.toml", "--quiet"], cwd=ex, env=env).returncode
    check("weir run: success with the example's one warning (exit 3)", code == 3, str(code))

    # the input, read directly: latest version of each well-formed order
    latest, emails = {}, set()
    for f in sorted((ex / "data").glob("*.csv")):
        for r in list(csv.reader(f.open()))[1:]:
            if len(r) != 7:
                continue
            try:
                amount = float(r[3])
            except ValueError:
                continue
            emails.add(r[1])
            oid = int(r[0])
            if oid not in latest or latest[oid][1] <= r[6]:
                latest[oid] = (amount, r[6])
    # orders whose latest amount is negative are quarantined by the example's range check
    quarantined = {oid for oid, (a, _) in latest.items() if a < 0}
    latest = {oid: v for oid, v in latest.items() if oid not in quarantined}
    direct_revenue = sum(a for a, _ in latest.values())

    stg = str(ex / "out/stg_orders")
    mart = str(ex / "out/mart_revenue_daily")
    con = duckdb.connect()
    d_rows, d_ids = con.execute(f"select count(*), count(distinct order_id) from read_parquet('{stg}/**/*.parquet', hive_partitioning=true)").fetchone()
    check("duckdb: one row per order", d_rows == d_ids == len(latest), f"{d_rows} {d_ids} {len(latest)}")
    leaked = con.execute(f"select count(*) from read_parquet('{stg}/**/*.parquet', hive_partitioning=true) where email_hash like '%@%' or length(email_hash) <> 64").fetchone()[0]
    check("duckdb: every email masked", leaked == 0, str(leaked))
    days = con.execute(f"select count(distinct order_date) from read_parquet('{stg}/**/*.parquet', hive_partitioning=true)").fetchone()[0]
    check("duckdb: seven order_date partitions", days == 7, str(days))
    d_rev = con.execute(f"select sum(revenue) from '{mart}/*.parquet'").fetchone()[0]
    check("duckdb: mart revenue equals the input", abs(d_rev - direct_revenue) < 1e-6, f"{d_rev} {direct_revenue}")

    q = con.execute(f"select count(*), min(_weir_check) from read_parquet('{ex}/out/stg_orders_quarantine/**/*.parquet', hive_partitioning=true)").fetchone()
    check("duckdb: quarantine holds the negative amounts", q == (len(quarantined), "range(amount)"), str(q))

    t = ds.dataset(stg, format="parquet", partitioning="hive").to_table()
    check("pyarrow: same rows as duckdb", t.num_rows == d_rows, str(t.num_rows))
    hashes = t.column("email_hash").to_pylist()
    check("pyarrow: no input email in any value", not (set(hashes) & emails))

    p = pl.scan_parquet(f"{stg}/**/*.parquet", hive_partitioning=True).collect()
    check("polars: same rows as duckdb", p.height == d_rows, str(p.height))
    m = pl.read_parquet(f"{mart}/*.parquet")
    check("polars: mart columns", m.columns == ["day", "country", "order_count", "revenue"], str(m.columns))
    check("polars: mart revenue equals the input", abs(m["revenue"].sum() - direct_revenue) < 1e-6)

finish("readers")
