"""Delta Lake outputs (`output.format = "delta"`), read back by two independent readers: the
`deltalake` package (delta-rs) and DuckDB's delta extension (delta-kernel-rs), each compared
with the rows a Python oracle expects.

Covers: a first run creating the table, overwrite, overwrite_partitions and append, a
`--partition` run, time travel to earlier versions, schema evolution in the run's commit,
kill -9 before the commit, between linking the files and the commit, and after the commit
before the run store recorded it (then a rerun: every row exactly once), a failed check
(no commit, no files), two writers racing on one table, `weir table history` and `vacuum`,
`weir table optimize`, a corrupt log, types Delta cannot hold, and merge by key: five runs of random upserts, deletes and keys
changing partition against an oracle, a merge over another writer's commit, a merge
killed before its commit, and Debezium change events merged by LSN (`sequence_by`, with
remembered deletes) against an oracle.
"""
import datetime
import json
import os
import pathlib
import random
import site
import subprocess
import tempfile

import deltalake
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import cdcfeed
import weirproc
from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
# RUST_BACKTRACE set: the Delta kernel then attaches backtraces to its errors, which weir
# must not print
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"), RUST_BACKTRACE="1")
for k in ("WEIR_OPENLINEAGE_URL", "WEIR_PUSHGATEWAY_URL", "WEIR_DEBUG_PAUSE"):
    env.pop(k, None)
ext_dir = next(pathlib.Path(p) / "duckdb_ext" / "extensions" for p in site.getsitepackages()
               if (pathlib.Path(p) / "duckdb_ext").is_dir())


def run(d, *args, extra=None):
    return subprocess.run([weir, *args], cwd=d, env=dict(env, **(extra or {})), capture_output=True, text=True, timeout=300)


def duck(path, version=None):
    con = duckdb.connect()
    con.execute(f"SET extension_directory = '{ext_dir}'")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("LOAD delta")
    if version is None:
        q = f"select id, day, name from delta_scan('{path}') order by id"
    else:
        con.execute(f"ATTACH '{path}' AS t (TYPE delta, VERSION {version})")
        q = "select id, day, name from t order by id"
    return [(r[0], str(r[1]), r[2]) for r in con.execute(q).fetchall()]


def delta_rows(path, version=None, cols=("id", "day", "name")):
    t = deltalake.DeltaTable(str(path), version=version).to_pyarrow_table().to_pylist()
    return sorted(tuple(str(r[c]) if c == "day" else r[c] for c in cols) for r in t)


def write_csv(d, rows, extra=None):
    head = "id,day,name" + ("," + extra if extra else "")
    (d / "in.csv").write_text(head + "\n" + "".join(",".join(str(x) for x in r) + "\n" for r in rows))


PIPE = """[pipeline]
name = "{name}"

[sources.in]
format = "csv"
path = "in.csv"
schema = {{ id = "int64", day = "date", name = "string"{extra} }}
schema_change = "evolve"

[steps.load]
input = "in"
output = {{ format = "delta", path = "{path}", partition_by = "day", mode = "{mode}" }}
{checks}"""


def pipeline(d, mode, name="delta", path="out/table", extra="", checks="", file="p.toml"):
    (d / file).write_text(PIPE.format(name=name, path=path, mode=mode, extra=extra, checks=checks))
    return file


def readers_agree(label, path, want, version=None):
    got_delta = delta_rows(path, version)
    got_duck = sorted(duck(path, version))
    check(f"{label}: deltalake reads the oracle's rows", got_delta == sorted(want), f"{got_delta} != {sorted(want)}")
    check(f"{label}: DuckDB's delta extension reads the oracle's rows", got_duck == sorted(want), f"{got_duck} != {sorted(want)}")


def killed_at(d, point, *args):
    return weirproc.killed_at(weir, d, env, point, *args)


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    table = d / "out/table"

    # --- overwrite: the first run creates the table; the next replaces it
    pipeline(d, "overwrite")
    v0 = [(1, "2026-01-01", "a"), (2, "2026-01-02", "b"), (3, "2026-01-02", "c")]
    write_csv(d, v0)
    r = run(d, "run", "p.toml")
    check("a first run creates the Delta table", r.returncode == 0 and (table / "_delta_log").is_dir(), r.stderr[-800:])
    readers_agree("version 0", table, v0)
    log0 = (table / "_delta_log/00000000000000000000.json").read_text()
    check("the commit carries the run's transaction id and file statistics",
          '"txn"' in log0 and '"appId":"weir/delta/load"' in log0 and '\\"numRecords\\":' in log0 and '\\"minValues\\":' in log0,
          log0[:600])
    v1 = [(4, "2026-01-03", "d"), (5, "2026-01-01", "e")]
    write_csv(d, v1)
    r = run(d, "run", "p.toml")
    readers_agree("overwrite replaces the table (version 1)", table, v1)
    check("time travel: deltalake reads version 0 as it was", delta_rows(table, 0) == sorted(v0), str(delta_rows(table, 0)))
    check("time travel: DuckDB reads version 0 as it was", sorted(duck(table, 0)) == sorted(v0), str(duck(table, 0)))
    shown = json.loads(run(d, "runs", "show", "2", "--pipeline", "p.toml", "--json").stdout or "{}")
    actions = [p.get("action") for p in shown.get("published", [])]
    check("weir runs show names the table version the run committed", "committed table version 1" in actions, str(shown)[:600])

    # --- overwrite_partitions: only the partitions the run wrote are replaced
    pipeline(d, "overwrite_partitions")
    v2 = [(6, "2026-01-01", "f"), (7, "2026-01-04", "g")]
    write_csv(d, v2)
    r = run(d, "run", "p.toml")
    want = [(4, "2026-01-03", "d")] + v2
    check("an overwrite_partitions run succeeds", r.returncode == 0, r.stderr[-800:])
    readers_agree("overwrite_partitions keeps the partitions the run did not write", table, want)

    # --- a --partition run of mode overwrite replaces that partition only
    pipeline(d, "overwrite")
    v3 = [(8, "2026-01-04", "h")]
    write_csv(d, v3)
    r = run(d, "run", "p.toml", "--partition", "2026-01-04")
    want = [(4, "2026-01-03", "d"), (6, "2026-01-01", "f"), (8, "2026-01-04", "h")]
    check("a --partition run succeeds", r.returncode == 0, r.stderr[-800:])
    readers_agree("a --partition run replaces the partition it wrote", table, want)

    # --- append, and schema evolution in the same commit
    pipeline(d, "append", extra=', note = "string"')
    write_csv(d, [(9, "2026-01-05", "i", "new")], extra="note")
    r = run(d, "run", "p.toml")
    check("an append run with a new column succeeds", r.returncode == 0, r.stderr[-800:])
    dt = deltalake.DeltaTable(str(table))
    fields = [f.name for f in dt.schema().fields]
    check("the new column is added to the table's schema in the run's commit", fields[-1] == "note" and "note" in fields, str(fields))
    notes = sorted((r["id"], r["note"]) for r in dt.to_pyarrow_table().to_pylist())
    check("older rows read the new column as null, the new row its value",
          notes == [(4, None), (6, None), (8, None), (9, "new")], str(notes))
    want = want + [(9, "2026-01-05", "i")]
    readers_agree("append adds the run's rows", table, want)

    # --- kill -9 around the commit; the next run settles it: every row once
    write_csv(d, [(10, "2026-01-06", "j", "x")], extra="note")
    seen = killed_at(d, "after-decision", "p.toml")
    check("killed after the decision, before the commit: the table is as it was",
          seen and delta_rows(table) == sorted(want), str(delta_rows(table)))
    r = run(d, "run", "p.toml")
    want = want + [(10, "2026-01-06", "j")]
    check("the next run completes the decided commit (once) and finds its input unchanged",
          r.returncode == 0 and "completed" in r.stderr.lower(), r.stderr[-800:])
    readers_agree("after a crash before the commit", table, want)

    write_csv(d, [(11, "2026-01-06", "k", "y")], extra="note")
    seen = killed_at(d, "delta-linked", "p.toml")
    linked = [p for p in table.rglob("*.parquet") if "-r" in p.name]
    check("killed between linking the files and the commit: readers do not see them",
          seen and delta_rows(table) == sorted(want), str(delta_rows(table)))
    r = run(d, "run", "p.toml")
    want = want + [(11, "2026-01-06", "k")]
    check("recovery commits the linked files once", r.returncode == 0, r.stderr[-800:])
    readers_agree("after a crash between link and commit", table, want)

    write_csv(d, [(12, "2026-01-07", "l", "z")], extra="note")
    versions_before = len(deltalake.DeltaTable(str(table)).history())
    seen = killed_at(d, "after-switch", "p.toml")
    versions_mid = len(deltalake.DeltaTable(str(table)).history())
    check("killed after the commit, before the run store recorded it: the commit is there",
          seen and versions_mid == versions_before + 1, f"{versions_before} {versions_mid}")
    r = run(d, "run", "p.toml")
    want = want + [(12, "2026-01-07", "l")]
    check("recovery recognises the commit by its transaction id and does not make it twice",
          r.returncode == 0 and len(deltalake.DeltaTable(str(table)).history()) == versions_mid, r.stderr[-800:])
    readers_agree("after a crash after the commit", table, want)

    # --- a failed check: no commit, no files in the table
    checks = '\n[[steps.load.checks]]\ncheck = "row_count"\nmin = 100\n'
    pipeline(d, "append", extra=', note = "string"', checks=checks)
    write_csv(d, [(13, "2026-01-08", "m", "w")], extra="note")
    files_before = sorted(p.name for p in table.rglob("*.parquet"))
    versions_before = len(deltalake.DeltaTable(str(table)).history())
    r = run(d, "run", "p.toml")
    check("a failed check stops the run", r.returncode != 0 and "row_count" in r.stderr, r.stderr[-500:])
    check("a failed check makes no commit and leaves no file in the table",
          len(deltalake.DeltaTable(str(table)).history()) == versions_before
          and sorted(p.name for p in table.rglob("*.parquet")) == files_before)

    # --- history and vacuum
    h = json.loads(run(d, "table", "history", "out/table", "--json").stdout or "[]")
    check("weir table history lists every version with the run that made it",
          [v["version"] for v in h] == list(range(len(h) - 1, -1, -1)) and all(v["run"] for v in h) and h[0]["pipeline"] == "delta",
          str(h)[:500])
    text = run(d, "table", "history", "out/table").stdout
    check("weir table history as text", "weir run #" in text and "v0" in text, text)
    r = run(d, "table", "vacuum", "out/table", "--retention", "0s", "--dry-run", "--json")
    dry = json.loads(r.stdout or "{}")
    check("vacuum --dry-run lists the replaced files and removes nothing",
          len(dry.get("removed", [])) >= 3 and all((table / f).exists() for f in dry.get("removed", [])), r.stdout + r.stderr)
    r = run(d, "table", "vacuum", "out/table", "--retention", "0s", "--json")
    done = json.loads(r.stdout or "{}")
    check("vacuum removes the files no version references", done.get("removed") == dry.get("removed")
          and not any((table / f).exists() for f in done.get("removed", [])), r.stdout + r.stderr)
    readers_agree("after vacuum the latest version reads the same", table, want)
    r = run(d, "table", "vacuum", "out/table")
    check("vacuum keeps unreferenced files younger than the default retention", r.returncode == 0 and "0 unreferenced" in r.stdout, r.stdout)

    # --- optimize: four appends to one partition (one with a column added) become one file
    o = d / "opt"
    o.mkdir()
    for i in range(4):
        extra = ', note = "string"' if i == 3 else ""
        pipeline(o, "append", name="opt", extra=extra)
        if i == 3:
            write_csv(o, [(100 + i, "2026-05-01", f"o{i}", "late")], extra="note")
        else:
            write_csv(o, [(100 + i, "2026-05-01", f"o{i}"), (200 + i, "2026-05-02", f"p{i}")])
        run(o, "run", "p.toml")
    ot = o / "out/table"
    before_rows = delta_rows(ot)
    before_files = len(list((ot / "day=2026-05-01").glob("*.parquet")))
    versions = len(deltalake.DeltaTable(str(ot)).history())
    r = run(o, "table", "optimize", "out/table", "--partition", "day=2026-05-01", "--json")
    res = json.loads(r.stdout or "{}")
    dt = deltalake.DeltaTable(str(ot))
    live = [f for f in dt.file_uris() if "day=2026-05-01" in f]
    check("optimize compacts one partition's files into one, as one version",
          r.returncode == 0 and before_files == 4 and len(live) == 1 and len(dt.history()) == versions + 1
          and dt.history()[0]["operation"] == "OPTIMIZE" and len([f for f in dt.file_uris() if "day=2026-05-02" in f]) == 3,
          f"{r.stdout} {r.stderr[-400:]} {live}")
    readers_agree("after optimize", ot, before_rows)
    notes = sorted((x["id"], x["note"]) for x in dt.to_pyarrow_table().to_pylist() if str(x["day"]) == "2026-05-01")
    check("a file written before a column was added reads it as null after compaction",
          notes == [(100, None), (101, None), (102, None), (103, "late")], str(notes))
    check("time travel before the compaction still reads the same rows", delta_rows(ot, versions - 1) == before_rows)
    r = run(o, "table", "optimize", "out/table", "--partition", "day=2026-05-01")
    check("optimize with nothing to compact says so", r.returncode == 0 and "nothing to compact" in r.stdout, r.stdout + r.stderr)

    # --- a hostile table: a commit file of garbage, and one of a huge line; weir fails clearly
    hb = d / "hostile"
    hb.mkdir()
    pipeline(hb, "append", name="hostile")
    write_csv(hb, [(1, "2026-06-01", "a")])
    run(hb, "run", "p.toml")
    log = hb / "out/table/_delta_log"
    (log / "00000000000000000001.json").write_text("this is not JSON\n")
    write_csv(hb, [(2, "2026-06-02", "b")])
    r = run(hb, "run", "p.toml")
    check("a corrupt Delta log fails the run with a message naming the table, no panic",
          r.returncode == 1 and "Delta table" in r.stderr and "panicked" not in r.stderr and "out/table" in r.stderr
          and "backtrace" not in r.stderr.lower() and len(r.stderr) < 3000, r.stderr[-600:])
    r = run(hb, "table", "history", "out/table")
    check("weir table history of it does not panic", r.returncode in (0, 1) and "panicked" not in r.stderr, r.stderr[-300:])
    (log / "00000000000000000001.json").write_text('{"commitInfo":{"x":"' + "a" * (8 << 20) + '"}}\n')
    r = run(hb, "run", "p.toml")
    check("a commit with an 8 MiB line does not stop the run", r.returncode == 0 and "panicked" not in r.stderr, r.stderr[-600:])

    # --- two writers on one table: different partitions both commit; one partition: never both
    a, b = d / "a", d / "b"
    for w in (a, b):
        w.mkdir()
    shared = str(d / "shared")
    pipeline(a, "overwrite_partitions", name="writer_a", path=shared)
    pipeline(b, "overwrite_partitions", name="writer_b", path=shared)
    def race(rows_a, rows_b):
        """Run A paused between linking its files and its commit while B runs whole."""
        write_csv(a, rows_a)
        write_csv(b, rows_b)
        p, _ = weirproc.paused(weir, a, env, "delta-linked", 3000, "p.toml")
        rb = run(b, "run", "p.toml")
        rest = p.stderr.read()
        p.wait(timeout=120)
        return p, rb, rest

    p, rb, rest = race([(1, "2026-02-01", "a1")], [(2, "2026-02-02", "b1")])
    check("two writers of different partitions both commit (the later retries on the new version)",
          rb.returncode == 0 and p.returncode == 0 and delta_rows(shared) == [(1, "2026-02-01", "a1"), (2, "2026-02-02", "b1")],
          f"{rb.stderr[-300:]} {rest[-300:]} {delta_rows(shared)}")
    p, rb, _ = race([(3, "2026-02-03", "a2")], [(4, "2026-02-03", "b2")])
    rows = delta_rows(shared)
    day3 = [x for x in rows if x[1] == "2026-02-03"]
    check("two writers of one partition: one's rows, never both", rb.returncode == 0 and p.returncode == 0
          and day3 in ([(3, "2026-02-03", "a2")], [(4, "2026-02-03", "b2")]), str(rows))
    readers_agree("after racing writers", shared, rows)

    # --- what Delta cannot hold is refused before any row is read, naming the column
    bad = d / "bad"
    bad.mkdir()
    (bad / "in.csv").write_text("id,day,name\n1,2026-01-01,a\n")
    pq.write_table(pa.table({"id": pa.array([1], pa.uint32()), "day": ["2026-01-01"], "name": ["a"]}), bad / "u.parquet")
    (bad / "u.toml").write_text("""[pipeline]
name = "unsigned"

[sources.in]
format = "parquet"
path = "u.parquet"

[steps.load]
input = "in"
output = { format = "delta", path = "out/t" }
""")
    r = run(bad, "run", "u.toml")
    check("an unsigned column is refused, naming it and what to do",
          r.returncode != 0 and "`id`" in r.stderr and "unsigned" in r.stderr and not (bad / "out/t/_delta_log").exists(), r.stderr[-500:])
    (bad / "out/x").mkdir(parents=True)
    (bad / "out/x/notes.txt").write_text("mine")
    (bad / "p.toml").write_text(PIPE.format(name="bad", path="out/x", mode="overwrite", extra="", checks=""))
    r = run(bad, "run", "p.toml")
    check("a folder holding other files that is not a Delta table is refused",
          r.returncode != 0 and "not a Delta table" in r.stderr and "notes.txt" in r.stderr,
          r.stderr[-500:])
    # --- merge by key: random upserts, deletes and keys moving partition, five runs, against
    # an oracle; deltalake and DuckDB must read exactly the oracle's rows after each
    m = d / "merge"
    m.mkdir()
    (m / "p.toml").write_text("""[pipeline]
name = "merge"

[sources.in]
format = "csv"
path = "in.csv"
schema = { id = "int64", day = "date", name = "string", op = "string" }

[steps.load]
input = "in"
output = { format = "delta", path = "out/t", partition_by = "day", mode = "merge", key = ["id"], delete_when = { column = "op", value = "d" } }
""")
    rng = random.Random(20261204)
    oracle = {}
    days = ["2026-03-01", "2026-03-02", "2026-03-03"]
    n = 0
    merged_ok = True
    for run_no in range(1, 6):
        lines = ["id,day,name,op"]
        for _ in range(30):
            n += 1
            key = rng.randint(1, 25)
            day = rng.choice(days)
            if rng.random() < 0.2:
                lines.append(f"{key},{day},gone,d")
                oracle.pop(key, None)
            else:
                name = f"n{key}-{run_no}-{n}"
                lines.append(f"{key},{day},{name},u")
                oracle[key] = (key, day, name)
        (m / "in.csv").write_text("\n".join(lines) + "\n")
        r = run(m, "run", "p.toml")
        want = sorted(oracle.values())
        got = (delta_rows(m / "out/t"), sorted(duck(m / "out/t"))) if r.returncode == 0 else ([], [])
        if not (r.returncode == 0 and got[0] == want and got[1] == want):
            merged_ok = False
            check(f"merge run {run_no} matches the oracle", False, f"{r.stderr[-600:]} {got[0][:5]} {want[:5]}")
            break
    check("five merge runs (upserts, deletes, keys changing partition): both readers read the oracle's rows", merged_ok)
    hist = deltalake.DeltaTable(str(m / "out/t")).history()
    check("each merge run is one table version", len(hist) == 5, str(len(hist)))
    # another writer commits after the run decided and before its commit: the merge is
    # computed on the version it commits over, so neither change is lost
    (m / "in.csv").write_text("id,day,name,op\n1,2026-03-01,late,u\n")
    p, _ = weirproc.paused(weir, m, env, "after-decision", 3000, "p.toml")
    deltalake.write_deltalake(str(m / "out/t"), pa.table({"id": pa.array([99], pa.int64()),
                                                         "day": pa.array([datetime.date(2026, 3, 9)], pa.date32()),
                                                         "name": ["other"], "op": ["u"]}), mode="append")
    rest = p.stderr.read()
    p.wait(timeout=120)
    oracle[1] = (1, "2026-03-01", "late")
    oracle[99] = (99, "2026-03-09", "other")
    check("a merge whose table moved after it decided merges on the new version: the other writer's row and the update both land",
          p.returncode == 0 and delta_rows(m / "out/t") == sorted(oracle.values()), f"{rest[-600:]} {delta_rows(m / 'out/t')}")
    readers_agree("after a merge over another writer's commit", m / "out/t", sorted(oracle.values()))
    # kill -9 after the merge's decision; recovery merges it, once
    (m / "in.csv").write_text("id,day,name,op\n2,2026-03-02,again,u\n99,2026-03-09,x,d\n")
    seen = killed_at(m, "delta-linked", "p.toml")
    r = run(m, "run", "p.toml")
    oracle[2] = (2, "2026-03-02", "again")
    oracle.pop(99)
    check("a merge killed before its commit is completed by recovery, once", seen and r.returncode == 0
          and delta_rows(m / "out/t") == sorted(oracle.values()), f"{r.stderr[-600:]} {delta_rows(m / 'out/t')}")
    # a merge passes over the table files whose statistics show they cannot hold its keys
    pr = d / "prune"
    pr.mkdir()
    (pr / "p.toml").write_text((m / "p.toml").read_text().replace('partition_by = "day", ', "").replace('name = "merge"', 'name = "prune"'))
    (pr / "in.csv").write_text("id,day,name,op\n" + "".join(f"{i},2026-03-01,a{i},u\n" for i in range(1, 11)))
    r1 = run(pr, "run", "p.toml")
    (pr / "in.csv").write_text("id,day,name,op\n" + "".join(f"{i},2026-03-01,b{i},u\n" for i in range(100, 111)))
    r2 = run(pr, "run", "p.toml")
    (pr / "in.csv").write_text("id,day,name,op\n105,2026-03-02,changed,u\n")
    r3 = run(pr, "run", "p.toml")
    want = sorted([(i, "2026-03-01", f"a{i}") for i in range(1, 11)]
                  + [(i, "2026-03-01", f"b{i}") for i in range(100, 111) if i != 105] + [(105, "2026-03-02", "changed")])
    check("a merge reads only the files whose key range holds one of its keys (by the add actions' statistics)",
          r1.returncode == 0 and "0 of its 1 file(s) passed over" not in r2.stderr and "1 of its 1 file(s) passed over" in r2.stderr
          and "1 of its 2 file(s) passed over" in r3.stderr, f"{r2.stderr[-500:]} {r3.stderr[-500:]}")
    readers_agree("after merges that passed over files", pr / "out/t", want)
    # a null key: statistics leave nulls out of a file's range, so a run with a null key
    # prunes nothing (the file holding the null and 200 has the range 200..200)
    (pr / "in.csv").write_text("id,day,name,op\n,2026-03-01,n1,u\n200,2026-03-01,x,u\n")
    r4 = run(pr, "run", "p.toml")
    (pr / "in.csv").write_text("id,day,name,op\n,2026-03-01,n2,u\n")
    r5 = run(pr, "run", "p.toml")
    nulls = [(x["id"], str(x["day"]), x["name"]) for x in deltalake.DeltaTable(str(pr / "out/t")).to_pyarrow_table().to_pylist()
             if x["id"] is None]
    check("a merge of a null key replaces the null-keyed row even in a file whose statistics range excludes it",
          r4.returncode == 0 and r5.returncode == 0 and nulls == [(None, "2026-03-01", "n2")], f"{nulls} {r5.stderr[-400:]}")
    # --- change events merged by LSN into a Delta table (sequence_by): random inserts,
    # updates and deletes as Debezium events, shuffled within a window, some held back a run,
    # some replayed; after each run both readers must read, per key, the latest event
    # delivered so far (absent when it is a delete), and replaying everything changes nothing
    c = d / "cdc"
    c.mkdir()
    (c / "p.toml").write_text("""[pipeline]
name = "cdc"

[sources.changes]
format = "debezium"
path = "changes.json"
schema = { id = "int64", day = "date", name = "string" }

[steps.mirror]
input = "changes"
output = { format = "delta", path = "out/t", partition_by = "day", mode = "merge", key = ["id"], delete_when = { column = "_op", value = "d" }, sequence_by = "_lsn" }
""")
    rng = random.Random(4242)
    epoch = datetime.date(1970, 1, 1)
    events, live, lsn = [], {}, 1000

    def event(op, key, image):
        global lsn
        lsn += rng.randint(1, 50)
        after = None if op == "d" else {"id": key, "day": (image[1] - epoch).days, "name": image[2]}
        before = {"id": key, "day": None, "name": None} if op != "c" else None
        return {"payload": {"op": op, "before": before, "after": after, "source": {"lsn": lsn}, "ts_ms": 0}}

    for i in range(1, 16):
        live[i] = (i, datetime.date(2026, 5, 1 + i % 3), f"s{i}")
        events.append(event("r", i, live[i]))
    next_id = 16
    for _ in range(150):
        roll = rng.random()
        if roll < 0.3 or not live:
            i, next_id = next_id, next_id + 1
            live[i] = (i, datetime.date(2026, 5, 1 + rng.randint(0, 3)), f"c{i}")
            events.append(event("c", i, live[i]))
        elif roll < 0.8:
            i = rng.choice(sorted(live))
            live[i] = (i, datetime.date(2026, 5, 1 + rng.randint(0, 3)), f"u{rng.randint(0, 999)}")
            events.append(event("u", i, live[i]))
        else:
            i = rng.choice(sorted(live))
            events.append(event("d", i, None))
            del live[i]

    def latest(delivered):
        best = {}
        for e in delivered:
            p = e["payload"]
            key = (p["after"] or p["before"])["id"]
            if key not in best or best[key]["source"]["lsn"] < p["source"]["lsn"]:
                best[key] = p
        return sorted((k, str(epoch + datetime.timedelta(days=p["after"]["day"])), p["after"]["name"])
                      for k, p in best.items() if p["op"] != "d")

    delivered, cdc_ok = [], True
    for n, batch in enumerate(cdcfeed.batches(events, rng)):
        delivered += [e for e in batch if e not in delivered]
        (c / "changes.json").write_text("".join(json.dumps(e) + "\n" for e in batch))
        r = run(c, "run", "p.toml")
        want = latest(delivered)
        got = (delta_rows(c / "out/t"), sorted(duck(c / "out/t"))) if r.returncode == 0 else ([], [])
        if not (r.returncode == 0 and got[0] == want and got[1] == want):
            cdc_ok = False
            check(f"CDC run {n + 1} into Delta matches the oracle", False, f"{r.stderr[-800:]} {got[0][:4]} {want[:4]}")
            break
    want = latest(events)
    check("Debezium events (snapshot, inserts, updates, deletes; shuffled, late, replayed) merged by LSN into a Delta table: "
          "both readers read the latest event of each key", cdc_ok and delta_rows(c / "out/t") == want,
          f"{len(delta_rows(c / 'out/t'))} rows vs {len(want)}")
    tomb = sorted((c / "out/t/_weir_tombstones").glob("*.arrow"))
    check("the deletes are remembered in the table's _weir_tombstones folder, one file per merge that changed them",
          len(tomb) == 3, str(tomb))
    (c / "changes.json").write_text("".join(json.dumps(e) + "\n" for e in reversed(events)))
    r = run(c, "run", "p.toml")
    check("replaying every event (in reverse order) into the Delta table changes nothing",
          r.returncode == 0 and delta_rows(c / "out/t") == want and sorted(duck(c / "out/t")) == want
          and "were older (sequence_by)" in r.stderr, r.stderr[-800:])
    r = run(c, "table", "vacuum", "out/t", "--retention", "0s", "--json")
    left = sorted(p.name for p in (c / "out/t/_weir_tombstones").glob("*.arrow"))
    removed = json.loads(r.stdout).get("removed", []) if r.returncode == 0 else []
    check("weir table vacuum removes the remembered deletes no merge names any more and keeps the current file",
          r.returncode == 0 and len(left) == 1 and sum("_weir_tombstones/" in x for x in removed) >= 2, f"{r.stdout[-400:]} {left}")
    # a delete replayed against a table that holds a newer row keeps the row; a row older than
    # a remembered delete does not bring the key back (after the vacuum: the current file is read)
    gone = next(e for e in reversed(events) if e["payload"]["op"] == "d")
    gone_id = gone["payload"]["before"]["id"]
    old = dict(gone["payload"], op="u", after={"id": gone_id, "day": 20000, "name": "zombie"},
               source={"lsn": gone["payload"]["source"]["lsn"] - 1})
    (c / "changes.json").write_text(json.dumps({"payload": old}) + "\n")
    r = run(c, "run", "p.toml")
    check("an update older than the key's remembered delete does not bring the row back",
          r.returncode == 0 and delta_rows(c / "out/t") == want, r.stderr[-600:])
    last_commit = sorted((c / "out/t/_delta_log").glob("*.json"))[-1].read_text()
    txns = [json.loads(x)["txn"] for x in last_commit.splitlines() if '"txn"' in x]
    check("a merge that leaves the remembered deletes as they are records their txn again (a table may expire txns)",
          any(t["appId"].startswith("weir-tombstones/") for t in txns), str(txns))
    (c / "out/t/_weir_tombstones").rename(c / "out/t/_moved")
    r = run(c, "run", "p.toml", "--force")
    (c / "out/t/_moved").rename(c / "out/t/_weir_tombstones")
    check("remembered deletes removed by hand fail the merge, saying why, instead of resurrecting rows",
          r.returncode != 0 and "remembered deletes" in r.stderr and delta_rows(c / "out/t") == want, r.stderr[-600:])
    # a current file of remembered deletes that is not Arrow IPC (damaged by hand): the merge
    # fails naming it, without a panic and without a commit
    current = sorted((c / "out/t/_weir_tombstones").glob("*.arrow"))[-1]
    saved = current.read_bytes()
    current.write_bytes(b"\x00garbage" * 1000)
    versions = len(deltalake.DeltaTable(str(c / "out/t")).history())
    r = run(c, "run", "p.toml", "--force")
    current.write_bytes(saved)
    check("a damaged file of remembered deletes fails the merge naming it, and commits nothing",
          r.returncode != 0 and current.name in r.stderr and "panicked" not in r.stderr
          and len(deltalake.DeltaTable(str(c / "out/t")).history()) == versions, r.stderr[-600:])

finish("delta")
