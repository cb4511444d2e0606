"""Extractor plugins and their grants, end to end through `weir run`.

The first-party `http-json` extractor (a Wasm component built from source) reads a local
HTTP API that this test serves on 127.0.0.1: page-number, cursor and `Link` pagination,
a 503 and a 429 on the way (retried), a token the host adds to each granted request (the
plugin never holds it), data that changes between runs, a page that hangs (the plugin's
deadline stops it), and a kill -9 mid-read that `--resume` continues without reading the
finished pages again. A second server that is not granted gets no request at all. A
plugin that imports outgoing HTTP without `allowed_hosts` is refused at load, and folders
are granted read-only under /files/NAME.
"""
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pyarrow.parquet as pq

from netutil import wait_until
from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
plugin = root / "dist/plugins/http-json.wasm"
hostile = root / "dist/plugins/hostile.wasm"
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))
for k in ("WEIR_OPENLINEAGE_URL", "WEIR_PUSHGATEWAY_URL"):
    env.pop(k, None)
TOKEN = "tok-" + "s3cr3t" * 4


def item(i, version=0):
    return {
        "id": i,
        "title": f"issue {i} ✓" if i % 7 else None,
        "updated_at": f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
        "score": i / 4,
        "open": i % 2 == 0,
        "user": {"login": f"u{i % 5}"},
        "labels": ["a", "b"] if i % 3 == 0 else [],
        "version": version,
    }


class Api:
    """What the server serves and what it saw."""

    def __init__(self, n):
        self.items = [item(i) for i in range(1, n + 1)]
        self.requests = []  # (path with query, authorization header)
        self.fail_once = {}  # page number -> status to answer once
        self.hang_page = None  # page number whose request waits for `release`
        self.release = threading.Event()
        self.lock = threading.Lock()


def handler_for(api):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, status, body=None, headers=()):
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            u = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            with api.lock:
                api.requests.append((self.path, self.headers.get("authorization")))
                items = list(api.items)
            if self.headers.get("authorization") != f"Bearer {TOKEN}":
                return self.reply(401, {"error": "no token"})
            if u.path == "/missing":
                return self.reply(404, {"error": "not here"})
            since = q.get("updated_since")
            if since:
                items = [i for i in items if i["updated_at"] >= since]
            if u.path == "/pages":
                page, size = int(q.get("page", 1)), int(q.get("per_page", 10))
                if api.hang_page == page:
                    api.release.wait(60)
                    return self.reply(503, {"error": "released"})
                status = api.fail_once.pop(page, None)
                if status == 429:
                    return self.reply(429, {"error": "slow down"}, [("Retry-After", "0")])
                if status:
                    return self.reply(status, {"error": "try again"})
                return self.reply(200, {"items": items[(page - 1) * size: page * size]})
            if u.path == "/cursor":
                start = int(q.get("cursor") or 0)
                nxt = start + 12 if start + 12 < len(items) else None
                return self.reply(200, {"data": items[start:start + 12], "meta": {"next": nxt and str(nxt)}})
            if u.path == "/link":
                page = int(q.get("p", 1))
                links = []
                if page * 15 < len(items):
                    links = [("Link", f'</link?p={page + 1}>; rel="next", </link?p=99>; rel="last"')]
                return self.reply(200, items[(page - 1) * 15: page * 15], links)
            return self.reply(404, {"error": "unknown path"})

    return H


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up (the run was stopped) is expected here


def serve(api):
    server = Server(("127.0.0.1", 0), handler_for(api))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


SCHEMA = 'schema = { id = "int64", title = "string", updated_at = "timestamp", score = "float64", open = "bool", login = "string", labels = "string", version = "int64" }, paths = { login = "/user/login" }'


def pipeline(d, name, config, grants, plugin_extra="", step_extra=""):
    (d / f"{name}.toml").write_text(f"""[pipeline]
name = "{name}"
checkpoint_every = 1

[secrets]
api_token = {{ env = "API_TOKEN" }}

[plugins.api]
path = "{plugin}"
timeout_ms = 5000
{grants}
{plugin_extra}

[sources.issues]
plugin = "api"
config = {{ {config}, {SCHEMA} }}

[steps.load]
input = "issues"
output = {{ path = "out/{name}" }}
{step_extra}
""")
    return d / f"{name}.toml"


def run(d, *args, extra_env=None):
    e = dict(env, API_TOKEN=TOKEN, **(extra_env or {}))
    return subprocess.run([weir, *args], cwd=d, env=e, capture_output=True, text=True, timeout=300)


def rows(d, name):
    return sorted(pq.read_table(d / "out" / name).to_pylist(), key=lambda r: r["id"])


def expected(api):
    return [(i["id"], i["title"], i["score"], i["open"], i["user"]["login"], json.dumps(i["labels"], separators=(",", ":")), i["version"]) for i in api.items]


def got(rs):
    return [(r["id"], r["title"], r["score"], r["open"], r["login"], r["labels"], r["version"]) for r in rs]


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    api = Api(95)
    server = serve(api)
    other = Api(5)
    stranger = serve(other)
    base = f"http://127.0.0.1:{server.server_port}"
    granted = f'allowed_hosts = ["http://127.0.0.1:{server.server_port}"]\nheaders = {{ Authorization = {{ secret = "api_token", template = "Bearer {{}}" }} }}'
    try:
        # page numbers, with a 503 and a 429 answered once each on the way
        api.fail_once = {2: 503, 4: 429}
        p = pipeline(d, "pages", f'url = "{base}/pages", records = "/items", pagination = {{ kind = "page", param = "page", size_param = "per_page", size = 10 }}', granted)
        r = run(d, "run", p.name, "--json")
        check("a paginated API is read through the extractor", r.returncode == 0, r.stderr[-2000:])
        out = rows(d, "pages") if r.returncode == 0 else []
        check("every record arrives once, with its values", got(out) == expected(api), str(got(out)[:3]))
        ts = out[0]["updated_at"] if out else None
        check("timestamps are read as UTC timestamps", ts is not None and ts.isoformat().startswith("2026-01-02T01:00:00"), str(ts))
        check("the host added the token to every granted request", api.requests and all(a == f"Bearer {TOKEN}" for _, a in api.requests), str(api.requests[:3]))
        check("the token is in no log line", TOKEN not in r.stderr and TOKEN not in r.stdout)
        pages = [path for path, _ in api.requests]
        check("the 503 and the 429 were retried (pages 2 and 4 asked twice)",
              sum("page=2" in x for x in pages) == 2 and sum("page=4" in x for x in pages) == 2, str(pages))
        summary = json.loads(r.stdout) if r.returncode == 0 else {}
        counters = summary.get("steps", [{}])[0].get("counters", {}).get("api", {})
        check("retries and requests are counted", counters.get("http_retries") == 2 and counters.get("http_429") == 1
              and counters.get("http_5xx") == 1 and counters.get("http_requests_sent") == len(api.requests), f"{counters} vs {len(api.requests)}")

        # the data changes: the next run reads it again (an API is never "up to date")
        api.items[3] = item(4, version=2)
        api.items.append(item(96))
        api.requests.clear()
        r = run(d, "run", p.name)
        check("a changed API is read again, changes included", r.returncode == 0 and got(rows(d, "pages")) == expected(api), r.stderr[-1000:])

        # incremental: the committed watermark goes to the API as `updated_since`; merged by key
        p = pipeline(d, "inc", f'url = "{base}/pages", records = "/items", pagination = {{ kind = "page", size_param = "per_page", size = 10 }}, incremental = {{ param = "updated_since", column = "updated_at" }}', granted)
        text = (d / "inc.toml").read_text()
        text = text.replace('plugin = "api"\n', 'plugin = "api"\nincremental = { column = "updated_at" }\n')
        text = text.replace('output = { path = "out/inc" }', 'output = { path = "out/inc", mode = "merge", key = ["id"] }')
        (d / "inc.toml").write_text(text)
        api.requests.clear()
        r = run(d, "run", "inc.toml", "--json")
        first = [x for x, _ in api.requests]
        check("a first incremental read asks for everything", r.returncode == 0 and not any("updated_since" in x for x in first)
              and got(rows(d, "inc")) == expected(api), r.stderr[-800:])
        newest = max(i["updated_at"] for i in api.items)
        api.items[9] = dict(item(10, version=3), updated_at="2026-02-01T00:00:00Z")
        api.requests.clear()
        r = run(d, "run", "inc.toml", "--json")
        asked = [x for x, _ in api.requests]
        read = json.loads(r.stdout)["steps"][0]["rows_read"] if r.returncode == 0 else -1
        since = [parse_qs(urlparse(x).query).get("updated_since", [""])[0] for x in asked]
        check("the next read asks from the committed watermark and reads only what changed",
              r.returncode == 0 and since and all(s.startswith(newest[:19]) for s in since) and read < 10, f"{since} {read} {r.stderr[-500:]}")
        check("merged by key, the table equals the API's records", got(rows(d, "inc")) == expected(api), str(got(rows(d, "inc"))[:3]))

        # cursor and Link pagination read the same records
        p = pipeline(d, "cursor", f'url = "{base}/cursor", records = "/data", pagination = {{ kind = "cursor", param = "cursor", next = "/meta/next" }}', granted)
        r = run(d, "run", p.name)
        check("cursor pagination", r.returncode == 0 and got(rows(d, "cursor")) == expected(api), r.stderr[-1000:])
        p = pipeline(d, "link", f'url = "{base}/link"', granted + "", "", "")
        (d / "link.toml").write_text((d / "link.toml").read_text().replace(f'url = "{base}/link"', f'url = "{base}/link", pagination = {{ kind = "link" }}'))
        r = run(d, "run", "link.toml")
        check("Link: rel=\"next\" pagination", r.returncode == 0 and got(rows(d, "link")) == expected(api), r.stderr[-1000:])

        # a 4xx other than 429 fails at once, naming status and URL
        api.requests.clear()
        p = pipeline(d, "missing", f'url = "{base}/missing"', granted)
        r = run(d, "run", p.name)
        check("a 404 fails clearly, not retried", r.returncode == 1 and "HTTP 404" in r.stderr and "/missing" in r.stderr and len(api.requests) == 1, r.stderr[-800:])

        # an origin that is not granted: refused in the host, before any connection
        p = pipeline(d, "stranger", f'url = "http://127.0.0.1:{stranger.server_port}/pages", records = "/items"', granted)
        r = run(d, "run", p.name)
        check("a request to an origin not granted is refused", r.returncode == 1 and "allowed_hosts" in r.stderr, r.stderr[-800:])
        check("weir's log names the plugin, the method and the URL",
              f"plugin `api`: refused GET http://127.0.0.1:{stranger.server_port}/pages" in r.stderr, r.stderr[-800:])
        check("the server that is not granted got no request", other.requests == [], str(other.requests))

        # outgoing HTTP without a grant: refused at load, naming the grant
        p = pipeline(d, "nogrant", f'url = "{base}/pages", records = "/items"', "")
        r = run(d, "run", p.name)
        check("a plugin importing wasi:http without allowed_hosts is refused at load",
              r.returncode == 1 and "allowed_hosts" in r.stderr and "wasi:http" in r.stderr and "[plugins.api]" in r.stderr, r.stderr[-800:])
        r = run(d, "validate", p.name)
        check("weir validate says so too", r.returncode != 0 and "allowed_hosts" in r.stderr, r.stderr[-800:])
        (d / "asxform.toml").write_text(f"""[pipeline]
name = "asxform"

[plugins.api]
path = "{plugin}"
allowed_hosts = ["https://example.invalid"]

[sources.in]
format = "csv"
path = "in.csv"

[steps.s]
input = "in"
transforms = [{{ plugin = "api" }}]
output = {{ path = "out/asxform" }}
""")
        r = run(d, "validate", "asxform.toml")
        check("an extractor used as a transform is named by weir validate", r.returncode != 0 and "its world is `extractor`, but a step uses it as a transform" in r.stderr, r.stderr[-800:])

        # grants are validated with their line
        p = pipeline(d, "badgrant", f'url = "{base}/pages"', 'allowed_hosts = ["api.example.com/v1"]\nheaders = { Authorization = { secret = "nope" } }')
        r = run(d, "validate", p.name)
        check("a malformed origin and an undeclared secret are refused at their line",
              r.returncode != 0 and "badgrant.toml:11:" in r.stderr and "badgrant.toml:12:" in r.stderr and "allowed_hosts" in r.stderr and "`nope`" in r.stderr, r.stderr)

        # a page that hangs: the plugin's deadline stops it, nothing is published
        api.hang_page = 3
        p = pipeline(d, "hang", f'url = "{base}/pages", records = "/items", pagination = {{ kind = "page", size_param = "per_page", size = 10 }}', granted)
        (d / "hang.toml").write_text((d / "hang.toml").read_text().replace("timeout_ms = 5000", "timeout_ms = 1500"))
        r = run(d, "run", p.name)
        check("an API that does not answer is cut off at the plugin's deadline",
              r.returncode == 1 and ("deadline" in r.stderr or "timeout" in r.stderr.lower()) and not (d / "out/hang").exists(), r.stderr[-800:])
        api.release.set()

        # kill -9 mid-read, then --resume: finished pages are not read again
        api.release = threading.Event()
        api.hang_page = 6
        api.requests.clear()
        p = pipeline(d, "resume", f'url = "{base}/pages", records = "/items", pagination = {{ kind = "page", size_param = "per_page", size = 10 }}', granted)
        (d / "resume.toml").write_text((d / "resume.toml").read_text().replace("timeout_ms = 5000", "timeout_ms = 60000"))
        proc = subprocess.Popen([weir, "run", "resume.toml"], cwd=d, env=dict(env, API_TOKEN=TOKEN), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def checkpointed():
            try:
                with sqlite3.connect(d / ".weir/state.db") as db:
                    row = db.execute("select c.data_json from checkpoint c join pipeline_run r on r.id = c.run_id where r.pipeline = 'resume'").fetchone()
                return row and json.loads(row[0]).get("batches", 0) >= 5
            except sqlite3.Error:
                return False

        wait_until("page 6 asked", lambda: any("page=6" in x for x, _ in api.requests), 60)
        wait_until("a checkpoint after page 5", checkpointed, 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        api.hang_page = None
        api.release.set()
        api.requests.clear()
        r = run(d, "run", "resume.toml", "--resume")
        asked = [x for x, _ in api.requests]
        check("--resume continues an extractor from its checkpointed page", r.returncode == 0 and asked and "page=6" in asked[0], f"{asked} {r.stderr[-800:]}")
        check("pages read before the checkpoint are not asked again", not any(f"page={n}&" in x or x.endswith(f"page={n}") for x in asked for n in range(1, 6)), str(asked))
        check("the resumed output equals one full read (nothing lost, nothing twice)", r.returncode == 0 and got(rows(d, "resume")) == expected(api), r.stderr[-500:])
    finally:
        api.release.set()
        server.shutdown()
        stranger.shutdown()

    # folders granted read-only, seen under /files/NAME; nothing else exists for the plugin
    land = d / "landing"
    land.mkdir()
    (land / "note.txt").write_text("hello from the landing zone")
    (d / "in.csv").write_text("x\n1\n")

    def files_pipeline(mode, path, grant):
        (d / "files.toml").write_text(f"""[pipeline]
name = "files"

[plugins.h]
path = "{hostile}"
{grant}

[sources.in]
format = "csv"
path = "in.csv"

[steps.s]
input = "in"
transforms = [{{ plugin = "h", config = {{ mode = "{mode}", path = "{path}" }} }}]
output = {{ path = "out/files" }}
""")
        return run(d, "run", "files.toml", "--force")

    r = files_pipeline("read_file", "/files/landing/note.txt", 'files = [{ path = "landing", read_only = true }]')
    check("a granted folder is readable under /files/NAME", "hello from the landing zone" in r.stderr, r.stderr[-600:])
    r = files_pipeline("write_file", "/files/landing/new.txt", 'files = [{ path = "landing" }]')
    check("a granted folder is read-only", "could not write" in r.stderr and not (land / "new.txt").exists(), r.stderr[-600:])
    r = files_pipeline("read_file", "/files/landing/note.txt", "")
    check("without the grant the folder does not exist for the plugin", "could not read" in r.stderr, r.stderr[-600:])
    r = files_pipeline("read_file", "/files/landing/../../etc/passwd", 'files = [{ path = "landing" }]')
    check("`..` does not lead out of a granted folder", "could not read" in r.stderr and "SANDBOX ESCAPE" not in r.stderr, r.stderr[-600:])
    r = files_pipeline("read_file", "/x", 'files = [{ path = "landing", read_only = false }]')
    check("a writable folder cannot be granted", r.returncode != 0 and "only read-only folders" in r.stderr, r.stderr[-600:])

    # a hostile extractor: the deadline, memory cap and output budgets hold as for transforms
    hostile_x = root / "dist/plugins/hostile-extractor.wasm"

    def hostile_run(mode, plugin_extra="", url=""):
        (d / "hx.toml").write_text(f"""[pipeline]
name = "hx"

[plugins.x]
path = "{hostile_x}"
timeout_ms = 1000
memory_mb = 32
allowed_hosts = ["https://example.invalid"]
{plugin_extra}

[sources.s]
plugin = "x"
config = {{ mode = "{mode}", url = "{url}" }}

[steps.load]
input = "s"
output = {{ path = "out/hx" }}
""")
        return run(d, "run", "hx.toml", "--force", "--json")

    r = hostile_run("fine")
    check("a well-behaved extractor's batches are published", r.returncode == 0 and pq.read_table(d / "out/hx").num_rows == 3, r.stderr[-500:])
    for mode, extra, words in [
        ("loop", "", ["deadline"]),
        ("memory", "", ["memory"]),
        ("big_position", "", ["position", "bytes"]),
        ("many_rows", "max_output_rows = 10", ["max_output_rows"]),
        ("panic", "", ["trapped", "panics on purpose"]),
        ("schema_lie", "", ["schema"]),
        ("env", "", ["no HOME in the sandbox"]),
    ]:
        r = hostile_run(mode, extra)
        check(f"hostile extractor `{mode}` fails the run cleanly, saying why",
              r.returncode == 1 and all(w in r.stderr for w in words) and "SANDBOX ESCAPE" not in r.stderr,
              r.stderr[-600:])
    r = hostile_run("http_flood", "", "http://127.0.0.1:9/x")
    refusals = r.stderr.count("refused GET")
    check("1000 refused requests: every one refused, the log names only the first 20",
          r.returncode == 1 and "1000 of 1000 requests refused" in r.stderr and refusals == 20 and "further refusals are only counted" in r.stderr,
          f"{refusals} {r.stderr[-600:]}")

finish("extract")
