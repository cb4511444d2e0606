"""Delta tables on S3-compatible storage: moto's S3 server (moto[server] from PyPI) on a free
127.0.0.1 port, started here and stopped by its pid; weir writes `s3://weir-test/...` and the
`deltalake` package reads the table back through the same endpoint.

Covers: a first run creating the table and a second adding partitions, credentials from
[secrets] files, a file larger than one upload part (multipart), kill -9 after the upload
and before the commit, and after the commit before the run store recorded it (a rerun: every
row exactly once, no version twice), a failed check (nothing uploaded), a bucket that does
not exist, merge by key (and by sequence, with remembered deletes), `weir table history|vacuum|optimize` on the bucket, CSV sources read from the bucket (new, changed, deleted objects; up to date; a
partition run), a Parquet folder on S3 published through its pointer (a reader polling while weir
republishes sees whole runs only; kill -9 around the pointer, vacuum of what it no longer lists), what is refused at validation,
and the examples/delta-lake pipeline.
"""
import datetime
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import threading

import boto3
import deltalake
import pyarrow as pa

from netutil import free_port, wait_until
import weirproc
from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))
for k in ("WEIR_OPENLINEAGE_URL", "WEIR_PUSHGATEWAY_URL", "WEIR_DEBUG_PAUSE", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
    env.pop(k, None)
env.update(AWS_ACCESS_KEY_ID="from-the-environment", AWS_SECRET_ACCESS_KEY="unused", AWS_REGION="us-east-1",
           AWS_EC2_METADATA_DISABLED="true")


def run(d, *args, extra=None):
    return subprocess.run([weir, *args], cwd=d, env=dict(env, **(extra or {})), capture_output=True, text=True, timeout=300)


def killed_at(d, point, *args):
    return weirproc.killed_at(weir, d, env, point, *args)


PIPE = """[pipeline]
name = "s3"

[secrets]
s3_key = {{ file = "secrets/key_id" }}
s3_secret = {{ file = "secrets/secret" }}

[sources.in]
format = "csv"
path = "in.csv"
schema = {{ id = "int64", day = "date", name = "string" }}

[steps.load]
input = "in"
output = {{ format = "delta", path = "{path}", partition_by = "day", mode = "{mode}",
           storage = {{ endpoint = "{endpoint}", region = "us-east-1", path_style = true, allow_http = true,
                       access_key_id = "s3_key", secret_access_key = "s3_secret" }} }}
{checks}"""

with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (d / "moto.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=log)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")

        def ready():
            try:
                s3.list_buckets()
                return True
            except Exception:
                return False

        wait_until("moto's S3 server", ready)
        s3.create_bucket(Bucket="weir-test")
        (d / "secrets").mkdir()
        (d / "secrets/key_id").write_text("weir-test-key\n")
        (d / "secrets/secret").write_text("weir-test-secret\n")
        url = "s3://weir-test/tables/events"
        opts = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "k",
                "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}

        def table(version=None, at=url):
            return deltalake.DeltaTable(at, storage_options=opts, version=version)

        def rows(version=None, at=url):
            return sorted((r["id"], str(r["day"]), r["name"]) for r in table(version, at).to_pyarrow_table().to_pylist())

        def keys():
            out = s3.list_objects_v2(Bucket="weir-test", Prefix="tables/events/")
            return sorted(o["Key"] for o in out.get("Contents", []))

        def pipeline(mode="overwrite_partitions", path=url, checks=""):
            (d / "p.toml").write_text(PIPE.format(path=path, mode=mode, endpoint=endpoint, checks=checks))

        def write_csv(rs):
            (d / "in.csv").write_text("id,day,name\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rs))

        pipeline()
        want = [(1, "2026-04-01", "a"), (2, "2026-04-02", "b")]
        write_csv(want)
        r = run(d, "run", "p.toml")
        check("a first run creates the Delta table on S3", r.returncode == 0, r.stderr[-800:])
        check("deltalake reads it back through the S3 endpoint", r.returncode == 0 and rows() == want, str(rows() if r.returncode == 0 else ""))
        check("the local staging is gone; the table is only on S3", not any((d / ".weir/remote").rglob("*.parquet")),
              str(list((d / ".weir/remote").rglob("*"))))

        more = [(3, "2026-04-03", "c"), (4, "2026-04-02", "d")]
        write_csv(more)
        r = run(d, "run", "p.toml", extra={"WEIR_OPENLINEAGE_URL": f"file://{d}/lineage.jsonl"})
        events = [json.loads(x) for x in (d / "lineage.jsonl").read_text().splitlines()] if (d / "lineage.jsonl").exists() else []
        outs = [(o["namespace"], o["name"]) for e in events for o in e.get("outputs", [])]
        check("OpenLineage names the S3 table as the conventions say (s3://BUCKET, the key prefix)",
              ("s3://weir-test", "tables/events") in outs, str(outs))
        want = [(1, "2026-04-01", "a")] + more
        check("overwrite_partitions on S3 replaces the partitions written", r.returncode == 0 and rows() == sorted(want), r.stderr[-800:])
        check("time travel reads version 0", rows(0) == [(1, "2026-04-01", "a"), (2, "2026-04-02", "b")], str(rows(0)))

        # a file larger than one upload part (16 MiB) goes up in parts
        rng = random.Random(7)
        big = [(100 + i, "2026-04-05", "%064x" % rng.getrandbits(256)) for i in range(520_000)]
        write_csv(big)
        r = run(d, "run", "p.toml")
        sizes = [o["Size"] for o in s3.list_objects_v2(Bucket="weir-test", Prefix="tables/events/day=2026-04-05/").get("Contents", [])]
        check("a file larger than one part is uploaded whole (multipart)", r.returncode == 0 and max(sizes, default=0) > 16 << 20
              and len(table().to_pyarrow_table(filters=[("day", "=", datetime.date(2026, 4, 5))])) == 520_000, f"{sizes} {r.stderr[-500:]}")
        want = want + big

        # kill -9 after the files are uploaded, before the commit: readers see the old version
        write_csv([(5, "2026-04-04", "e")])
        versions = len(table().history())
        seen = killed_at(d, "delta-linked", "p.toml")
        check("killed after the upload, before the commit: no new version, the uploaded file unreferenced",
              seen and len(table().history()) == versions and rows() == sorted(want), str(len(table().history())))
        r = run(d, "run", "p.toml")
        want = want + [(5, "2026-04-04", "e")]
        check("the next run commits it once", r.returncode == 0 and rows() == sorted(want) and len(table().history()) == versions + 1,
              r.stderr[-800:])

        # kill -9 after the commit, before the run store recorded it
        write_csv([(6, "2026-04-06", "f")])
        versions = len(table().history())
        seen = killed_at(d, "after-switch", "p.toml")
        check("killed after the commit: the commit is on S3", seen and len(table().history()) == versions + 1)
        r = run(d, "run", "p.toml")
        want = want + [(6, "2026-04-06", "f")]
        check("recovery recognises the commit by its transaction id: no second version, every row once",
              r.returncode == 0 and len(table().history()) == versions + 1 and rows() == sorted(want), r.stderr[-800:])

        # a failed check uploads nothing
        before = keys()
        pipeline(checks='\n[[steps.load.checks]]\ncheck = "row_count"\nmin = 100\n')
        write_csv([(7, "2026-04-07", "g")])
        r = run(d, "run", "p.toml")
        check("a failed check uploads nothing and commits nothing", r.returncode != 0 and keys() == before, r.stderr[-400:])

        # history and vacuum of the S3 table, through the AWS environment
        awsenv = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
        r = run(d, "table", "history", url, "--json", extra=awsenv)
        h = json.loads(r.stdout or "[]")
        check("weir table history reads an S3 table's versions and the runs that made them",
              r.returncode == 0 and len(h) == len(table().history()) and all(v["run"] for v in h), r.stderr[-400:])
        r = run(d, "table", "vacuum", url, "--retention", "0s", "--dry-run", "--json", extra=awsenv)
        dry = json.loads(r.stdout or "{}").get("removed", [])
        before_keys = keys()
        r = run(d, "table", "vacuum", url, "--retention", "0s", "--json", extra=awsenv)
        gone = json.loads(r.stdout or "{}").get("removed", [])
        check("weir table vacuum removes the replaced files from the bucket, and readers read the same",
              r.returncode == 0 and len(dry) >= 1 and gone == dry and all(f"tables/events/{g}" not in keys() for g in gone)
              and len(keys()) == len(before_keys) - len(gone) and rows() == sorted(want), f"{dry} {gone} {r.stderr[-300:]}")

        # optimize on S3: two appends leave a partition with several small files; the
        # compaction downloads them, uploads one file and commits it without changing the rows
        pipeline(mode="append")
        for row in [(9, "2026-04-01", "i"), (10, "2026-04-01", "j")]:
            write_csv([row])
            r = run(d, "run", "p.toml")
            want.append(row)
        day_files = [f for f in table().file_uris() if "day=2026-04-01" in f]
        versions = len(table().history())
        r = run(d, "table", "optimize", url, "--partition", "day=2026-04-01", "--json", extra=awsenv)
        o = json.loads(r.stdout or "{}")
        after = [f for f in table().file_uris() if "day=2026-04-01" in f]
        check("weir table optimize compacts a partition of an S3 table into one file, one version, same rows",
              r.returncode == 0 and len(day_files) >= 2 and len(after) == 1 and len(table().history()) == versions + 1
              and rows() == sorted(want) and o.get("rows", 0) >= 3, f"{day_files} {after} {r.stderr[-400:]}")

        # --- a Parquet folder on S3: uploads under the run's own prefix, then one conditional
        # replacement of the pointer; a reader polling while weir republishes never sees a mix
        folder = "s3://weir-test/folders/events"

        def folder_pipeline(mode="overwrite"):
            pipeline(mode=mode, path=folder)
            (d / "p.toml").write_text((d / "p.toml").read_text().replace('format = "delta", ', ""))

        def read_folder():
            import io
            import pyarrow.parquet as pq
            try:
                ptr = json.loads(s3.get_object(Bucket="weir-test", Key="folders/events/_weir/CURRENT.json")["Body"].read())
            except s3.exceptions.NoSuchKey:
                return None
            tables = []
            for f in ptr["files"]:
                body = s3.get_object(Bucket="weir-test", Key="folders/events/" + f["path"])["Body"].read()
                t = pq.read_table(io.BytesIO(body))
                if f["partition"]:
                    col, val = f["partition"].split("=", 1)
                    t = t.append_column(col, pa.array([val] * t.num_rows))
                tables.append(t)
            return ptr, (pa.concat_tables(tables, promote_options="default") if tables else None)

        folder_pipeline()
        write_csv([(1, "2026-04-01", "g0"), (2, "2026-04-02", "g0")])
        r = run(d, "run", "p.toml")
        got = read_folder()
        check("a Parquet folder on S3: the pointer lists the run's files, which read back as the rows",
              r.returncode == 0 and got and sorted(got[1]["id"].to_pylist()) == [1, 2], r.stderr[-600:])
        expected = {"g0": 2}
        seen, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                got = read_folder()
                if got and got[1] is not None:
                    seen.append((set(got[1]["name"].to_pylist()), got[1].num_rows))

        poller = threading.Thread(target=poll)
        poller.start()
        ok_runs = True
        for g in range(1, 5):
            n = 50 * g
            expected[f"g{g}"] = n
            write_csv([(i, f"2026-04-0{1 + i % 3}", f"g{g}") for i in range(n)])
            ok_runs &= run(d, "run", "p.toml").returncode == 0
        stop.set()
        poller.join()
        mixed = [s for s in seen if len(s[0]) != 1 or expected.get(next(iter(s[0]))) != s[1]]
        check("a reader polling while weir republishes four times sees whole runs only",
              ok_runs and len(seen) >= 5 and not mixed and len({next(iter(s[0])) for s in seen}) >= 2,
              f"{len(seen)} reads, {mixed[:3]}")
        folder_pipeline("overwrite_partitions")
        write_csv([(900, "2026-04-01", "late")])
        r = run(d, "run", "p.toml")
        got = read_folder()
        days = sorted(set(got[1]["day"].to_pylist())) if got else []
        check("overwrite_partitions on a folder keeps the other partitions' files",
              r.returncode == 0 and days == ["2026-04-01", "2026-04-02", "2026-04-03"]
              and sorted(n for n, dd in zip(got[1]["name"].to_pylist(), got[1]["day"].to_pylist()) if dd == "2026-04-01") == ["late"],
              f"{days} {r.stderr[-300:]}")
        write_csv([(901, "2026-04-02", "again")])
        seen_pause = killed_at(d, "after-switch", "p.toml")
        before = read_folder()
        r = run(d, "run", "p.toml")
        after = read_folder()
        check("killed after the pointer was replaced: recovery recognises it, nothing published twice",
              seen_pause and r.returncode == 0 and before[0]["files"] == after[0]["files"]
              and after[1]["name"].to_pylist().count("again") == 1, r.stderr[-500:])
        write_csv([(902, "2026-04-03", "third")])
        seen_pause = killed_at(d, "s3-uploading", "p.toml")
        r = run(d, "run", "p.toml")
        after = read_folder()
        check("killed before its upload: recovery publishes it once",
              seen_pause and r.returncode == 0 and after[1]["name"].to_pylist().count("third") == 1, r.stderr[-500:])

        before_read = read_folder()
        r = run(d, "table", "vacuum", folder, "--retention", "0s", "--dry-run", "--json", extra=awsenv)
        dry = json.loads(r.stdout or "{}").get("removed", [])
        listed_paths = {f["path"] for f in before_read[0]["files"]}
        r = run(d, "table", "vacuum", folder, "--retention", "0s", "--json", extra=awsenv)
        gone = json.loads(r.stdout or "{}").get("removed", [])
        left = {o["Key"] for o in s3.list_objects_v2(Bucket="weir-test", Prefix="folders/events/data/").get("Contents", [])}
        after_read = read_folder()
        check("weir table vacuum on a Parquet folder removes the files its pointer no longer lists, and only those",
              r.returncode == 0 and len(dry) >= 4 and gone == dry and not (set(gone) & listed_paths)
              and left == {"folders/events/" + p for p in listed_paths}
              and sorted(after_read[1]["id"].to_pylist()) == sorted(before_read[1]["id"].to_pylist()), f"{dry} {r.stderr[-300:]}")

        # --- a source on S3: the matching objects are copied locally before the run reads them
        src = d / "src"
        src.mkdir()
        shutil.copytree(d / "secrets", src / "secrets")
        for day, rows_ in (("2026-04-01", "1,a\n2,b\n"), ("2026-04-02", "3,c\n")):
            s3.put_object(Bucket="weir-test", Key=f"raw/orders_{day}.csv", Body=("id,name\n" + rows_).encode())
        (src / "p.toml").write_text(f"""[pipeline]
name = "from_s3"

[secrets]
s3_key = {{ file = "secrets/key_id" }}
s3_secret = {{ file = "secrets/secret" }}

[sources.raw]
format = "csv"
path = "s3://weir-test/raw/orders_{{partition}}.csv"
schema = {{ id = "int64", name = "string" }}
storage = {{ endpoint = "{endpoint}", path_style = true, allow_http = true, access_key_id = "s3_key", secret_access_key = "s3_secret" }}

[steps.copy]
input = "raw"
output = {{ path = "out/copy" }}
""")
        import pyarrow.parquet as pq

        def copied():
            return sorted(pq.read_table(src / "out/copy").column("id").to_pylist())

        r = run(src, "run", "p.toml")
        check("a source on S3 reads every object its pattern matches", r.returncode == 0 and copied() == [1, 2, 3], r.stderr[-600:])
        r = run(src, "run", "p.toml")
        check("unchanged objects: the next run is up to date", r.returncode == 0 and "up to date" in (r.stdout + r.stderr).lower(),
              r.stdout + r.stderr[-300:])
        s3.put_object(Bucket="weir-test", Key="raw/orders_2026-04-03.csv", Body=b"id,name\n4,d\n")
        s3.delete_object(Bucket="weir-test", Key="raw/orders_2026-04-01.csv")
        r = run(src, "run", "p.toml")
        check("a new object is read and a deleted one is gone from the copy", r.returncode == 0 and copied() == [3, 4], r.stderr[-600:])
        r = run(src, "run", "p.toml", "--partition", "2026-04-03")
        check("a partition run reads the partition's object", r.returncode == 0 and copied() == [4], r.stderr[-600:])

        # what cannot be reached, and what is refused
        pipeline(path="s3://no-such-bucket/t")
        write_csv([(8, "2026-04-08", "h")])
        r = run(d, "run", "p.toml")
        check("a bucket that does not exist fails, naming the table", r.returncode != 0 and "s3://no-such-bucket/t" in r.stderr,
              r.stderr[-600:])
        # merge by key on S3: the table files holding the run's keys are downloaded, rewritten
        # without them and swapped in one commit
        merged = "s3://weir-test/tables/merged"
        pipeline(mode="merge", path=merged)
        (d / "p.toml").write_text((d / "p.toml").read_text().replace('mode = "merge",', 'mode = "merge", key = ["id"],'))
        write_csv([(1, "2026-04-01", "a"), (2, "2026-04-02", "b"), (3, "2026-04-02", "c")])
        r1 = run(d, "run", "p.toml")
        write_csv([(2, "2026-04-03", "b2"), (4, "2026-04-01", "d")])
        r2 = run(d, "run", "p.toml")
        check("merge by key into a table on S3 (a key moving partition, a new key)",
              r1.returncode == 0 and r2.returncode == 0
              and rows(at=merged) == [(1, "2026-04-01", "a"), (2, "2026-04-03", "b2"), (3, "2026-04-02", "c"), (4, "2026-04-01", "d")],
              f"{r1.stderr[-300:]} {r2.stderr[-300:]}")
        # ordered changes on S3 (sequence_by): the remembered deletes live in the bucket beside
        # the table and switch with its commits; an update older than a delete stays dropped
        cdc = "s3://weir-test/tables/cdc"
        pipeline(mode="merge", path=cdc)
        toml = (d / "p.toml").read_text().replace('name = "string" }', 'name = "string", seq = "int64", op = "string" }')
        (d / "p.toml").write_text(toml.replace('mode = "merge",', 'mode = "merge", key = ["id"], sequence_by = "seq", '
                                                                  'delete_when = { column = "op", value = "d" },'))

        def changes(rs):
            (d / "in.csv").write_text("id,day,name,seq,op\n" + "".join(",".join(map(str, x)) + "\n" for x in rs))

        changes([(1, "2026-04-01", "a", 1, "c"), (2, "2026-04-01", "b", 2, "c"), (2, "2026-04-01", "b", 5, "d")])
        r1 = run(d, "run", "p.toml")
        changes([(2, "2026-04-02", "b-late", 4, "u"), (1, "2026-04-01", "a-old", 0, "u"), (3, "2026-04-02", "c", 6, "c")])
        r2 = run(d, "run", "p.toml")
        tomb = [o["Key"] for o in s3.list_objects_v2(Bucket="weir-test", Prefix="tables/cdc/_weir_tombstones/").get("Contents", [])]
        check("change events merged by sequence into a table on S3: late updates older than the row or its delete are dropped",
              r1.returncode == 0 and r2.returncode == 0 and rows(at=cdc) == [(1, "2026-04-01", "a"), (3, "2026-04-02", "c")]
              and len(tomb) == 1, f"{r1.stderr[-300:]} {r2.stderr[-300:]} {tomb}")
        pipeline(mode="merge")
        (d / "p.toml").write_text((d / "p.toml").read_text().replace('format = "delta", ', ""))
        r = run(d, "validate", "p.toml")
        check("merge into a Parquet folder on object storage is refused, saying what works",
              r.returncode == 2 and 'format = "delta"' in r.stderr, r.stderr[-400:])
        # the example: the orders exports masked into a Delta table on S3 (bucket `lake`)
        s3.create_bucket(Bucket="lake")
        ex = d / "examples"
        for name in ("delta-lake", "orders"):
            shutil.copytree(root / "examples" / name, ex / name)
        toml = ex / "delta-lake/pipeline.toml"
        toml.write_text(toml.read_text().replace("../../dist", str(root / "dist")))
        exenv = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
        r = run(ex / "delta-lake", "run", "pipeline.toml", "--json", extra=exenv)
        written = json.loads(r.stdout)["steps"][0]["rows_written"] if r.returncode == 0 else -1
        lake = deltalake.DeltaTable("s3://lake/orders", storage_options=opts).to_pyarrow_table() if r.returncode == 0 else None
        check("the delta-lake example loads the masked orders into a Delta table on S3",
              r.returncode == 0 and lake is not None and lake.num_rows == written > 0
              and not any("@" in e for e in lake["customer_email"].to_pylist())
              and len(set(lake["country"].to_pylist())) > 1, r.stderr[-800:])
        r = run(ex / "delta-lake", "run", "pipeline.toml", "--partition", "2024-01-03", "--json", extra=exenv)
        check("a partition run of the example adds one table version",
              r.returncode == 0 and len(deltalake.DeltaTable("s3://lake/orders", storage_options=opts).history()) == 2, r.stderr[-800:])
    finally:
        server.terminate()
        server.wait(timeout=30)

finish("s3")
