"""A PostgreSQL source against a real server: a private cluster (the distribution's
postgresql package) on a free 127.0.0.1 port and a temporary data directory, started here
and stopped by its pid. weir reads a table of every supported type, per partition window,
and its Parquet output is compared with what psql reads from the same database, value by
value. Unsupported types, an undeclared numeric scale, a server that is down and a
partition-less run of a windowed source fail with messages that say what to do. Debezium
change events made from random changes to a table (with the server's LSNs) are merged by
LSN and compared with the table row for row.
"""
import datetime
import glob
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq

import cdcfeed

from netutil import free_port, wait_until
from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))
# a Python with the `deltalake` package, to read the Delta twin of the CDC mirror
delta_python = os.environ.get("WEIR_DELTA_PYTHON") or subprocess.run(
    [str(root / "scripts/python-env.sh"), "delta"], capture_output=True, text=True, check=True).stdout.strip()
for k in ("WEIR_OPENLINEAGE_URL", "WEIR_PUSHGATEWAY_URL"):
    env.pop(k, None)

bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
as_root = os.geteuid() == 0
user = "postgres" if as_root else None  # initdb refuses to run as root

TABLE = """
create table orders (
  id bigint primary key,
  small smallint,
  qty integer,
  amount numeric(12,2),
  big numeric(38,2),
  ratio double precision,
  score real,
  note text,
  code varchar(8),
  grade char(2),
  flag boolean,
  created date,
  seen timestamp,
  updated_at timestamptz not null,
  u uuid,
  doc jsonb,
  plain json,
  raw bytea,
  tags text[],
  nums integer[]
);
insert into orders
select i,
       (i % 100)::smallint,
       case when i % 7 = 0 then null else i * 3 end,
       (i * 1.25 - 400)::numeric(12,2),
       case i % 3 when 0 then 999999999999999999999999999999999999.50 when 1 then -0.01 else 0 end,
       i / 3.0,
       (i % 10) / 4.0,
       case when i % 5 = 0 then null else 'nötë ' || i || ' ✓' end,
       'c' || (i % 13),
       'g' || (i % 3),
       i % 2 = 0,
       date '2024-01-01' + (i % 3),
       timestamp '2024-01-01 00:00:00' + i * interval '1 minute',
       timestamptz '2024-01-01 00:00:00+00' + (i % 3) * interval '1 day' + i * interval '1 second',
       md5(i::text)::uuid,
       jsonb_build_object('i', i, 'even', i % 2 = 0),
       json_build_object('k', i)::json,
       decode(lpad(to_hex(i), 8, '0'), 'hex'),
       case when i % 11 = 0 then null else array['a' || i, null, 'b'] end,
       array[i, i + 1]
from generate_series(1, 900) as i;
"""

PIPELINE = """[pipeline]
name = "pg"
batch_size = 7               # many fetches of the portal, the last one short

[sources.orders]
format = "postgres"
url = { env = "PG_URL" }
query = "select *, (updated_at at time zone 'UTC')::date as day from orders"
where = "updated_at >= $start and updated_at < $end"

[steps.copy]
input = "orders"
output = { path = "out/orders", partition_by = "day" }
"""


def micros(t):
    """Microseconds since 1970 of a naive (UTC) or aware datetime."""
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (t.replace(tzinfo=t.tzinfo or datetime.timezone.utc) - epoch) // datetime.timedelta(microseconds=1)


def psql(port, sql):
    r = subprocess.run([shutil.which("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "weir", "-d", "shop",
                        "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"psql failed: {r.stderr}")
    return r.stdout


def run(d, *args, url):
    return subprocess.run([weir, *args], cwd=d, env=dict(env, PG_URL=url), capture_output=True, text=True)


def copy_pipeline(name, source, read, batch_size=None):
    """A pipeline `name` copying PostgreSQL source `source` (its `read` lines: a table or a
    query) to out/NAME."""
    batch = f"batch_size = {batch_size}\n" if batch_size else ""
    return f"""[pipeline]
name = "{name}"
{batch}
[sources.{source}]
format = "postgres"
url = {{ env = "PG_URL" }}
{read}

[steps.copy]
input = "{source}"
output = {{ path = "out/{name}" }}
"""


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    data = d / "pgdata"
    data.mkdir()
    if as_root:
        shutil.chown(d, user="postgres")
        shutil.chown(data, user="postgres")
    port = free_port()
    r = subprocess.run([f"{bindir}/initdb", "-D", str(data), "-U", "weir", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                       capture_output=True, text=True, user=user)
    check("initdb makes a private cluster", r.returncode == 0, r.stderr)
    server = subprocess.Popen(
        [f"{bindir}/postgres", "-D", str(data), "-p", str(port), "-k", str(d), "-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=(d / "postgres.log").open("w"), user=user)
    try:
        wait_until("PostgreSQL", lambda: subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                                                        capture_output=True).returncode == 0)
        subprocess.run([shutil.which("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "weir", "-d", "postgres",
                        "-c", "create database shop"], check=True, capture_output=True)
        psql(port, TABLE)
        url = f"postgres://weir@127.0.0.1:{port}/shop"
        work = d / "work"
        work.mkdir()
        (work / "pipeline.toml").write_text(PIPELINE)

        r = run(work, "run", "pipeline.toml", "--partition", "2024-01-02", "--json", url=url)
        check("a partition of the table is read", r.returncode == 0, r.stderr)
        summary = json.loads(r.stdout) if r.returncode == 0 else {}
        expected = int(psql(port, "select count(*) from orders where updated_at >= '2024-01-02' and updated_at < '2024-01-03'"))
        check("the partition's rows, and only them", summary.get("steps", [{}])[0].get("rows_written") == expected, f"{summary} vs {expected}")

        table = pq.read_table(work / "out/orders/day=2024-01-02")
        schema = {f.name: str(f.type) for f in table.schema}
        check("types map as documented", schema.get("id") == "int64" and schema.get("small") == "int16" and schema.get("qty") == "int32"
              and schema.get("amount") == "decimal128(12, 2)" and schema.get("score") == "float" and schema.get("created") == "date32[day]"
              and schema.get("seen") == "timestamp[us]" and schema.get("updated_at") == "timestamp[us, tz=UTC]"
              and schema.get("raw") == "binary" and schema.get("tags") == "list<item: string>" and schema.get("nums") == "list<item: int32>",
              str(schema))
        got = {row["id"]: row for row in table.to_pylist()}
        # psql's own rendering of the same rows, as JSON (one object per row)
        want = {}
        for line in psql(port, """select json_build_object(
                 'id', id, 'small', small, 'qty', qty, 'amount', amount::text, 'big', big::text, 'ratio', ratio, 'score', score,
                 'note', note, 'code', code, 'grade', grade, 'flag', flag, 'created', created::text,
                 'seen_us', (extract(epoch from seen) * 1000000)::bigint,
                 'updated_us', (extract(epoch from updated_at) * 1000000)::bigint,
                 'u', u::text, 'doc', doc::text, 'plain', plain::text, 'raw', encode(raw, 'hex'), 'tags', tags, 'nums', nums)
               from orders where updated_at >= '2024-01-02' and updated_at < '2024-01-03'""").splitlines():
            o = json.loads(line)
            want[o["id"]] = o
        bad = []
        for i, w in want.items():
            g = got.get(i)
            if g is None:
                bad.append((i, "missing"))
                continue
            pairs = [
                (g["small"], w["small"]), (g["qty"], w["qty"]), (str(g["amount"]), w["amount"]), (str(g["big"]), w["big"]),
                (g["ratio"], w["ratio"]), (g["score"], w["score"]), (g["note"], w["note"]), (g["code"], w["code"]),
                (g["grade"], w["grade"]), (g["flag"], w["flag"]), (str(g["created"]), w["created"]),
                (micros(g["seen"]), w["seen_us"]), (micros(g["updated_at"]), w["updated_us"]), (g["u"], w["u"]),
                (json.loads(g["doc"]), json.loads(w["doc"])), (g["plain"], w["plain"]), (g["raw"].hex(), w["raw"]),
                (g["tags"], w["tags"]), (g["nums"], w["nums"]),
            ]
            for k, (a, b) in enumerate(pairs):
                if a != b:
                    bad.append((i, k, a, b))
        check(f"every value of {len(want)} rows equals psql's", not bad and len(got) == len(want), str(bad[:5]))

        r = run(work, "run", "pipeline.toml", "--partition", "2024-01-02", url=url)
        check("a second run reads again (a database is never 'up to date')", r.returncode == 0 and "up to date" not in r.stdout.lower(), r.stdout + r.stderr)

        r = run(work, "run", "pipeline.toml", "--partition", "2024-01-02T00", "--json", url=url)
        hour = int(psql(port, "select count(*) from orders where updated_at >= '2024-01-02 00:00+00' and updated_at < '2024-01-02 01:00+00'"))
        check("an hour partition reads its hour", r.returncode == 0 and json.loads(r.stdout)["steps"][0]["rows_written"] == hour, r.stdout[-300:] + r.stderr)

        # a backfill over the days: each partition its window, together the whole table
        r = run(work, "backfill", "pipeline.toml", "--from", "2024-01-01", "--to", "2024-01-03", "--force", url=url)
        days = {p.name: pq.read_table(p).num_rows for p in (work / "out/orders").iterdir()}
        check("a backfill of three days reads each day once: the whole table",
              r.returncode == 0 and sorted(days) == ["day=2024-01-01", "day=2024-01-02", "day=2024-01-03"] and sum(days.values()) == 900,
              f"{days} {r.stderr[-300:]}")

        # one snapshot: rows committed while the read is under way are not in it
        hostile = root / "dist/plugins/hostile.wasm"
        (work / "snap.toml").write_text(PIPELINE.replace('name = "pg"', 'name = "snap"').replace("out/orders", "out/snap") + f"""
[plugins.slow]
path = "{hostile}"

[[steps.copy.transforms]]
plugin = "slow"
config = {{ mode = "slow", sleep_ms = 40 }}
""")
        before = int(psql(port, "select count(*) from orders where updated_at >= '2024-01-02' and updated_at < '2024-01-03'"))
        p = subprocess.Popen([weir, "run", "snap.toml", "--partition", "2024-01-02", "--json"], cwd=work,
                             env=dict(env, PG_URL=url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until("the read to start", lambda: psql(port, "select count(*) from pg_stat_activity where datname = 'shop' and state = 'idle in transaction'").strip() != "0", 60)
        psql(port, "insert into orders (id, updated_at) select i, timestamptz '2024-01-02 12:00+00' from generate_series(5001, 5050) as i")
        out, err = p.communicate(timeout=120)
        snap = json.loads(out)["steps"][0]["rows_written"] if p.returncode == 0 else None
        check("rows committed during the read are not in it (one snapshot)", snap == before, f"{snap} vs {before}: {err[-300:]}")
        psql(port, "delete from orders where id > 5000")

        (work / "upto.toml").write_text(PIPELINE.replace('name = "pg"', 'name = "upto"').replace("out/orders", "out/upto")
                                        .replace("updated_at >= $start and updated_at < $end", "updated_at < $end"))
        r = run(work, "run", "upto.toml", "--partition", "2024-01-01", "--json", url=url)
        upto = int(psql(port, "select count(*) from orders where updated_at < '2024-01-02'"))
        check("`$end` alone binds the window's end", r.returncode == 0 and json.loads(r.stdout)["steps"][0]["rows_written"] == upto, r.stdout[-200:] + r.stderr)

        (work / "missing.toml").write_text(PIPELINE.replace('name = "pg"', 'name = "missing"').replace("from orders", "from no_such_table"))
        r = run(work, "run", "missing.toml", "--partition", "2024-01-02", url=url)
        check("what PostgreSQL says reaches the user, as theirs to fix", r.returncode == 1 and "no_such_table" in r.stderr and "does not exist" in r.stderr and "external" not in r.stderr, r.stderr)

        r = run(work, "run", "pipeline.toml", url=url)
        check("a windowed source without --partition fails saying so", r.returncode == 1 and "--partition" in r.stderr, r.stderr)

        (work / "money.toml").write_text(PIPELINE.replace('name = "pg"', 'name = "money"').replace(
            "select *, (updated_at at time zone 'UTC')::date as day from orders",
            "select id, id::money as price, (updated_at at time zone 'UTC')::date as day, updated_at from orders"))
        r = run(work, "run", "money.toml", "--partition", "2024-01-02", url=url)
        check("an unsupported type fails naming the column, its type and the cast", r.returncode == 1 and "`price`" in r.stderr and "money" in r.stderr and "cast" in r.stderr, r.stderr)

        (work / "loose.toml").write_text(PIPELINE.replace('name = "pg"', 'name = "loose"').replace(
            "select *, (updated_at at time zone 'UTC')::date as day from orders",
            "select id, amount::numeric as amount, (updated_at at time zone 'UTC')::date as day, updated_at from orders"))
        r = run(work, "run", "loose.toml", "--partition", "2024-01-02", url=url)
        check("a numeric without a scale fails with the cast to write", r.returncode == 1 and "numeric(18,2)" in r.stderr, r.stderr)

        (work / "table.toml").write_text(copy_pipeline("whole", "orders", 'table = "public.orders"'))
        r = run(work, "run", "table.toml", "--json", url=url)
        check("a whole table by name", r.returncode == 0 and json.loads(r.stdout)["steps"][0]["rows_written"] == 900, r.stdout[-300:] + r.stderr)
        check("the password is nowhere in the pipeline file", "weir@" not in (work / "table.toml").read_text())

        # wide rows: a batch is cut at 64 MiB of values, not at batch_size rows
        psql(port, "create table wide as select i as id, repeat(chr(97 + i % 26), 1048576) as body from generate_series(1, 70) as i")
        (work / "wide.toml").write_text(copy_pipeline("wide", "wide", 'query = "select id, body from wide order by id"', 1000))
        r = run(work, "run", "wide.toml", "--json", url=url)
        wide = pq.read_table(work / "out/wide").to_pylist() if r.returncode == 0 else []
        check("70 rows of 1 MiB (past the 64 MiB batch cut) come through whole",
              r.returncode == 0 and len(wide) == 70 and all(len(w["body"]) == 1048576 and w["body"][0] == chr(97 + w["id"] % 26) for w in wide),
              r.stderr[-500:])

        # incremental: read from the committed watermark (less the overlap) up to the run's
        # start; merged by key, so the overlap's rows are not duplicated
        psql(port, """create table ev (id bigint primary key, v text not null, updated_at timestamptz not null);
                      insert into ev select i, 'v' || i, now() - interval '2 hours' + i * interval '1 second' from generate_series(1, 50) i""")
        (work / "inc.toml").write_text("""[pipeline]
name = "inc"

[sources.ev]
format = "postgres"
url = { env = "PG_URL" }
table = "ev"
incremental = { column = "updated_at", overlap = "10m" }

[steps.table]
input = "ev"
output = { path = "out/ev", mode = "merge", key = ["id"] }
""")

        def table_rows():
            return sorted((r["id"], r["v"]) for r in pq.read_table(work / "out/ev").to_pylist())

        def pg_rows():
            return sorted((int(i), v) for i, v in (line.split("|") for line in psql(port, "select id, v from ev").splitlines()))

        def committed():
            w = json.loads(run(work, "watermarks", "inc.toml", "--json", url=url).stdout or "{}")
            return {m["source"]: m["value"] for m in w.get("watermarks", [])}

        def step(r):
            return json.loads(r.stdout)["steps"][0] if r.returncode == 0 else {}

        r = run(work, "run", "inc.toml", "--json", url=url)
        first = committed().get("ev")
        check("a first incremental run reads everything and commits a watermark",
              step(r).get("rows_read") == 50 and table_rows() == pg_rows() and first and first.endswith("Z"), r.stderr[-500:])
        psql(port, "update ev set v = v || '!', updated_at = now() where id <= 5; insert into ev select i, 'v' || i, now() from generate_series(51, 60) i")
        r = run(work, "run", "inc.toml", "--json", url=url)
        check("the next run reads only the rows changed since (15), merged by key into the table",
              step(r).get("rows_read") == 15 and table_rows() == pg_rows(), f"{step(r).get('rows_read')} {r.stderr[-500:]}")
        runs = json.loads(run(work, "runs", "--pipeline", "inc.toml", "--json", url=url).stdout)
        check("each run records the window it read", runs[0]["watermark_start"] and runs[0]["watermark_end"] == committed().get("ev")
              and runs[0]["watermark_start"] < first < runs[0]["watermark_end"], str([(x["watermark_start"], x["watermark_end"]) for x in runs]))

        # kill -9 before the decision: nothing published, the watermark did not move
        psql(port, "update ev set v = v || '#', updated_at = now() where id in (7, 8); insert into ev values (61, 'v61', now())")
        before = committed().get("ev")

        def killed_at(point):
            p = subprocess.Popen([weir, "run", "inc.toml"], cwd=work, env=dict(env, PG_URL=url, WEIR_DEBUG_PAUSE=f"{point}:60000"),
                                 stderr=subprocess.PIPE, text=True)
            for line in p.stderr:
                if f"debug pause at {point}" in line:
                    break
            p.kill()
            p.wait(timeout=30)

        killed_at("before-publish")
        check("killed before its decision: the watermark has not moved", committed().get("ev") == before, str(committed()))
        # kill -9 after the decision, before the switch: the decision carries the watermark;
        # the next run completes the publish first, so the watermark never passes unpublished rows
        killed_at("after-decision")
        moved = committed().get("ev")
        check("killed after its decision: the watermark moved with it", moved != before, f"{moved} {before}")
        r = run(work, "run", "inc.toml", "--json", url=url)
        check("the next run completes the decided publish, then reads from the new watermark: every row once",
              r.returncode == 0 and "completed" in r.stderr.lower() and table_rows() == pg_rows(), r.stderr[-800:])
        # kill -9 after the publish, before the run is recorded done
        psql(port, "insert into ev values (62, 'v62', now())")
        killed_at("between-publishes")
        r = run(work, "run", "inc.toml", url=url)
        check("killed after its publish: nothing lost, nothing twice", r.returncode == 0 and table_rows() == pg_rows(), r.stderr[-500:])

        # by hand: reset, set (audited), and --full-refresh
        run(work, "watermarks", "inc.toml", "reset", "ev", url=url)
        r = run(work, "run", "inc.toml", "--json", url=url)
        check("after a reset the next run reads everything", step(r).get("rows_read") == 62 and table_rows() == pg_rows(), r.stderr[-300:])
        r = run(work, "watermarks", "inc.toml", "set", "ev", "yesterday", url=url)
        check("a watermark that is not a time is refused", r.returncode == 1 and "RFC 3339" in r.stderr, r.stderr)
        run(work, "watermarks", "inc.toml", "set", "ev", "2000-01-01T00:00:00Z", url=url)
        listed = run(work, "watermarks", "inc.toml", url=url).stdout
        check("watermarks list the committed value and the audit log", "ev: 2000-01-01T00:00:00Z  (set by hand" in listed
              and "-> 2000-01-01T00:00:00Z by weir watermarks" in listed and "-> (none) by" in listed, listed)
        r = run(work, "run", "inc.toml", "--full-refresh", "--json", url=url)
        check("--full-refresh reads everything and commits anew", step(r).get("rows_read") == 62 and committed().get("ev", "").startswith("20")
              and not committed()["ev"].startswith("2000"), r.stderr[-300:])

        # an incremental source in partition runs (a backfill's): each partition is read whole
        # and no watermark moves, so one partition's run never makes the next one skip rows
        psql(port, """create table pev (id bigint primary key, v text not null, updated_at timestamptz not null);
                      insert into pev select i, 'p' || i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 hour'
                      from generate_series(0, 47) i""")
        (work / "pinc.toml").write_text("""[pipeline]
name = "pinc"

[sources.pev]
format = "postgres"
url = { env = "PG_URL" }
table = "pev"
where = "updated_at >= $start and updated_at < $end"
incremental = { column = "updated_at", overlap = "10m" }

[steps.table]
input = "pev"
output = { path = "out/pev", mode = "merge", key = ["id"] }
""")
        r1 = run(work, "run", "pinc.toml", "--partition", "2024-01-01", "--json", url=url)
        r2 = run(work, "run", "pinc.toml", "--partition", "2024-01-02", "--json", url=url)
        w = json.loads(run(work, "watermarks", "pinc.toml", "--json", url=url).stdout or "{}").get("watermarks", [])
        check("partition runs of an incremental source each read their whole partition and move no watermark",
              step(r1).get("rows_read") == 24 and step(r2).get("rows_read") == 24 and w == []
              and len(pq.read_table(work / "out/pev")) == 48 and "leaves its watermark" in r2.stderr,
              f"{step(r1).get('rows_read')} {step(r2).get('rows_read')} {w} {r2.stderr[-400:]}")

        # a query that ends in `; -- note` prepares on its own but not inside COPY (...): it is
        # read through a portal instead (tried under a savepoint, the snapshot stays usable)
        (work / "semi.toml").write_text(copy_pipeline("semi", "pev", 'query = """\nselect id, v from pev order by id; -- every row\n"""'))
        r = run(work, "run", "semi.toml", "--json", url=url)
        got = pq.read_table(work / "out/semi").column("id").to_pylist() if r.returncode == 0 else []
        check("a query ending in a semicolon and a comment is read whole (through a portal when COPY cannot wrap it)",
              r.returncode == 0 and got == list(range(0, 48)), r.stderr[-500:])

        # the example pipeline: a PostgreSQL orders table extracted incrementally, masked, merged
        example = root / "examples/postgres-orders"
        subprocess.run([shutil.which("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "weir", "-d", "postgres",
                        "-c", "create database demo"], check=True, capture_output=True)
        demo = f"postgres://weir@127.0.0.1:{port}/demo"
        r = subprocess.run([shutil.which("psql"), demo, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(example / "orders.sql")],
                           capture_output=True, text=True)
        check("the example's demo table loads with psql -f", r.returncode == 0, r.stderr)
        ex = d / "example"
        shutil.copytree(example, ex)
        (ex / "pipeline.toml").write_text((ex / "pipeline.toml").read_text().replace("../../dist", str(root / "dist")))
        r = run(ex, "run", "pipeline.toml", "--json", url=demo)
        out = pq.read_table(ex / "out/orders").to_pylist() if r.returncode == 0 else []
        check("the example extracts the orders table, masked", r.returncode == 0 and len(out) == 1000
              and all("@" not in o["customer_email"] for o in out), r.stderr[-600:])
        subprocess.run([shutil.which("psql"), demo, "-c", "update orders set status = 'deleted', updated_at = now() where order_id = 1; "
                        "update orders set amount = 1.00, updated_at = now() where order_id = 2"], check=True, capture_output=True)
        r = run(ex, "run", "pipeline.toml", "--json", url=demo)
        out = {o["order_id"]: o for o in pq.read_table(ex / "out/orders").to_pylist()} if r.returncode == 0 else {}
        check("its next run reads the two changes: one deleted, one updated",
              r.returncode == 0 and json.loads(r.stdout)["steps"][0]["rows_read"] == 2 and 1 not in out and str(out[2]["amount"]) == "1.00"
              and len(out) == 999, r.stderr[-600:])

        # a SQL_ASCII database holds bytes that are not UTF-8: the server refuses to send row 3
        # to a UTF-8 client in the middle of the COPY stream; the run fails with its message
        subprocess.run([shutil.which("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "weir", "-d", "postgres", "-c",
                        "create database ascii template template0 encoding 'SQL_ASCII' lc_collate 'C' lc_ctype 'C'"],
                       check=True, capture_output=True)
        ascii_url = f"postgres://weir@127.0.0.1:{port}/ascii"
        subprocess.run([shutil.which("psql"), ascii_url, "-v", "ON_ERROR_STOP=1", "-c",
                        "create table t as select i::bigint as id, case when i = 3 then E'bad \\377' else 'ok' end as txt "
                        "from generate_series(1, 50000) i"], check=True, capture_output=True)
        (work / "ascii.toml").write_text(copy_pipeline("ascii", "orders", 'table = "t"'))
        r = run(work, "run", "ascii.toml", url=ascii_url)
        check("a server error in the middle of a COPY stream fails the run with the server's message, without a panic",
              r.returncode == 1 and "22021" in r.stderr and "UTF8" in r.stderr and "panicked" not in r.stderr, r.stderr[-500:])

        # a table much larger than what the run holds: 300,000 rows of about 1 KB (300 MB through
        # the connection) stream through in batches of 8192 rows (8 MB); the run's peak resident
        # memory (its own, measured by the kernel: ru_maxrss of a wrapper's only child) stays far
        # below the table: it is bounded by the batch size, not the table
        psql(port, "create table big as select i::bigint as id, repeat(md5(i::text), 31) as payload "
                   "from generate_series(1, 300000) i")
        (work / "big.toml").write_text(copy_pipeline("big", "big", 'table = "public.big"', 8192))
        wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
        r = subprocess.run([sys.executable, "-c", wrapper, weir, "run", "big.toml", "--json"], cwd=work,
                           env=dict(env, PG_URL=url), capture_output=True, text=True)
        peak_mb = int(r.stdout.strip().splitlines()[-1]) / 1024 if r.stdout.strip() else 0
        big = pq.read_table(work / "out/big", columns=["id"]) if r.returncode == 0 else None
        check(f"a 300 MB table streams through a run that peaks at {peak_mb:.0f} MB (under half of the table)",
              r.returncode == 0 and big.num_rows == 300000 and 0 < peak_mb < 150, f"{peak_mb} MB {r.stderr[-400:]}")
        psql(port, "drop table big")

        # --- Debezium change events against a PostgreSQL oracle: random inserts, updates and
        # deletes applied to a table, the matching events (with the server's own LSNs) shuffled
        # within a window, some delivered a run late, some replayed; the merged output must
        # equal the table row for row after each run, and a replay of everything changes nothing
        psql(port, "create table cdc (id int primary key, name text, qty int, day date, updated timestamptz not null)")
        rng = random.Random(20261204)

        def lsn():
            return int(psql(port, "select pg_current_wal_lsn() - '0/0'").strip())

        def image(i):
            line = psql(port, f"select json_build_object('id', id, 'name', name, 'qty', qty, 'day', day - date '1970-01-01', "
                              f"'updated', to_char(updated at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')) from cdc where id = {i}")
            return json.loads(line)

        def event(op, before, after, at):
            return {"schema": None, "payload": {"before": before, "after": after, "op": op,
                                                "source": {"connector": "postgresql", "lsn": at, "ts_ms": 0}, "ts_ms": 0}}

        psql(port, "insert into cdc select i, 'n' || i, i, date '2026-01-01' + i % 5, now() from generate_series(1, 20) i")
        snap = lsn()
        events = [event("r", None, image(i), snap) for i in range(1, 21)]
        live, next_id = set(range(1, 21)), 21
        for _ in range(240):
            roll = rng.random()
            if roll < 0.3 or not live:
                i, next_id = next_id, next_id + 1
                psql(port, f"insert into cdc values ({i}, 'n{i}', {rng.randint(0, 99)}, date '2026-01-01' + {rng.randint(0, 9)}, now())")
                events.append(event("c", None, image(i), lsn()))
                live.add(i)
            elif roll < 0.8:
                i = rng.choice(sorted(live))
                before = image(i)
                psql(port, f"update cdc set name = 'u{rng.randint(0, 999)}', qty = qty + 1, updated = now() where id = {i}")
                events.append(event("u", before, image(i), lsn()))
            else:
                i = rng.choice(sorted(live))
                psql(port, f"delete from cdc where id = {i}")
                events.append(event("d", {"id": i, "name": None, "qty": None, "day": None, "updated": None}, None, lsn()))
                live.discard(i)
        (work / "cdc.toml").write_text("""[pipeline]
name = "cdc"

[sources.changes]
format = "debezium"
path = "changes.json"
schema = { id = "int64", name = "string", qty = "int64", day = "date", updated = "timestamp_tz" }

[steps.mirror]
input = "changes"
output = { path = "out/cdc", mode = "merge", key = ["id"], delete_when = { column = "_op", value = "d" }, sequence_by = "_lsn" }

[steps.mirror_delta]
input = "changes"
output = { format = "delta", path = "out/cdc-delta", partition_by = "day", mode = "merge", key = ["id"], delete_when = { column = "_op", value = "d" }, sequence_by = "_lsn" }
""")

        def mirror(delta=False):
            if delta:
                # the Delta table as the `deltalake` package reads it (its own virtualenv)
                subprocess.run([delta_python, "-c", "import sys, deltalake, pyarrow.parquet as pq; "
                                "pq.write_table(deltalake.DeltaTable(sys.argv[1]).to_pyarrow_table(), sys.argv[2])",
                                str(work / "out/cdc-delta"), str(work / "delta-read.parquet")], check=True)
            t = pq.read_table(work / ("delta-read.parquet" if delta else "out/cdc")).to_pylist()
            return sorted((r["id"], r["name"], r["qty"], str(r["day"]), micros(r["updated"])) for r in t)

        def table_now():
            rows = psql(port, "select id, coalesce(name, ''), qty, day, (extract(epoch from updated) * 1000000)::bigint from cdc order by id")
            return sorted((int(a), b, int(c), e, int(f)) for a, b, c, e, f in (line.split("|") for line in rows.splitlines()))

        # three runs: shuffled within a window of 6, a few of each run's events held back to the
        # next run (late), and some earlier events replayed
        cdc_ok = True
        for n, batch in enumerate(cdcfeed.batches(events, rng)):
            (work / "changes.json").write_text("".join(json.dumps(e) + "\n" for e in batch))
            r = run(work, "run", "cdc.toml", url=url)
            if r.returncode != 0:
                cdc_ok = False
                check(f"CDC run {n + 1} succeeds", False, r.stderr[-800:])
                break
        # the held-back events of the last run were none; the oracle is the table as it is now,
        # which every event up to the last has been applied to
        check("Debezium events (snapshot, inserts, updates, deletes; shuffled, late, replayed) merged by LSN equal the PostgreSQL table",
              cdc_ok and mirror() == table_now(), f"{len(mirror())} rows vs {len(table_now())}")
        check("the same events merged into a Delta table (deltalake reads it) equal the PostgreSQL table",
              cdc_ok and mirror(delta=True) == table_now(), f"{len(mirror(delta=True))} rows vs {len(table_now())}")
        published = sorted(p.name for p in (work / "out/cdc").iterdir())
        check("the deletes the merge applied are remembered beside the data, not read as data",
              "_weir_tombstones.arrow" in published and len(pq.read_table(work / "out/cdc")) == len(table_now()), str(published))
        (work / "changes.json").write_text("".join(json.dumps(e) + "\n" for e in reversed(events)))
        r = run(work, "run", "cdc.toml", url=url)
        check("replaying every event (in reverse order) changes nothing, in the Parquet folder and the Delta table",
              r.returncode == 0 and mirror() == table_now() and mirror(delta=True) == table_now(), r.stderr[-500:])
        (work / "changes.json").write_text(json.dumps({"payload": {"op": "u", "after": {"id": 1}}}) + "\n")
        r = run(work, "run", "cdc.toml", url=url)
        check("an event with nothing to order it by fails, naming the file and line",
              r.returncode == 1 and "changes.json:1" in r.stderr and "to order it by" in r.stderr, r.stderr[-500:])

        dead = f"postgres://weir@127.0.0.1:{free_port()}/shop"
        r = run(work, "run", "table.toml", url=dead)
        check("a server that is down fails as external (retrying may help)", r.returncode == 1 and "cannot connect" in r.stderr and "external" in r.stderr, r.stderr)
    finally:
        server.terminate()
        server.wait()

finish("postgres")
