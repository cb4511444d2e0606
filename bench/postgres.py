"""PostgreSQL extraction benchmark (workload P1): an orders table of N rows read into Parquet.

    WEIR_BIN=target/release/weir python bench/postgres.py --rows 10000000 --rounds 3

A private cluster (the distribution's postgresql, as in the tests) on a free 127.0.0.1 port
and a temporary data directory, stopped by its pid. Runners, each a process of its own,
timed wall-clock and with its peak RSS (from wait4):

- `copy-binary`: the limit, `COPY (SELECT ...) TO STDOUT (FORMAT binary)` piped to /dev/null
  by psql: the server's own cost of producing the rows and the wire.
- `weir`: `format = "postgres"` into Parquet (zstd(1)), through `weir run`.
- `psycopg-copy`: what a Python user writes for speed: psycopg 3 `COPY ... TO STDOUT`
  (text), parsed by pyarrow's CSV reader, written with pyarrow.parquet.
- `psycopg-cursor`: the common way: a server-side cursor, `fetchmany`, rows into
  pyarrow.Table.from_pylist batches, written with pyarrow.parquet.
- `weir-b` (with `--weir-b PATH`): a second weir build in the same rounds, to compare two.

Every Parquet output is checked: row count and the sum of ids equal the table's. Results
(rows/s, ratio to copy-binary, peak RSS) go to stdout as a Markdown table.
"""
import argparse
import glob
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=10_000_000)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--runners", default="weir,psycopg-copy,psycopg-cursor",
                help="comma-separated runners besides copy-binary (always run: it is the limit)")
ap.add_argument("--weir-b", help="a second weir binary, run as `weir-b` in the same rounds (an A/B of two builds)")
args = ap.parse_args()
weir = os.environ.get("WEIR_BIN", "target/release/weir")
try:
    import psycopg  # noqa: F401
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "psycopg[binary]"], check=True)
import pyarrow.parquet as pq

from procstats import timed

bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
user = "postgres" if os.geteuid() == 0 else None

COLUMNS = "id, customer_id, email, country, amount, status, created_at, updated_at, note"
QUERY = f"select {COLUMNS} from orders"

PSYCOPG_COPY = r"""
import io, sys, psycopg, pyarrow as pa, pyarrow.csv as pc, pyarrow.parquet as pq
url, out = sys.argv[1], sys.argv[2]
schema = pa.schema([("id", pa.int64()), ("customer_id", pa.int32()), ("email", pa.string()), ("country", pa.string()),
                    ("amount", pa.decimal128(12, 2)), ("status", pa.string()), ("created_at", pa.timestamp("us", "UTC")),
                    ("updated_at", pa.timestamp("us", "UTC")), ("note", pa.string())])
writer = None
with psycopg.connect(url) as conn, conn.cursor() as cur:
    buf = io.BytesIO()
    def flush():
        global writer
        buf.seek(0)
        t = pc.read_csv(buf, read_options=pc.ReadOptions(column_names=schema.names),
                        convert_options=pc.ConvertOptions(column_types=schema, strings_can_be_null=True, null_values=[""]))
        if writer is None:
            writer = pq.ParquetWriter(out, t.schema, compression="zstd", compression_level=1)
        writer.write_table(t)
        buf.seek(0); buf.truncate()
    with cur.copy("COPY (select %s from orders) TO STDOUT (FORMAT csv)" % sys.argv[3]) as copy:
        for block in copy:
            buf.write(block)
            if buf.tell() > 64 << 20:
                flush()
    flush()
writer.close()
"""

PSYCOPG_CURSOR = r"""
import sys, psycopg, pyarrow as pa, pyarrow.parquet as pq
url, out = sys.argv[1], sys.argv[2]
writer = None
with psycopg.connect(url) as conn:
    with conn.cursor(name="read") as cur:
        cur.itersize = 65536
        cur.execute("select %s from orders" % sys.argv[3])
        names = None
        while True:
            rows = cur.fetchmany(65536)
            if not rows:
                break
            names = names or [d.name for d in cur.description]
            t = pa.Table.from_pylist([dict(zip(names, r)) for r in rows])
            if writer is None:
                writer = pq.ParquetWriter(out, t.schema, compression="zstd", compression_level=1)
            writer.write_table(t.cast(writer.schema))
writer.close()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    data = d / "pgdata"
    data.mkdir()
    if user:
        shutil.chown(d, user=user)
        shutil.chown(data, user=user)
    port = free_port()
    subprocess.run([f"{bindir}/initdb", "-D", str(data), "-U", "weir", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                   check=True, capture_output=True, user=user)
    server = subprocess.Popen([f"{bindir}/postgres", "-D", str(data), "-p", str(port), "-k", str(d),
                               "-c", "listen_addresses=127.0.0.1", "-c", "shared_buffers=512MB"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=user)
    try:
        psql = [shutil.which("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "weir", "-v", "ON_ERROR_STOP=1", "-qAt"]
        for _ in range(100):
            if subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        subprocess.run(psql + ["-d", "postgres", "-c", "create database shop"], check=True)
        url = f"postgres://weir@127.0.0.1:{port}/shop"
        t = time.monotonic()
        subprocess.run(psql + ["-d", "shop", "-c", f"""
            create table orders (id bigint primary key, customer_id integer not null, email text not null,
              country text, amount numeric(12,2) not null, status text not null,
              created_at timestamptz not null, updated_at timestamptz not null, note text);
            insert into orders select i, ((i::bigint * 7919) % 1000003)::integer, 'customer' || (i::bigint * 7919) % 1000003 || '@example.com',
              (array['DE','FR','US','JP','BR','IN'])[1 + i % 6], ((i % 100000) * 0.37)::numeric(12,2),
              (array['placed','paid','shipped','delivered','returned'])[1 + i % 5],
              timestamptz '2024-01-01' + i * interval '3 seconds', timestamptz '2024-01-01' + i * interval '3 seconds' + (i % 977) * interval '1 minute',
              case when i % 10 = 0 then 'gift wrap, leave at the door ' || i end
            from generate_series(1, {args.rows}) as i;"""], check=True)
        subprocess.run(psql + ["-d", "shop", "-c", "vacuum analyze orders"], check=True)
        print(f"loaded {args.rows:,} rows in {time.monotonic() - t:.1f} s", file=sys.stderr)
        want = subprocess.run(psql + ["-d", "shop", "-c", "select count(*), sum(id) from orders"],
                              check=True, capture_output=True, text=True).stdout.strip().split("|")
        want = (int(want[0]), int(want[1]))
        (d / "p.toml").write_text(f"""[pipeline]
name = "p1"
checkpoint_every = 0

[sources.orders]
format = "postgres"
url = {{ env = "PG_URL" }}
query = "{QUERY}"

[steps.load]
input = "orders"
output = {{ path = "out/weir" }}
""")
        (d / "by_copy.py").write_text(PSYCOPG_COPY)
        (d / "by_cursor.py").write_text(PSYCOPG_CURSOR)
        runners = {
            "copy-binary": lambda: timed(psql + ["-d", "shop", "-o", "/dev/null", "-c",
                                                 f"copy ({QUERY}) to stdout (format binary)"]),
            "weir": lambda: timed([weir, "run", "p.toml", "--force", "--quiet", "--no-progress"], cwd=d,
                                  env=dict(os.environ, PG_URL=url)),
            "psycopg-copy": lambda: timed([sys.executable, str(d / "by_copy.py"), url, str(d / "copy.parquet"), COLUMNS]),
            "psycopg-cursor": lambda: timed([sys.executable, str(d / "by_cursor.py"), url, str(d / "cursor.parquet"), COLUMNS]),
        }
        if args.weir_b:
            runners["weir-b"] = lambda: timed([args.weir_b, "run", "p.toml", "--force", "--quiet", "--no-progress"], cwd=d,
                                              env=dict(os.environ, PG_URL=url))
        wanted = {"copy-binary", *args.runners.split(","), *(["weir-b"] if args.weir_b else [])}
        runners = {n: go for n, go in runners.items() if n in wanted}
        outputs = {"weir": d / "out/weir", "weir-b": d / "out/weir", "psycopg-copy": d / "copy.parquet",
                   "psycopg-cursor": d / "cursor.parquet"}
        results = {name: [] for name in runners}
        for rnd in range(args.rounds):
            for name, go in runners.items():
                secs, rss = go()
                results[name].append((secs, rss))
                print(f"round {rnd + 1}: {name:15} {secs:7.2f} s  rss {rss:6.0f} MB", file=sys.stderr)
                if name in outputs:
                    t = pq.read_table(outputs[name], columns=["id"])
                    got = (t.num_rows, int(t.column("id").to_pandas().sum()))
                    if got != want:
                        raise SystemExit(f"{name}: read {got}, the table has {want}")
        best = {n: min(s for s, _ in r) for n, r in results.items()}
        limit = best["copy-binary"]
        print(f"\n| runner | best s (min-max of {args.rounds}) | rows/s | of COPY's rate | peak RSS MB |")
        print("|---|---:|---:|---:|---:|")
        for n, r in results.items():
            secs = [s for s, _ in r]
            print(f"| {n} | {best[n]:.2f} ({min(secs):.2f}-{max(secs):.2f}) | {args.rows / best[n]:,.0f} | "
                  f"{limit / best[n]:.2f} | {max(m for _, m in r):.0f} |")
    finally:
        server.terminate()
        server.wait()
