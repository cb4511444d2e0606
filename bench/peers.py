"""The peer runners of weir-bench: each workload as a data engineer would write it.

    python peers.py TOOL WORKLOAD INPUT OUTPUT [COMPRESSION]
    TOOL: duckdb | duckdb-sha256 | polars | pandas     WORKLOAD: W1 | W2 | W3 | W4 | I1 | I2 | I3 | I4 | I5
    COMPRESSION: zstd(N) (default zstd(1)) | snappy | none, as weir-bench --compression

DuckDB is limited to 2 threads, Polars by POLARS_MAX_THREADS=2 (set by the harness);
pandas is single-threaded. W1's HMAC is a Python function (a UDF for DuckDB), as users
would write it; duckdb-sha256 uses DuckDB's built-in sha256 (the nearest built-in; not the
same output, so not compared). The ingest workloads (I1 CSV, I2 JSON lines, I3 gzip CSV,
I5 gzip JSON lines)
read the raw file with the events columns declared, as weir is told them, and write Parquet
(I4: nested JSON lines, a `user` struct and a `tags` list).
"""
import hashlib
import hmac
import sys

KEY = b"bench-key"
COUNTRIES = [f"C{c:03d}" for c in range(100)]


def codec(text):
    """(name, level) for the output: ("zstd", N), ("snappy", None) or ("none", None)."""
    text = text.strip().lower()
    if text in ("snappy", "none"):
        return text, None
    if text == "zstd":
        return "zstd", 1
    if text.startswith("zstd(") and text.endswith(")") and text[5:-1].isdigit() and 1 <= int(text[5:-1]) <= 22:
        return "zstd", int(text[5:-1])
    sys.exit(f"unknown compression {text!r}: use zstd(N) with N from 1 to 22, snappy or none")


CODEC = ("zstd", 1)


def hmac_hex(s):
    return None if s is None else hmac.new(KEY, s.encode(), hashlib.sha256).hexdigest()


# the events table's columns, declared to every ingest runner
EVENTS = [("event_id", "BIGINT", "Int64"), ("user_id", "BIGINT", "Int64"), ("email", "VARCHAR", "String"),
          ("name", "VARCHAR", "String"), ("country", "VARCHAR", "String"), ("category", "INTEGER", "Int32"),
          ("amount", "DOUBLE", "Float64"), ("ts", "VARCHAR", "String"), ("flag", "BOOLEAN", "Boolean")]


def run_duckdb(w, src, out, builtin_sha=False):
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    t = f"read_parquet('{src}')"
    columns = "{" + ", ".join(f"'{n}': '{d}'" for n, d, _ in EVENTS) + "}"
    if w in ("I1", "I3"):
        q = f"SELECT * FROM read_csv('{src}', header = true, columns = {columns})"
    elif w in ("I2", "I5"):
        q = f"SELECT * FROM read_json('{src}', format = 'newline_delimited', columns = {columns})"
    elif w == "I4":
        nested = ("{'event_id': 'BIGINT', 'user': 'STRUCT(id BIGINT, email VARCHAR, name VARCHAR)', "
                  "'tags': 'VARCHAR[]', 'amount': 'DOUBLE', 'ts': 'VARCHAR'}")
        q = f"SELECT * FROM read_json('{src}', format = 'newline_delimited', columns = {nested})"
    elif w == "W1":
        if builtin_sha:
            email = "sha256(email)"
        else:
            from duckdb.sqltypes import VARCHAR

            con.create_function("hmac_hex", hmac_hex, [VARCHAR], VARCHAR)
            email = "hmac_hex(email)"
        q = f"SELECT event_id, user_id, {email} AS email, NULL::VARCHAR AS name, country, category, amount, ts, flag FROM {t}"
    elif w == "W2":
        inlist = ", ".join(f"'{c}'" for c in COUNTRIES)
        q = (f"SELECT event_id, user_id, country, CAST(category AS BIGINT) AS category, amount, "
             f"CAST(ts AS TIMESTAMP) AS ts FROM {t} WHERE amount > 400 AND country IN ({inlist})")
    elif w == "W3":
        q = (f"SELECT * EXCLUDE (file_row_number) FROM read_parquet('{src}', file_row_number = true) "
             f"QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY file_row_number) = 1")
    else:
        q = f"SELECT user_id, sum(amount) AS amount_sum, count(*) AS n, avg(amount) AS amount_avg FROM {t} GROUP BY user_id"
    name, level = CODEC
    options = {"zstd": f"COMPRESSION zstd, COMPRESSION_LEVEL {level}", "snappy": "COMPRESSION snappy",
               "none": "COMPRESSION uncompressed"}[name]
    con.execute(f"COPY ({q}) TO '{out}' (FORMAT parquet, {options})")


def run_polars(w, src, out):
    import polars as pl

    schema = {n: getattr(pl, p) for n, _, p in EVENTS}
    if w in ("I1", "I3"):
        df = pl.read_csv(src, schema=schema)
    elif w in ("I2", "I5"):
        df = pl.read_ndjson(src, schema=schema)
    elif w == "I4":
        df = pl.read_ndjson(src, schema={
            "event_id": pl.Int64, "user": pl.Struct({"id": pl.Int64, "email": pl.String, "name": pl.String}),
            "tags": pl.List(pl.String), "amount": pl.Float64, "ts": pl.String})
    else:
        df = pl.read_parquet(src)
    if w.startswith("I"):
        pass  # ingest: the table as read
    elif w == "W1":
        df = df.with_columns(
            pl.col("email").map_elements(hmac_hex, return_dtype=pl.String),
            pl.lit(None, dtype=pl.String).alias("name"),
        )
    elif w == "W2":
        df = df.filter((pl.col("amount") > 400) & pl.col("country").is_in(COUNTRIES)).select(
            "event_id", "user_id", "country", pl.col("category").cast(pl.Int64), "amount",
            pl.col("ts").str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S"),
        )
    elif w == "W3":
        df = df.unique(subset=["event_id"], keep="first", maintain_order=True)
    else:
        df = df.group_by("user_id").agg(
            pl.col("amount").sum().alias("amount_sum"), pl.len().cast(pl.Int64).alias("n"), pl.col("amount").mean().alias("amount_avg")
        )
    name, level = CODEC
    df.write_parquet(out, compression="uncompressed" if name == "none" else name, compression_level=level)


def run_pandas(w, src, out):
    import pandas as pd

    df = pd.read_parquet(src)
    if w == "W1":
        df["email"] = df["email"].map(hmac_hex)
        df["name"] = pd.Series([None] * len(df), dtype="string")
    elif w == "W2":
        df = df[(df["amount"] > 400) & df["country"].isin(COUNTRIES)]
        df = pd.DataFrame({
            "event_id": df["event_id"], "user_id": df["user_id"], "country": df["country"],
            "category": df["category"].astype("int64"), "amount": df["amount"],
            "ts": pd.to_datetime(df["ts"], format="%Y-%m-%dT%H:%M:%S"),
        })
    elif w == "W3":
        df = df.drop_duplicates(subset=["event_id"], keep="first")
    else:
        g = df.groupby("user_id", sort=False)["amount"]
        df = pd.DataFrame({"amount_sum": g.sum(), "n": g.size().astype("int64"), "amount_avg": g.mean()}).reset_index()
    name, level = CODEC
    df.to_parquet(out, index=False, compression=None if name == "none" else name, compression_level=level)


if __name__ == "__main__":
    tool, w, src, out = sys.argv[1:5]
    if len(sys.argv) > 5:
        CODEC = codec(sys.argv[5])
    if tool == "duckdb":
        run_duckdb(w, src, out)
    elif tool == "duckdb-sha256":
        run_duckdb(w, src, out, builtin_sha=True)
    elif tool == "polars":
        run_polars(w, src, out)
    elif tool == "pandas":
        run_pandas(w, src, out)
    else:
        sys.exit(f"unknown tool {tool}")
