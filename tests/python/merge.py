"""`mode = "merge"` and `mode = "append"` on local Parquet datasets, read back by DuckDB and
pyarrow and compared with a Python dictionary that applies the same changes.

Five runs of random upserts, deletes (`delete_when`), keys repeated within a run (the last
wins) and keys that move to another partition; after each run both readers must see exactly
the oracle's rows. Append adds a run's rows, and an identical rerun adds nothing.
"""
import json
import os
import pathlib
import random
import subprocess
import tempfile
import time

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))
for k in ("WEIR_OPENLINEAGE_URL", "WEIR_PUSHGATEWAY_URL"):
    env.pop(k, None)


def run(d, *args):
    return subprocess.run([weir, *args], cwd=d, env=env, capture_output=True, text=True, timeout=300)


def duck_rows(path):
    con = duckdb.connect()
    q = f"select id, day, name, n from read_parquet('{path}/**/*.parquet', hive_partitioning = true) order by id"
    return [(r[0], str(r[1]), r[2], r[3]) for r in con.execute(q).fetchall()]


def arrow_rows(path):
    t = ds.dataset(str(path), format="parquet", partitioning="hive").to_table().to_pylist()
    return sorted((r["id"], str(r["day"]), r["name"], r["n"]) for r in t)


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    (d / "merge.toml").write_text("""[pipeline]
name = "merge"

[sources.changes]
format = "csv"
path = "changes.csv"
schema = { id = "int64", day = "date", name = "string", n = "int64", op = "string" }

[steps.table]
input = "changes"
output = { path = "out/table", partition_by = "day", mode = "merge", key = ["id"], delete_when = { column = "op", value = "d" } }
""")
    rng = random.Random(20261203)
    oracle = {}
    days = ["2026-01-01", "2026-01-02", "2026-01-03"]
    n = 0
    all_ok = True
    for run_no in range(1, 6):
        lines = ["id,day,name,n,op"]
        for _ in range(40):
            n += 1
            key = rng.randint(1, 30)
            if rng.random() < 0.2:
                day = rng.choice(days)
                lines.append(f"{key},{day},gone,{n},d")
                oracle.pop(key, None)
            else:
                day = rng.choice(days)  # a key may move to another day
                name = f"name{key}-{run_no}-{n}"
                lines.append(f"{key},{day},{name},{n},u")
                oracle[key] = (key, day, name, n)
        (d / "changes.csv").write_text("\n".join(lines) + "\n")
        r = run(d, "run", "merge.toml")
        want = sorted(oracle.values())
        got_duck = duck_rows(d / "out/table") if r.returncode == 0 else []
        got_arrow = arrow_rows(d / "out/table") if r.returncode == 0 else []
        ok = r.returncode == 0 and got_duck == want and got_arrow == want
        all_ok &= ok
        check(f"merge run {run_no}: DuckDB and pyarrow read exactly the oracle's {len(want)} rows", ok,
              f"{r.stderr[-800:]}\nwant {want[:4]}\nduck {got_duck[:4]}\narrow {got_arrow[:4]}")
    r = run(d, "run", "merge.toml", "--force")
    check("merging the same changes again changes nothing", r.returncode == 0 and duck_rows(d / "out/table") == sorted(oracle.values()), r.stderr[-500:])
    check("the run says what the merge did", "merges by key" in r.stderr and "published files kept" in r.stderr, r.stderr[-500:])
    bad = (d / "merge.toml").read_text().replace(', key = ["id"]', "")
    (d / "bad.toml").write_text(bad)
    r = run(d, "validate", "bad.toml")
    check("a merge without a key is refused at its line", r.returncode != 0 and "bad.toml:" in r.stderr and "needs a `key`" in r.stderr, r.stderr)
    (d / "bad.toml").write_text((d / "merge.toml").read_text().replace('key = ["id"]', 'key = ["id", "day"]'))
    r = run(d, "validate", "bad.toml")
    check("the partition column cannot be in the key", r.returncode != 0 and "cannot be part of the merge key" in r.stderr, r.stderr)
    (d / "bad.toml").write_text((d / "merge.toml").read_text().replace('key = ["id"]', 'key = ["nope"]'))
    r = run(d, "run", "bad.toml", "--force")
    check("a key column the output lacks fails naming it, publishing nothing",
          r.returncode == 1 and "`nope`" in r.stderr and duck_rows(d / "out/table") == sorted(oracle.values()), r.stderr[-500:])

    # append: each run's rows are added; an identical rerun is up to date, adds nothing
    (d / "append.toml").write_text("""[pipeline]
name = "append"

[sources.events]
format = "csv"
path = "events.csv"
schema = { id = "int64", day = "date", name = "string", n = "int64" }

[steps.log]
input = "events"
output = { path = "out/log", partition_by = "day", mode = "append" }
""")
    (d / "events.csv").write_text("id,day,name,n\n1,2026-01-01,a,1\n2,2026-01-02,b,2\n")
    r1 = run(d, "run", "append.toml")
    (d / "events.csv").write_text("id,day,name,n\n3,2026-01-01,c,3\n1,2026-01-01,a,1\n")
    r2 = run(d, "run", "append.toml")
    r3 = run(d, "run", "append.toml")
    got = duck_rows(d / "out/log")
    check("append adds each run's rows (duplicates included, as appended)",
          r1.returncode == r2.returncode == 0 and got == [(1, "2026-01-01", "a", 1), (1, "2026-01-01", "a", 1), (2, "2026-01-02", "b", 2), (3, "2026-01-01", "c", 3)],
          f"{got} {r2.stderr[-400:]}")
    check("an identical rerun of an append is up to date and adds nothing", r3.returncode == 0 and "up to date" in r3.stderr.lower() and len(duck_rows(d / "out/log")) == 4, r3.stderr[-300:])
    check("pyarrow reads the appended dataset alike", arrow_rows(d / "out/log") == got)

    # file sources by modification time: each run reads the files modified since the last
    land = d / "land"
    land.mkdir()
    (land / "a.csv").write_text("id,v\n1,a\n2,b\n3,c\n")
    old = time.time() - 3600
    os.utime(land / "a.csv", (old, old))
    (d / "files.toml").write_text("""[pipeline]
name = "files"

[sources.landing]
format = "csv"
path = "land/*.csv"
schema = { id = "int64", v = "string" }
incremental = { modified = true }

[steps.t]
input = "landing"
output = { path = "out/files", mode = "merge", key = ["id"] }
""")

    def read_json(r):
        return json.loads(r.stdout)["steps"][0] if r.returncode == 0 else {}

    def files_table():
        return sorted((r["id"], r["v"]) for r in pq.read_table(d / "out/files").to_pylist())

    r = run(d, "run", "files.toml", "--json")
    check("a first run reads every file", read_json(r).get("rows_read") == 3 and files_table() == [(1, "a"), (2, "b"), (3, "c")], r.stderr[-400:])
    (land / "b.csv").write_text("id,v\n3,C\n4,d\n")
    r = run(d, "run", "files.toml", "--json")
    check("the next run reads only the file modified since, merged by key",
          read_json(r).get("rows_read") == 2 and files_table() == [(1, "a"), (2, "b"), (3, "C"), (4, "d")], r.stderr[-400:])
    (land / "a.csv").write_text("id,v\n1,A\n2,b\n3,c\n")
    os.utime(land / "b.csv", (old, old))
    r = run(d, "run", "files.toml", "--json")
    check("a rewritten file is read again", read_json(r).get("rows_read") == 3 and (1, "A") in files_table(), r.stderr[-400:])
    (d / "bad.toml").write_text((d / "files.toml").read_text().replace("{ modified = true }", '{ column = "v" }'))
    r = run(d, "validate", "bad.toml")
    check("a file source is incremental by modification time only", r.returncode != 0 and "modified = true" in r.stderr, r.stderr)
    # a composite key listed in another order than the columns: the published rows' keys must
    # be read in the key's order (they were read in the file's once, and matched nothing)
    ck = d / "composite"
    ck.mkdir()
    (ck / "p.toml").write_text("""[pipeline]
name = "composite"

[sources.in]
format = "csv"
path = "in.csv"
schema = { region = "string", id = "int64", v = "string" }

[steps.t]
input = "in"
output = { path = "out/t", mode = "merge", key = ["id", "region"] }
""")
    (ck / "in.csv").write_text("region,id,v\neu,1,a\nus,1,b\neu,2,c\n")
    r1 = run(ck, "run", "p.toml")
    (ck / "in.csv").write_text("region,id,v\nus,1,B\neu,3,d\n")
    r2 = run(ck, "run", "p.toml")
    got = sorted((x["region"], x["id"], x["v"]) for x in pq.read_table(ck / "out/t").to_pylist()) if r2.returncode == 0 else []
    check("a merge by a composite key listed out of column order replaces the row of that key",
          r1.returncode == 0 and got == [("eu", 1, "a"), ("eu", 2, "c"), ("eu", 3, "d"), ("us", 1, "B")], f"{r2.stderr[-400:]} {got}")

finish("merge")
