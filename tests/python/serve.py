"""`weir serve`, used as an orchestrator and an operator would: a real HTTP client against a
server on 127.0.0.1 (port chosen by the server), every endpoint of its OpenAPI document
exercised, the document itself validated as OpenAPI 3.1, runs shared with the CLI, a
plugin that traps or is killed, cancel, external checks, backfills, lineage, /metrics
scraped by a real Prometheus with a bearer token, and a restart after kill -9.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from openapi_spec_validator import validate

from netutil import free_port, get, wait_until
from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))
for k in ("WEIR_OPENLINEAGE_URL", "WEIR_PUSHGATEWAY_URL", "WEIR_SERVE_TOKEN", "WEIR_DEBUG_PAUSE"):
    env.pop(k, None)
TOKEN = "test-token-0123456789abcdef"
hostile = "plugins/hostile.wasm"  # copied under the root: plugins outside it are refused

ORDERS = """[pipeline]
name = "orders"
batch_size = 2

[sources.raw]
format = "csv"
path = "in/{partition}.csv"

[steps.clean]
input = "raw"
output = { path = "out/clean", partition_by = "day" }

[[steps.clean.checks]]
check = "not_null"
column = "id"
"""


def hostile_pipeline(name, mode, extra="", state=""):
    return f"""[pipeline]
name = "{name}"
batch_size = 2
{state}

[sources.raw]
format = "csv"
path = "in/{{partition}}.csv"

[plugins.hostile]
path = "{hostile}"
{extra}

[steps.s]
input = "raw"
output = {{ path = "out/{name}", partition_by = "day" }}

[[steps.s.transforms]]
plugin = "hostile"
config = {{ mode = "{mode}", sleep_ms = 300 }}
"""


called = set()  # (method, path template) of every request made, to compare with the document


class Server:
    def __init__(self, d, *args, token_file=True):
        tokens = ["--token-file", str(d / "tokens")] if token_file else []
        self.proc = subprocess.Popen(
            [weir, "serve", "--root", str(d), "--listen", "127.0.0.1:0", *tokens, *args],
            cwd=d, env=env, stdout=subprocess.PIPE, stderr=(d / "serve.log").open("a"), text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"weir serve did not start: {line!r}\n{(d / 'serve.log').read_text()}")
        self.base = line.split()[-1]

    def call(self, method, path, body=None, template=None, token=TOKEN, raw=False):
        called.add((method.lower(), template or path.split("?")[0]))
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read().decode()
                return r.status, (text if raw else json.loads(text))
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, text

    def wait_run(self, run_id, done=("SUCCESS", "FAILED", "CANCELLED")):
        def ended():
            status, r = self.call("GET", f"/runs/{run_id}", template="/runs/{id}")
            return r if status == 200 and r["status"] in done else None
        return wait_until(f"run {run_id} to end", ended, 120)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait()


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    (d / "tokens").write_text(f"# tokens of the test\n{TOKEN}\n")
    (d / "plugins").mkdir()
    shutil.copy(root / "dist/plugins/hostile.wasm", d / "plugins/hostile.wasm")
    (d / "in").mkdir()
    (d / "in/2024-05-01.csv").write_text("id,amount,day\n1,10,2024-05-01\n2,20,2024-05-01\n3,30,2024-05-01\n")
    (d / "in/2024-05-02.csv").write_text("id,amount,day\n4,40,2024-05-02\n5,50,2024-05-02\n")
    (d / "in/2024-05-03.csv").write_text("id,amount,day\n,70,2024-05-03\n")
    (d / "in/slow.csv").write_text("id,amount,day\n" + "".join(f"{i},{i},slow\n" for i in range(40)))
    (d / "orders.toml").write_text(ORDERS)
    (d / "trap.toml").write_text(hostile_pipeline("trap", "panic"))
    (d / "hog.toml").write_text(hostile_pipeline("hog", "memory", "memory_mb = 32"))
    (d / "slow.toml").write_text(hostile_pipeline("slow", "slow") + '\n[lineage]\nurl = "file://lineage/slow.jsonl"\n')
    # two pipelines with stores of their own: their run ids overlap
    (d / "slow2.toml").write_text(hostile_pipeline("slow2", "slow", state='state = "stores/slow2.db"'))
    (d / "quick.toml").write_text(ORDERS.replace('name = "orders"', 'name = "quick"\nstate = "stores/quick.db"').replace('"out/clean"', '"out/quick"'))
    (d / "dotdot.toml").write_text(ORDERS.replace('name = "orders"', 'name = "dotdot"').replace('"in/{partition}.csv"', '"in/../in/{partition}.csv"'))
    for i in range(3):
        (d / f"in/b{i}.csv").write_text("id,amount,day\n" + "".join(f"{j},{j},b{i}\n" for j in range(40)))
    (d / "in/2024-06-01.csv").symlink_to("/etc/hostname")
    (d / "escape.toml").write_text(ORDERS.replace('name = "orders"', 'name = "escape"').replace('"out/clean"', f'"{d.parent}/elsewhere"'))
    (d / "broken.toml").write_text("[pipeline]\nname = \n")

    # no tokens: loopback only
    r = subprocess.run([weir, "serve", "--root", str(d), "--listen", "0.0.0.0:0"], cwd=d, env=env, capture_output=True, text=True, timeout=30)
    check("without tokens it refuses a non-loopback address", r.returncode != 0 and "refusing to listen" in r.stderr, r.stderr)
    r = subprocess.run([weir, "serve", "--openapi"], env=env, capture_output=True, text=True)
    doc = json.loads(r.stdout)
    check("--openapi prints the document", r.returncode == 0 and doc["openapi"].startswith("3.1"), r.stdout[:200])

    s = Server(d, "orders.toml")
    try:
        status, h = s.call("GET", "/health", token=None)
        check("/health needs no token", status == 200 and h["status"] == "ok" and h["pipelines"] == 1, str(h))
        status, e = s.call("GET", "/runs", token=None)
        check("other endpoints need the token: 401", status == 401 and "bearer" in e["error"], str(e))
        status, e = s.call("GET", "/runs", token="wrong-token-0123456789")
        check("a wrong token is refused", status == 401, str(e))

        status, served_doc = s.call("GET", "/openapi.json", token=None)
        try:
            validate(served_doc)
            valid = True, ""
        except Exception as ex:  # the validator's report
            valid = False, str(ex)[:500]
        check("/openapi.json is a valid OpenAPI 3.1 document", status == 200 and served_doc["openapi"].startswith("3.1") and valid[0], valid[1])
        check("it has the bearer scheme", served_doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer")

        # registering pipelines
        status, p = s.call("POST", "/pipelines", {"path": "trap.toml"})
        check("a pipeline registers", status == 201 and p["name"] == "trap", str(p))
        for f in ("hog.toml", "slow.toml"):
            s.call("POST", "/pipelines", {"path": f})
        status, e = s.call("POST", "/pipelines", {"path": "/etc/passwd"})
        check("a file outside the roots: 403", status == 403 and "outside" in e["error"], str(e))
        status, e = s.call("POST", "/pipelines", {"path": "../x.toml"})
        check("a relative path out of the root: 403", status == 403, str(e))
        status, e = s.call("POST", "/pipelines", {"path": "escape.toml"})
        check("a pipeline writing outside the roots: 403 naming the output", status == 403 and "output of step `clean`" in e["error"], str(e))
        status, e = s.call("POST", "/pipelines", {"path": "dotdot.toml"})
        check("a source path with `..`: 403", status == 403 and "`..`" in e["error"], str(e))
        status, e = s.call("POST", "/pipelines", {"path": "broken.toml"})
        check("an invalid pipeline: 422 with the file's diagnostics", status == 422 and "broken.toml:2" in e["error"], str(e))
        status, e = s.call("POST", "/pipelines", {"file": "x"})
        check("an unknown field: 400 naming it", status == 400 and "unknown field `file`" in e["error"], str(e))
        for f in ("slow2.toml", "quick.toml"):
            s.call("POST", "/pipelines", {"path": f})
        status, ps = s.call("GET", "/pipelines")
        names = ["hog", "orders", "quick", "slow", "slow2", "trap"]
        check("six pipelines are registered", status == 200 and sorted(p["name"] for p in ps) == names, str(ps))
        status, p = s.call("GET", "/pipelines/orders", template="/pipelines/{name}")
        check("a pipeline's steps", status == 200 and p["steps"][0]["output"] == str(d / "out/clean") and p["partitioned"], str(p))
        status, e = s.call("GET", "/pipelines/nope", template="/pipelines/{name}")
        check("an unknown pipeline: 404", status == 404 and "POST /pipelines" in e["error"], str(e))

        # a run: its id at once, then its record
        status, a = s.call("POST", "/pipelines/orders/runs", {"partition": "2024-05-01"}, template="/pipelines/{name}/runs")
        check("a run starts: 202 with its id", status == 202 and a["id"] == "orders.1" and a["status"] == "RUNNING", str(a))
        run = s.wait_run("orders.1")
        check("the run succeeds", run["status"] == "SUCCESS", str(run))
        check("it has rows, checks and what it published",
              run["steps"][0]["rows_written"] == 3 and run["checks"][0]["check"] == "not_null(id)" and run["published"][0]["partition"] == "day=2024-05-01",
              str(run))
        status, a = s.call("POST", "/pipelines/orders/runs", {"partition": "2024-05-01"}, template="/pipelines/{name}/runs")
        check("the same run again is up to date: 200", status == 200 and a["status"] == "UP_TO_DATE" and a["identical_to"] == "orders.1", str(a))
        status, e = s.call("POST", "/pipelines/orders/runs", {"partition": "../../etc"}, template="/pipelines/{name}/runs")
        check("a partition that is a path: 400", status == 400 and "partition" in e["error"], str(e))
        status, e = s.call("POST", "/pipelines/orders/runs", {"partition": "2024-06-01"}, template="/pipelines/{name}/runs")
        check("an input file that links out of the root: 403", status == 403 and "/etc/hostname" in e["error"], str(e))
        r = subprocess.run([weir, "runs", "--pipeline", "orders.toml", "--json"], cwd=d, env=env, capture_output=True, text=True)
        check("the CLI sees the API's run in the same store", r.returncode == 0 and json.loads(r.stdout)[0]["id"] == 1, r.stdout + r.stderr)

        # exclusion with the CLI, then cancel
        status, a = s.call("POST", "/pipelines/slow/runs", {"partition": "slow"}, template="/pipelines/{name}/runs")
        check("a slow run starts", status == 202, str(a))
        slow_id = a["id"]
        r = subprocess.run([weir, "run", "slow.toml", "--partition", "slow"], cwd=d, env=env, capture_output=True, text=True)
        check("a CLI run of the same partition is refused while the API's runs", r.returncode != 0 and "still running" in r.stderr, r.stderr)
        status, e = s.call("POST", "/pipelines/slow/runs", {"partition": "slow"}, template="/pipelines/{name}/runs")
        check("and so is a second API run: 409", status == 409 and "still running" in e["error"], str(e))
        status, run = s.call("GET", f"/runs/{slow_id}", template="/runs/{id}")
        check("a live run shows RUNNING and cancellable", run["status"] == "RUNNING" and run["cancellable"], str(run))
        status, e = s.call("PATCH", f"/runs/{slow_id}", {"status": "DONE"}, template="/runs/{id}")
        check("PATCH takes only CANCELLED: 400", status == 400, str(e))
        status, a = s.call("PATCH", f"/runs/{slow_id}", {"status": "CANCELLED"}, template="/runs/{id}")
        check("PATCH cancels: 202", status == 202 and a["status"] == "CANCELLING", str(a))
        run = s.wait_run(slow_id)
        check("the run ends CANCELLED, nothing published", run["status"] == "CANCELLED" and not run["published"] and not (d / "out/slow").exists(), str(run))
        events = [json.loads(line) for line in (d / "lineage/slow.jsonl").read_text().splitlines()]
        seq = [(e["eventType"], e["job"]["name"]) for e in events]
        check("its step and the run send OpenLineage ABORT", seq[-2:] == [("ABORT", "slow.s"), ("ABORT", "slow")], str(seq))
        status, e = s.call("PATCH", f"/runs/{slow_id}", {"status": "CANCELLED"}, template="/runs/{id}")
        check("cancelling an ended run: 409", status == 409 and "already ended" in e["error"], str(e))

        # runs of two stores with the same number: one ending does not make the other look dead
        status, a = s.call("POST", "/pipelines/slow2/runs", {"partition": "slow"}, template="/pipelines/{name}/runs")
        check("slow2's first run is number 1 of its store", status == 202 and a["id"] == "slow2.1", str(a))
        status, q = s.call("POST", "/pipelines/quick/runs", {"partition": "2024-05-01"}, template="/pipelines/{name}/runs")
        check("and so is quick's", status == 202 and q["id"] == "quick.1", str(q))
        check("quick.1 succeeds", s.wait_run("quick.1")["status"] == "SUCCESS")
        status, e = s.call("POST", "/pipelines/slow2/runs", {"partition": "slow"}, template="/pipelines/{name}/runs")
        status2, run = s.call("GET", "/runs/slow2.1", template="/runs/{id}")
        check("slow2.1 is still live: a second run is refused, not recovered over it", status == 409 and run["status"] == "RUNNING", f"{status} {e} {run}")
        s.call("PATCH", "/runs/slow2.1", {"status": "CANCELLED"}, template="/runs/{id}")
        check("and it can be cancelled", s.wait_run("slow2.1")["status"] == "CANCELLED")

        # plugins that trap or are killed: the run fails, the server goes on
        status, a = s.call("POST", "/pipelines/trap/runs", {"partition": "2024-05-01"}, template="/pipelines/{name}/runs")
        run = s.wait_run(a["id"])
        check("a trapping plugin fails its run", run["status"] == "FAILED" and "trapped" in run["error"], str(run))
        status, a = s.call("POST", "/pipelines/hog/runs", {"partition": "2024-05-01"}, template="/pipelines/{name}/runs")
        hog = s.wait_run(a["id"])
        check("a plugin over its memory cap fails its run", hog["status"] == "FAILED" and "memory cap" in hog["error"], str(hog))
        status, h = s.call("GET", "/health", token=None)
        check("the server is still up", status == 200)
        status, runs = s.call("GET", "/runs?status=FAILED&limit=20")
        check("GET /runs?status=FAILED lists the failed runs", status == 200 and {r["pipeline"] for r in runs} == {"trap", "hog"} and all(r["status"] == "FAILED" for r in runs), str(runs))
        status, e = s.call("GET", "/runs?status=NOPE")
        check("an unknown status: 400", status == 400 and "CANCELLED" in e["error"], str(e))
        status, e = s.call("GET", "/runs/orders.99", template="/runs/{id}")
        check("an unknown run: 404", status == 404, str(e))
        status, e = s.call("GET", "/runs/orders", template="/runs/{id}")
        check("a malformed id: 400", status == 400 and "PIPELINE.N" in e["error"], str(e))

        # external quality checks
        status, a = s.call("POST", "/runs/orders.1/quality-checks", {"check": "totals_match_source", "passed": True}, template="/runs/{id}/quality-checks")
        check("a passed external check: proceed", status == 200 and a["proceed"] is True and a["recorded"]["step"] == "external", str(a))
        status, a = s.call("POST", "/runs/orders.1/quality-checks", {"check": "fresh", "passed": False, "severity": "warn"}, template="/runs/{id}/quality-checks")
        check("a failed warn check: still proceed", status == 200 and a["proceed"] is True, str(a))
        status, a = s.call("POST", "/runs/orders.1/quality-checks", {"check": "row_count", "passed": False, "observed": "3", "threshold": ">= 5"}, template="/runs/{id}/quality-checks")
        check("a failed blocking check: do not proceed", status == 200 and a["proceed"] is False and "row_count" in a["reason"], str(a))
        status, a = s.call("POST", f"/runs/{hog['id']}/quality-checks", {"check": "x", "passed": True}, template="/runs/{id}/quality-checks")
        check("a failed run never proceeds", status == 200 and a["proceed"] is False and "FAILED" in a["reason"], str(a))
        status, a = s.call("POST", "/runs/orders.1/quality-checks", {"check": "row_count", "passed": True, "observed": "5"}, template="/runs/{id}/quality-checks")
        check("the same check passing later: proceed again", status == 200 and a["proceed"] is True, str(a))
        status, e = s.call("POST", "/runs/orders.1/quality-checks", {"check": "x", "passed": True, "severity": "quarantine"}, template="/runs/{id}/quality-checks")
        check("a bad severity: 400", status == 400, str(e))
        status, checks = s.call("GET", "/checks?pipeline=orders&failed=true")
        check("GET /checks lists the failed external checks", status == 200 and {c["check"] for c in checks} == {"fresh", "row_count"}, str(checks))
        status, run = s.call("GET", "/runs/orders.1", template="/runs/{id}")
        check("the run shows them", len(run["checks"]) == 5, str(run["checks"]))

        # backfills: create, watch, resume
        status, b = s.call("POST", "/pipelines/orders/backfills", {"partitions": ["2024-05-02", "2024-05-03"], "parallel": 2}, template="/pipelines/{name}/backfills")
        check("a backfill starts: 202", status == 202 and b["partitions"] == 2, str(b))

        def backfill_done():
            st, v = s.call("GET", f"/backfills/{b['id']}", template="/backfills/{id}")
            return v if st == 200 and v["status"] not in ("RUNNING",) else None
        bf = wait_until("the backfill", backfill_done, 120)
        states = {p["partition"]: p["status"] for p in bf["partitions"]}
        check("one partition failed its check: PARTIAL", bf["status"] == "PARTIAL" and states == {"2024-05-02": "SUCCESS", "2024-05-03": "FAILED"}, str(bf))
        (d / "in/2024-05-03.csv").write_text("id,amount,day\n7,70,2024-05-03\n")
        status, a = s.call("POST", f"/backfills/{b['id']}/resume", {"only_failed": True}, template="/backfills/{id}/resume")
        check("resume: 202, one partition to run", status == 202 and a["partitions"] == 1, str(a))
        bf = wait_until("the resumed backfill", lambda: (lambda v: v if v["status"] == "SUCCESS" else None)(s.call("GET", f"/backfills/{b['id']}", template="/backfills/{id}")[1]), 120)
        check("the resumed backfill succeeds", all(p["status"] == "SUCCESS" for p in bf["partitions"]), str(bf))
        status, bfs = s.call("GET", "/backfills?pipeline=orders")
        check("GET /backfills lists it", status == 200 and bfs[0]["id"] == b["id"], str(bfs))
        status, e = s.call("POST", "/pipelines/orders/backfills", {"partitions": ["2024-05-02", "2024-05-02"]}, template="/pipelines/{name}/backfills")
        check("a partition listed twice: 400", status == 400 and "twice" in e["error"], str(e))
        # cancel a backfill: the running partition stops, the others stay PENDING
        status, b2 = s.call("POST", "/pipelines/slow/backfills", {"partitions": ["b0", "b1", "b2"]}, template="/pipelines/{name}/backfills")
        check("a slow backfill starts", status == 202, str(b2))
        wait_until("its first partition to run", lambda: s.call("GET", f"/backfills/{b2['id']}", template="/backfills/{id}")[1]["partitions"][0]["status"] == "RUNNING")
        status, a = s.call("PATCH", f"/backfills/{b2['id']}", {"status": "CANCELLED"}, template="/backfills/{id}")
        check("PATCH cancels a backfill: 202", status == 202 and a["status"] == "CANCELLING", str(a))
        bf2 = wait_until("the cancelled backfill", lambda: (lambda v: v if v["status"] != "RUNNING" else None)(s.call("GET", f"/backfills/{b2['id']}", template="/backfills/{id}")[1]), 60)
        states = [p["status"] for p in bf2["partitions"]]
        check("it ends PARTIAL: the running partition failed (cancelled), the rest PENDING", bf2["status"] == "PARTIAL" and states == ["FAILED", "PENDING", "PENDING"] and "cancelled" in (bf2["partitions"][0]["error"] or ""), str(bf2))
        status, e = s.call("PATCH", f"/backfills/{b2['id']}", {"status": "CANCELLED"}, template="/backfills/{id}")
        check("cancelling it again: 409", status == 409, str(e))
        status, e = s.call("POST", "/pipelines/orders/backfills", {"from": "2024-05-01"}, template="/pipelines/{name}/backfills")
        check("a backfill without an end: 400", status == 400, str(e))

        # lineage of a dataset
        status, lin = s.call("GET", "/lineage?dataset=out/clean")
        writes = {w["partition"]: w for w in lin.get("writes", [])}
        check("lineage: the runs that wrote out/clean", status == 200 and set(writes) == {"2024-05-01", "2024-05-02", "2024-05-03"}, str(lin))
        check("each from its input file", writes.get("2024-05-01", {}).get("inputs") == [{"namespace": "file", "name": str(d / "in/2024-05-01.csv")}], str(writes.get("2024-05-01")))
        status, e = s.call("GET", "/lineage?dataset=/etc")
        check("lineage outside the roots: 403", status == 403, str(e))

        # metrics, scraped by a real Prometheus with the bearer token
        status, text = s.call("GET", "/metrics", raw=True)
        rows = 'weir_step_rows_written{pipeline="orders",partition="2024-05-01",step="clean",dataset="%s"} 3' % (d / "out/clean")
        check("/metrics has the run's rows, with the dataset", status == 200 and rows in text, text[:2000])
        check("and the memory kill", 'weir_plugin_killed{pipeline="hog",partition="2024-05-01",step="s",plugin="hostile",reason="memory"} 1' in text, text[:3000])
        check("each metric is declared once", text.count("# TYPE weir_run_success gauge") == 1, text[:500])
        status, e = s.call("GET", "/nope", template="/nope")
        check("an unknown endpoint: 404 JSON", status == 404 and "openapi" in e["error"], str(e))
        called.discard(("get", "/nope"))

        prom_port = free_port()
        prom = f"http://127.0.0.1:{prom_port}"
        target = s.base.removeprefix("http://")
        (d / "prometheus.yml").write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: weir
    authorization:
      credentials_file: {d / 'tokens-only'}
    static_configs:
      - targets: ["{target}"]
""")
        (d / "tokens-only").write_text(TOKEN)
        prometheus = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=(d / "prometheus.log").open("w"))
        try:
            def query(q):
                st, body = get(f"{prom}/api/v1/query?query={urllib.parse.quote(q)}")
                return json.loads(body)["data"]["result"] if st == 200 else []
            got = wait_until("Prometheus to scrape weir serve", lambda: query('weir_step_rows_written{job="weir",pipeline="orders",partition="2024-05-01",step="clean"}'))
            check("Prometheus scrapes /metrics with the token", float(got[0]["value"][1]) == 3, str(got))
            got = wait_until("the last success", lambda: query('weir_last_success_timestamp_seconds{job="weir",pipeline="orders",partition="2024-05-02"}'))
            check("the last success per partition", abs(time.time() - float(got[0]["value"][1])) < 600, str(got))
        finally:
            prometheus.terminate()
            prometheus.wait()

        # kill -9 in the middle of a run, then a restart
        status, a = s.call("POST", "/pipelines/slow/runs", {"partition": "slow"}, template="/pipelines/{name}/runs")
        check("another slow run starts", status == 202, str(a))
        s.stop(signal.SIGKILL)
        s = Server(d)
        status, ps = s.call("GET", "/pipelines")
        check("after kill -9 the restarted server remembers the pipelines", sorted(p["name"] for p in ps) == names, str(ps))
        status, run = s.call("GET", f"/runs/{a['id']}", template="/runs/{id}")
        check("and recovered the killed run: FAILED, staging gone", run["status"] == "FAILED" and "crash" in (run["error"] or "") and not (d / "out/slow").exists(), str(run))
        status, a = s.call("POST", "/pipelines/slow/runs", {"partition": "2024-05-02"}, template="/pipelines/{name}/runs")
        run = s.wait_run(a["id"])
        check("and runs again", run["status"] == "SUCCESS", str(run))
    finally:
        s.stop()

    # without tokens: loopback names only, and bodies must be JSON (no form posts from a web page)
    s = Server(d, token_file=False)
    try:
        status, runs = s.call("GET", "/runs?limit=1", token=None)
        check("without tokens, loopback requests need none", status == 200, str(runs))
        def status_of(req):
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        code = status_of(urllib.request.Request(s.base + "/runs", headers={"Host": "evil.example"}))
        check("a request naming another Host: 403", code == 403)
        code = status_of(urllib.request.Request(s.base + "/pipelines/orders/runs", data=b"partition=2024-05-01", method="POST",
                                                headers={"Content-Type": "application/x-www-form-urlencoded"}))
        check("a form post: 415", code == 415)
    finally:
        s.stop()

    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    check("every endpoint of the document was exercised", documented <= called, str(sorted(documented - called)))

finish("serve")
