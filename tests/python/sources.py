"""Text sources as other readers see them: weir's output compared with pyarrow's and DuckDB's
reading of the same input.

Writes CSV files in the dialects users meet (a title before the header, Latin-1 text, a
byte-order mark, backslash escapes, quoted fields spanning lines, null markers) and the
same rows as JSON lines, plain and gzip, zstd or bzip2 compressed; runs each through
`weir run` (the binary in $WEIR_BIN) into Parquet; and checks the published rows equal
what pyarrow's CSV reader and DuckDB's read_csv / read_json make of the input.
"""
import bz2
import gzip
import json
import os
import pathlib
import subprocess
import tempfile

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))

ROWS = [
    (1, "Zoë", "café au lait", 2.5),
    (2, "Ægir", 'a "quoted" word', None),
    (3, "Łukasz", "two\nlines", -1.0),  # Ł is not Latin-1: only in the UTF-8 variants
    (4, "plain", "x", 0.0),
]


def csv_text(rows, escape):
    """The rows as CSV: quotes escaped by doubling, or by `escape`."""
    out = ["id,name,note,amount"]
    for i, name, note, amount in rows:
        q = note.replace('"', escape + '"' if escape else '""')
        out.append(f'{i},"{name}","{q}",{"" if amount is None else amount}')
    return "\n".join(out) + "\n"


def weir_table(d, name, source_toml, batch_size=None, run_env=None):
    """Run a one-step pipeline `name` reading `source_toml` into out/NAME: (process, table or None)."""
    batch = f"batch_size = {batch_size}\n" if batch_size else ""
    (d / "pipeline.toml").write_text(
        f"""[pipeline]
name = "{name}"
{batch}
[sources.input]
{source_toml}

[steps.s]
input = "input"
output = {{ path = "out/{name}" }}
"""
    )
    p = subprocess.run([weir, "run", "pipeline.toml", "--force", "--quiet"], cwd=d, env=run_env or env,
                       capture_output=True, text=True)
    return p, (ds.dataset(d / "out" / name, format="parquet").to_table() if p.returncode == 0 else None)


def step_summary(d, run_env=None):
    """Run pipeline.toml again with --json: its step's summary (skipped rows and counts), or {}."""
    r = subprocess.run([weir, "run", "pipeline.toml", "--force", "--json"], cwd=d, env=run_env or env,
                       capture_output=True, text=True)
    return json.loads(r.stdout)["steps"][0] if r.returncode == 0 else {}


def skipped_lines(d, run_env=None):
    return [s["line"] for s in step_summary(d, run_env).get("skipped", [])]


def read_in_blocks(d, name, src, run_env=None):
    """`src` read in batches of 100 rows: (process, table or None, its ids, the skipped lines)."""
    p, t = weir_table(d, name, src, batch_size=100, run_env=run_env)
    ids = t.column("id").to_pylist() if t is not None else []
    return p, t, ids, skipped_lines(d, run_env)


def run_weir(d, source_toml, name):
    schema = 'schema = { id = "int64", name = "string", note = "string", amount = "float64" }'
    p, t = weir_table(d, name, f"{source_toml}\n{schema}")
    if t is None:
        return None, p.stderr
    return sorted(zip(*(t.column(c).to_pylist() for c in ["id", "name", "note", "amount"]))), ""


def duck_rows(sql):
    con = duckdb.connect()
    return sorted(tuple(r) for r in con.execute(f"SELECT id, name, note, amount FROM {sql}").fetchall())


def pa_rows(path, **opts):
    read = pacsv.ReadOptions(**opts.get("read", {}))
    parse = pacsv.ParseOptions(newlines_in_values=True, **opts.get("parse", {}))
    conv = pacsv.ConvertOptions(
        column_types={"id": "int64", "name": "string", "note": "string", "amount": "float64"},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    t = pacsv.read_csv(str(path), read_options=read, parse_options=parse, convert_options=conv)
    return sorted(zip(*(t.column(c).to_pylist() for c in ["id", "name", "note", "amount"])))


def compare(label, weir_rows, err, *others):
    check(f"{label}: weir reads it", weir_rows is not None, err[-2000:])
    if weir_rows is None:
        return
    check(f"{label}: the rows are the input's", len(weir_rows) == len(others[0][1]), str(weir_rows))
    for reader, rows in others:
        check(f"{label}: weir equals {reader}", weir_rows == rows, f"\nweir:  {weir_rows}\n{reader}: {rows}")


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)

    # a title and a comment line before the header, Latin-1 bytes, backslash escapes
    latin = [r for r in ROWS if r[0] != 3]
    (d / "latin.csv").write_bytes(("Export of 2024-01-01\n# written by a legacy system\n" + csv_text(latin, "\\")).encode("latin-1"))
    rows, err = run_weir(d, 'format = "csv"\npath = "latin.csv"\nskip_rows = 2\nencoding = "latin1"\nescape = "\\\\"', "latin")
    compare(
        "latin1 + skip_rows + escape",
        rows,
        err,
        ("pyarrow", pa_rows(d / "latin.csv", read={"skip_rows": 2, "encoding": "latin1"}, parse={"escape_char": "\\"})),
        ("duckdb", duck_rows(f"read_csv('{d}/latin.csv', skip=2, encoding='latin-1', escape='\\', header=true, "
                             "columns={'id':'BIGINT','name':'VARCHAR','note':'VARCHAR','amount':'DOUBLE'})")),
    )

    # UTF-8 with a byte-order mark, quotes doubled, a field spanning two lines
    (d / "bom.csv").write_bytes(b"\xef\xbb\xbf" + csv_text(ROWS, None).encode())
    rows, err = run_weir(d, 'format = "csv"\npath = "bom.csv"', "bom")
    compare(
        "utf-8 with a BOM, multi-line field",
        rows,
        err,
        ("pyarrow", pa_rows(d / "bom.csv")),
        ("duckdb", duck_rows(f"read_csv('{d}/bom.csv', header=true, "
                             "columns={'id':'BIGINT','name':'VARCHAR','note':'VARCHAR','amount':'DOUBLE'})")),
    )

    # the same CSV compressed three ways (pyarrow and DuckDB know them by extension)
    text = csv_text(ROWS, None).encode()
    zst = pa.compress(text, codec="zstd", asbytes=True)
    for ext, data in [("gz", gzip.compress(text)), ("zst", zst), ("bz2", bz2.compress(text))]:
        (d / f"c.csv.{ext}").write_bytes(data)
        rows, err = run_weir(d, f'format = "csv"\npath = "c.csv.{ext}"', f"csv_{ext}")
        others = [("pyarrow", pa_rows(d / f"c.csv.{ext}"))]
        if ext != "bz2":  # DuckDB reads gzip and zstd, not bzip2
            others.append(("duckdb", duck_rows(f"read_csv('{d}/c.csv.{ext}', header=true, "
                                               "columns={'id':'BIGINT','name':'VARCHAR','note':'VARCHAR','amount':'DOUBLE'})")))
        compare(f"csv {ext}", rows, err, *others)

    # A folder of many files, plain and compressed (one zstd file of several frames, as
    # parallel compressors and appending writers make them), read in file order with the
    # next file read ahead: every row once and in order, skipped rows named by their own
    # file and line, in order; the same rows as DuckDB reading uncompressed copies
    many, plain = d / "many", d / "many-plain"
    many.mkdir()
    plain.mkdir()
    want_ids, want_skipped = [], []
    for f in range(12):
        rows = [f"{f * 1000 + r},n{f * 1000 + r},{r / 4}" for r in range(400)]
        if f in (3, 8):
            rows[17] = f"{f}x,bad,1"  # line 19: the header is line 1
        want_ids += [f * 1000 + r for r in range(400) if not (f in (3, 8) and r == 17)]
        text = ("id,name,amount\n" + "\n".join(rows) + "\n").encode()
        (plain / f"m{f:02d}.csv").write_bytes(text)
        name, data = [
            (f"m{f:02d}.csv", text),
            (f"m{f:02d}.csv.gz", gzip.compress(text)),
            # frames cut anywhere, even inside a line
            (f"m{f:02d}.csv.zst", b"".join(pa.compress(text[k:k + 1001], codec="zstd", asbytes=True)
                                           for k in range(0, len(text), 1001))),
            (f"m{f:02d}.csv.bz2", bz2.compress(text)),
        ][f % 4]
        (many / name).write_bytes(data)
        if f in (3, 8):
            want_skipped.append((name, 19))
    src = 'format = "csv"\npath = "many"\nschema = { id = "int64", name = "string", amount = "float64" }\non_error = "skip"'
    p, t = weir_table(d, "many", src, batch_size=64, run_env=dict(env, WEIR_READ_THREADS="4"))
    got_ids = t.column("id").to_pylist() if t is not None else []
    got_skipped = [(pathlib.Path(s["file"]).name, s["line"]) for s in step_summary(d).get("skipped", [])]
    check("many files, plain and compressed, read ahead: every row once, in file order",
          p.returncode == 0 and got_ids == want_ids,
          f"{p.stderr[-1000:]}\n{len(got_ids)} of {len(want_ids)} rows; first out of place at "
          f"{next((k for k, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b), None)}")
    check("many files read ahead: skipped rows named by their own file and line, in order",
          got_skipped == want_skipped, f"{got_skipped} / {want_skipped}")
    con = duckdb.connect()
    duck = con.execute(f"SELECT id, name, amount FROM read_csv('{plain}/*.csv', header=true, ignore_errors=true, "
                       "columns={'id':'BIGINT','name':'VARCHAR','amount':'DOUBLE'})").fetchall()
    got_rows = sorted(zip(*(t.column(c).to_pylist() for c in ["id", "name", "amount"]))) if t is not None else []
    check("many files read ahead: weir equals duckdb", got_rows == sorted(duck), f"{len(got_rows)} / {len(duck)}")

    # JSON lines: gzip-compressed, and Latin-1
    lines = "".join(json.dumps({"id": i, "name": n, "note": t, "amount": a}, ensure_ascii=False) + "\n" for i, n, t, a in ROWS)
    (d / "e.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    rows, err = run_weir(d, 'format = "jsonl"\npath = "e.jsonl.gz"', "jsonl_gz")
    compare(
        "jsonl gzip",
        rows,
        err,
        ("duckdb", duck_rows(f"read_json('{d}/e.jsonl.gz', format='newline_delimited', "
                             "columns={'id':'BIGINT','name':'VARCHAR','note':'VARCHAR','amount':'DOUBLE'})")),
    )
    latin_lines = "".join(json.dumps({"id": i, "name": n, "note": t, "amount": a}, ensure_ascii=False) + "\n" for i, n, t, a in latin)
    (d / "latin.jsonl").write_bytes(latin_lines.encode("latin-1"))
    rows, err = run_weir(d, 'format = "jsonl"\npath = "latin.jsonl"\nencoding = "latin1"', "jsonl_latin")
    # DuckDB reads JSON as UTF-8 only: compare with its reading of the same rows re-encoded
    (d / "latin-as-utf8.jsonl").write_text(latin_lines)
    compare(
        "jsonl latin1",
        rows,
        err,
        ("duckdb (utf-8 copy)", duck_rows(f"read_json('{d}/latin-as-utf8.jsonl', format='newline_delimited', "
                                         "columns={'id':'BIGINT','name':'VARCHAR','note':'VARCHAR','amount':'DOUBLE'})")),
    )

    # Avro object container files written by fastavro: logical types, optional, nested and
    # repeated fields, an enum; uncompressed, deflate and bzip2 blocks
    import datetime
    import decimal

    import fastavro

    schema = fastavro.parse_schema({
        "type": "record", "name": "Event", "fields": [
            {"name": "id", "type": "long"},
            {"name": "name", "type": ["null", "string"]},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
            {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
            {"name": "score", "type": ["null", "double"]},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "geo", "type": {"type": "record", "name": "Geo", "fields": [
                {"name": "lat", "type": "double"}, {"name": "lon", "type": "double"}]}},
        ]})
    utc = datetime.timezone.utc
    records = [
        {"id": i, "name": None if i % 4 == 0 else f"n{i}ü",
         "ts": datetime.datetime(2024, 1, 1, tzinfo=utc) + datetime.timedelta(seconds=i * 3601, microseconds=i),
         "day": datetime.date(2024, 1, 1) + datetime.timedelta(days=i % 40),
         "price": decimal.Decimal(i * 37 % 10000) / 100, "kind": "AB"[i % 2],
         "score": None if i % 5 == 0 else i / 8, "tags": [f"t{j}" for j in range(i % 3)],
         "geo": {"lat": i / 3, "lon": -i / 7}}
        for i in range(2500)
    ]

    def normal(v):
        """A value as both readers give it, in one form."""
        if isinstance(v, datetime.datetime):
            return int((v.replace(tzinfo=v.tzinfo or utc) - datetime.datetime(1970, 1, 1, tzinfo=utc)) / datetime.timedelta(microseconds=1))
        if isinstance(v, dict):
            return tuple(sorted((k, normal(x)) for k, x in v.items()))
        if isinstance(v, list):
            return tuple(normal(x) for x in v)
        return v

    cols = [f["name"] for f in schema["fields"]]
    for codec in ["null", "deflate", "bzip2"]:
        with open(d / f"ev-{codec}.avro", "wb") as f:
            fastavro.writer(f, schema, records, codec=codec, sync_interval=4000)
        p, t = weir_table(d, f"avro_{codec}", f'format = "avro"\npath = "ev-{codec}.avro"', batch_size=1000)
        check(f"avro {codec}: weir reads it", p.returncode == 0, p.stderr[-2000:])
        if t is None:
            continue
        got = sorted(tuple(normal(v) for v in row) for row in zip(*(t.column(c).to_pylist() for c in cols)))
        with open(d / f"ev-{codec}.avro", "rb") as f:
            want = sorted(tuple(normal(r[c]) for c in cols) for r in fastavro.reader(f))
        check(f"avro {codec}: weir equals fastavro", got == want, f"\nweir:     {got[:3]}\nfastavro: {want[:3]}")

    # Nested JSON lines: objects and arrays read as Arrow structs and lists where the schema
    # declares them, kept as JSON text in a string column, compared with pyarrow's JSON
    # reader (told the same types) and DuckDB's read_json
    import pyarrow.json as pajson

    nested = []
    for i in range(3000):
        row = {"id": i, "tags": None if i % 7 == 0 else [f"t{j}" for j in range(i % 4)],
               "geo": None if i % 11 == 0 else {"lat": i / 4, "city": {"name": f"c{i % 5}", "zip": None if i % 3 else i}},
               "scores": [[i, None], []] if i % 2 else [[1, 2, 3]],
               "raw": {"k": [i, "x"]} if i % 5 else [1, {"a": None}]}
        if i % 13 == 0:
            row.pop("geo")  # missing is null
        nested.append(row)
    (d / "nested.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in nested))
    nested_source = """format = "jsonl"
path = "nested.jsonl"
schema = { id = "int64", tags = "list<string>", geo = "struct<lat: float64, city: struct<name: string, zip: int64>>", scores = "list<list<int64>>", raw = "string" }"""
    p, t = weir_table(d, "nested", nested_source, batch_size=700)
    check("nested jsonl: weir reads it", p.returncode == 0, p.stderr[-2000:])
    if t is not None:
        cols = ["id", "tags", "geo", "scores", "raw"]
        check("nested jsonl: struct and list columns in Parquet",
              str(t.schema.field("geo").type).startswith("struct<lat: double, city: struct<name: string, zip: int64>>")
              and str(t.schema.field("scores").type) == "list<item: list<item: int64>>", str(t.schema))
        raw_got = sorted((r["id"], json.loads(r["raw"])) for r in t.select(["id", "raw"]).to_pylist())
        check("nested jsonl: a nested value in a string column is its JSON text",
              raw_got == sorted((r["id"], r["raw"]) for r in nested), str(raw_got[:3]))
        got = sorted(tuple(normal(v) for v in row) for row in zip(*(t.column(c).to_pylist() for c in cols[:4])))
        explicit = pa.schema([("id", pa.int64()), ("tags", pa.list_(pa.string())),
                              ("geo", pa.struct([("lat", pa.float64()), ("city", pa.struct([("name", pa.string()), ("zip", pa.int64())]))])),
                              ("scores", pa.list_(pa.list_(pa.int64())))])
        pt = pajson.read_json(d / "nested.jsonl", parse_options=pajson.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="ignore"))
        want = sorted(tuple(normal(v) for v in row) for row in zip(*(pt.column(c).to_pylist() for c in cols[:4])))
        check("nested jsonl: weir equals pyarrow", got == want, f"\nweir:    {got[:2]}\npyarrow: {want[:2]}")
        con = duckdb.connect()
        duck = con.execute(
            f"SELECT id, tags, geo, scores FROM read_json('{d}/nested.jsonl', format='newline_delimited', columns="
            "{'id':'BIGINT','tags':'VARCHAR[]','geo':'STRUCT(lat DOUBLE, city STRUCT(name VARCHAR, zip BIGINT))',"
            "'scores':'BIGINT[][]','raw':'JSON'})").fetchall()
        want = sorted(tuple(normal(v) for v in row) for row in duck)
        check("nested jsonl: weir equals duckdb", got == want, f"\nweir:   {got[:2]}\nduckdb: {want[:2]}")

    # a value that does not fit its nested type names the line, the column and the path in it
    (d / "bad-nested.jsonl").write_text('{"id":1,"geo":{"lat":1,"city":{"zip":5}}}\n{"id":2,"geo":{"lat":1,"city":{"zip":"x"}}}\n')
    (d / "pipeline.toml").write_text((d / "pipeline.toml").read_text().replace('path = "nested.jsonl"', 'path = "bad-nested.jsonl"'))
    p = subprocess.run([weir, "run", "pipeline.toml", "--force"], cwd=d, env=env, capture_output=True, text=True)
    check("nested jsonl: a bad nested value is refused with its line and path",
          p.returncode != 0 and "bad-nested.jsonl:2" in p.stderr and "geo" in p.stderr and ".city.zip" in p.stderr, p.stderr[-2000:])

    # Nested values go straight into their columns as they are read: a line that fails after
    # part of it was appended (a later field, a later column, bad JSON further on, a repeated
    # key) must leave nothing behind. The good lines of nested.jsonl with such lines between
    # them, skipped, read the same as nested.jsonl alone (pyarrow, as above).
    if t is not None:
        bad = [
            '{"id":-1,"tags":["a","b"],"geo":{"lat":1,"city":{"name":"c","zip":"notint"}}}',
            '{"id":-2,"scores":[[1],[2,"x"]],"tags":["kept?"]}',
            '{"id":-3,"geo":{"lat":2,"city":{"name":"n"}},"tags":["z"],"scores":[[7]],"id":"bad"}',
            '{"id":-4,"tags":["q"],"geo":{"lat":',
            '{"id":-5,"tags":["r"],"tags":"notalist","geo":{"lat":3}}',
            '{"id":-6,"geo":{"lat":4,"lat":"x"},"tags":["s"]}',
        ]
        mixed = []
        for i, row in enumerate(nested):
            mixed.append(json.dumps(row, ensure_ascii=False))
            if i % 7 == 3:
                mixed.append(bad[(i // 7) % len(bad)])
        (d / "nested-skip.jsonl").write_text("\n".join(mixed) + "\n")
        p, t2 = weir_table(d, "nested_skip", nested_source.replace('"nested.jsonl"', '"nested-skip.jsonl"') + '\non_error = "skip"', batch_size=700)
        got2 = sorted(tuple(normal(v) for v in row) for row in zip(*(t2.column(c).to_pylist() for c in cols[:4]))) if t2 is not None else []
        check("nested jsonl: lines failing after part of their nested values were read are skipped whole",
              p.returncode == 0 and got2 == got and len(got2) == len(nested),
              f"{p.stderr[-1000:]}\n{len(got2)} rows; first difference: {next((a for a, b in zip(got2, got) if a != b), None)}")
        n_skipped = step_summary(d).get("rows_skipped")
        check("nested jsonl: every bad line counted as skipped", n_skipped == len(mixed) - len(nested), f"{n_skipped} skipped")

    # JSON lines are decoded on two workers, in blocks (of batch_size lines here): rows come
    # out in the file's order, skipped lines are reported with their own numbers in order,
    # and with on_error = "fail" the error is the first bad line of the file, whichever
    # worker met a bad line first
    lines, want_ids = [], []
    for i in range(1, 2001):
        if i == 150:
            lines.append(b"{not json")
        elif i == 500:
            lines.append(b"")
        elif i == 777:
            lines.append(b'{"id": 777, "v": "\xff"}')
        elif i == 1999:
            lines.append(b'{"id": "x", "v": "mismatch"}')
        else:
            lines.append(f'{{"id": {i}, "v": "r{i}"}}'.encode())
            want_ids.append(i)
    (d / "blocks.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    src = 'format = "jsonl"\npath = "blocks.jsonl"\nschema = { id = "int64", v = "string" }\non_error = "skip"'
    p, t, ids, skipped = read_in_blocks(d, "blocks", src)
    check("JSON lines decoded in blocks on two workers: rows in the file's order, skipped lines by their own numbers",
          ids == want_ids and skipped == [150, 777, 1999], f"{len(ids)} rows, first out of order at "
          f"{next((k for k, (a, b) in enumerate(zip(ids, want_ids)) if a != b), None)}; skipped {skipped}")
    # the same lines as a zstd file of many frames (cut anywhere, as parallel compressors
    # and appending writers make them): streamed with 2 decoding threads, decompressed a
    # frame per thread with 4 (WEIR_READ_THREADS); the same rows and skipped line numbers
    raw = (d / "blocks.jsonl").read_bytes()
    (d / "blocks-frames.jsonl.zst").write_bytes(b"".join(
        pa.compress(raw[k:k + 3001], codec="zstd", asbytes=True) for k in range(0, len(raw), 3001)))
    for threads in ["2", "4"]:
        run_env = dict(env, WEIR_READ_THREADS=threads)
        p, t, ids, skipped = read_in_blocks(d, "blocks_frames", src.replace('"blocks.jsonl"', '"blocks-frames.jsonl.zst"'),
                                            run_env)
        check(f"JSON lines in a zstd file of many frames, {threads} threads: rows in order, skipped lines by their numbers",
              ids == want_ids and skipped == [150, 777, 1999], f"{p.stderr[-500:]}\n{len(ids)} rows; skipped {skipped}")
    p, t = weir_table(d, "blocks", src.replace('on_error = "skip"', 'on_error = "fail"'), batch_size=100)
    check("JSON lines in blocks: on_error = fail names the file's first bad line",
          p.returncode != 0 and "blocks.jsonl:150" in p.stderr, p.stderr[-500:])

    # CSV files are decoded on two workers too, in blocks of whole records (of batch_size
    # records here): a quoted field spanning lines keeps its record whole across a block's
    # edge, rows come out in the file's order, skipped records by the line they start on
    rows_text, want_ids, want_lines, line = [b"id,v"], [], [], 1
    for i in range(1, 1501):
        line += 1
        if i == 120:
            rows_text.append(b"120,a,extra")  # a field too many
            want_lines.append(line)
        elif i == 640:
            rows_text.append(b"640,\"\xff\"")  # not UTF-8
            want_lines.append(line)
        elif i == 1499:
            rows_text.append(b"x1499,v")  # not an int64
            want_lines.append(line)
        elif i % 100 == 0:
            rows_text.append(f'{i},"spans\nlines"'.encode())  # the record starts on `line`
            line += 1
            want_ids.append(i)
        else:
            rows_text.append(f"{i},r{i}".encode())
            want_ids.append(i)
    (d / "blocks.csv").write_bytes(b"\n".join(rows_text) + b"\n")
    src = 'format = "csv"\npath = "blocks.csv"\nschema = { id = "int64", v = "string" }\non_error = "skip"'
    p, t, ids, skipped = read_in_blocks(d, "csv_blocks", src)
    vs = t.column("v").to_pylist() if t is not None else []
    check("CSV decoded in blocks on two workers: rows in the file's order, skipped records by their own lines",
          ids == want_ids and skipped == want_lines and vs[want_ids.index(200)] == "spans\nlines",
          f"{p.stderr[-500:]}\n{len(ids)} rows; skipped {skipped}, want {want_lines}")
    p, t = weir_table(d, "csv_blocks", src.replace('on_error = "skip"', 'on_error = "fail"'), batch_size=100)
    check("CSV in blocks: on_error = fail names the file's first bad record",
          p.returncode != 0 and f"blocks.csv:{want_lines[0]}" in p.stderr and "expected 2 fields, found 3" in p.stderr,
          p.stderr[-500:])

finish("sources")
