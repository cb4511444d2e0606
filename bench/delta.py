"""Delta Lake benchmarks: D1, the W1 events table written as a Delta table; D2, a merge of 1%
changed rows into it.

    WEIR_BIN=target/release/weir python bench/delta.py --rows 10000000 --rounds 3

Needs the `deltalake` package (scripts/python-env.sh delta makes a virtualenv with it) and
the mask plugin (scripts/build-plugins.sh). Runners, each a process of its own, timed
wall-clock with their peak RSS (VmHWM, read every 20 ms):

D1 (N events: PII masked by the mask plugin, as W1):
- `weir-parquet`: `weir run` into a Parquet folder, the baseline (the Delta commit's cost
  is the difference);
- `weir-delta`: the same pipeline with `format = "delta"`;
- `deltalake-py`: the Python `deltalake` package writing the same batches (weir's masked
  output read with pyarrow) with `write_deltalake`.

D2 (1% of the rows changed, merged by `event_id` into a copy of D1's table):
- `weir-merge`: `mode = "merge"` with `key = ["event_id"]`;
- `deltalake-merge`: `DeltaTable.merge(...).when_matched_update_all()
  .when_not_matched_insert_all()`.

Every result is checked: row counts and the sum of `amount` equal across runners. Results
go to stdout as Markdown tables with the ratio to the baseline.
"""
import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

import deltalake
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from procstats import timed

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=10_000_000)
ap.add_argument("--rounds", type=int, default=3)
args = ap.parse_args()
weir = os.environ.get("WEIR_BIN", "target/release/weir")
root = pathlib.Path(__file__).resolve().parents[1]
mask = root / "dist/plugins/mask.wasm"
if not mask.exists():
    raise SystemExit(f"{mask} is missing: run scripts/build-plugins.sh")


def generate(path, n):
    """The W1 events table: ids, an email and a name to mask, a country, amounts."""
    ids = pa.array(range(n), pa.int64())

    def mod(m):
        return pc.subtract(ids, pc.multiply(pc.divide(ids, m), m))

    def text(prefix, m):
        return pc.binary_join_element_wise(prefix, pc.cast(mod(m), pa.string()), "")

    t = pa.table({
        "event_id": ids,
        "user_id": pc.divide(ids, 7),
        "email": pc.binary_join_element_wise(text("user", 100003), "example.com", "@"),
        "name": text("Name ", 9973),
        "country": text("C", 60),
        "category": pc.cast(mod(20), pa.int32()),
        "amount": pc.divide(pc.cast(pc.multiply(ids, 37), pa.float64()), 100.0),
        "flag": pc.equal(mod(3), 0),
    })
    pq.write_table(t, path, compression="zstd", row_group_size=1 << 20)


PIPE = """[pipeline]
name = "{name}"
checkpoint_every = 0

[secrets]
key = {{ file = "key.txt" }}

[plugins.mask]
path = "{mask}"
secrets = ["key"]

[sources.events]
format = "parquet"
path = "{input}"

[steps.out]
input = "events"
output = {{ {output} }}
{transforms}
"""
MASK = """[[steps.out.transforms]]
plugin = "mask"
config.columns = { email = { method = "hmac", secret = "key" }, name = { method = "null" } }
"""

D1_PY = """
import sys, pyarrow.parquet as pq, deltalake
deltalake.write_deltalake(sys.argv[2], pq.read_table(sys.argv[1]))
"""
D2_PY = """
import sys, pyarrow.parquet as pq, deltalake
dt = deltalake.DeltaTable(sys.argv[1])
(dt.merge(pq.read_table(sys.argv[2]), predicate="t.event_id = s.event_id", source_alias="s", target_alias="t")
   .when_matched_update_all().when_not_matched_insert_all().execute())
"""


def totals(path):
    t = deltalake.DeltaTable(str(path)).to_pyarrow_table(columns=["amount"]) if (path / "_delta_log").exists() \
        else pq.read_table(path, columns=["amount"])
    # in cents, as integers: a float sum depends on the order rows are added in
    return t.num_rows, pc.sum(pc.round(pc.multiply(t["amount"], 100.0)).cast(pa.int64())).as_py()


def report(title, results, base):
    print(f"\n### {title}\n")
    print("| runner | median s | rounds | ratio to " + base + " | peak RSS MB |")
    print("|---|---|---|---|---|")
    b = statistics.median(results[base][0])
    for name, (secs, rss) in results.items():
        m = statistics.median(secs)
        print(f"| {name} | {m:.2f} | {' / '.join(f'{s:.2f}' for s in secs)} | {m / b:.2f} | {max(rss):.0f} |")


with tempfile.TemporaryDirectory(dir=os.environ.get("WEIR_BENCH_DIR")) as tmp:
    d = pathlib.Path(tmp)
    (d / "key.txt").write_text("0123456789abcdef0123456789abcdef")
    print(f"generating {args.rows} events...", file=sys.stderr)
    generate(d / "events.parquet", args.rows)
    env = dict(os.environ, WEIR_CACHE_DIR=str(d / "cache"))
    r1 = {"weir-parquet": ([], []), "weir-delta": ([], []), "deltalake-py": ([], [])}
    # one untimed run first: the mask plugin is compiled into weir's cache once
    (d / "warm.toml").write_text(PIPE.format(name="warm", input=d / "events.parquet", mask=mask,
                                             output=f'path = "{d / "warm"}"', transforms=MASK))
    timed([weir, "run", str(d / "warm.toml"), "--quiet"], env=env, cwd=d, stdout=subprocess.DEVNULL)
    for rnd in range(args.rounds):
        for name in r1:
            out = d / f"{name}-{rnd}"
            if name == "deltalake-py":
                cmd = [sys.executable, "-c", D1_PY, str(d / f"weir-parquet-{rnd}"), str(out)]
            else:
                fmt = 'format = "delta", ' if name == "weir-delta" else ""
                (d / f"{name}.toml").write_text(PIPE.format(name=name.replace("-", "_"), input=d / "events.parquet", mask=mask,
                                                            output=f'{fmt}path = "{out}"', transforms=MASK))
                cmd = [weir, "run", str(d / f"{name}.toml"), "--quiet"]
            secs, rss = timed(cmd, env=env, cwd=d, stdout=subprocess.DEVNULL)
            r1[name][0].append(secs)
            r1[name][1].append(rss)
    want = totals(d / "weir-parquet-0")
    for name in r1:
        got = totals(d / f"{name}-0")
        if got != want:
            raise SystemExit(f"D1: {name} holds {got}, weir-parquet {want}")
    report(f"D1: {args.rows:,} events masked and written (rows and sum of amount equal across runners)", r1, "weir-parquet")

    # D2: 1% of the rows changed (amount + 1), merged by key into a copy of the table
    base = d / "weir-delta-0"
    table = deltalake.DeltaTable(str(base)).to_pyarrow_table()
    step = 100
    changes = table.take(pa.array(range(0, table.num_rows, step)))
    changes = changes.set_column(changes.schema.get_field_index("amount"), "amount", pc.add(changes["amount"], 1.0))
    pq.write_table(changes, d / "changes.parquet")
    r2 = {"weir-merge": ([], []), "deltalake-merge": ([], [])}
    for rnd in range(args.rounds):
        for name in r2:
            out = d / f"{name}-{rnd}"
            shutil.copytree(base, out)
            if name == "deltalake-merge":
                cmd = [sys.executable, "-c", D2_PY, str(out), str(d / "changes.parquet")]
            else:
                (d / "merge.toml").write_text(PIPE.format(name="merge", input=d / "changes.parquet", mask=mask,
                                                          output=f'format = "delta", path = "{out}", mode = "merge", key = ["event_id"]',
                                                          transforms=""))
                cmd = [weir, "run", str(d / "merge.toml"), "--quiet", "--force"]
            secs, rss = timed(cmd, env=env, cwd=d, stdout=subprocess.DEVNULL)
            r2[name][0].append(secs)
            r2[name][1].append(rss)
    want = totals(d / "deltalake-merge-0")
    got = totals(d / "weir-merge-0")
    if got != want:
        raise SystemExit(f"D2: weir-merge holds {got}, deltalake-merge {want}")
    report(f"D2: {changes.num_rows:,} changed rows ({100 / step:.0f}%) merged into {table.num_rows:,}", r2, "deltalake-merge")
