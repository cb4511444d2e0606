"""What operators see of weir runs.

OpenLineage: events validated against the official JSON Schemas (spec 2-0-2 and its facets,
in tests/data/openlineage, offline), and their sequences checked: a run that succeeds, a
run whose blocking check fails, a backfill of two partitions (file transport), the same run
POSTed to a local HTTP receiver, a receiver that is down and one that hangs.

Prometheus: a real Pushgateway and Prometheus (the distribution's packages) on private
127.0.0.1 ports and data directories, started here and stopped by their pids; weir pushes,
Prometheus scrapes, and the values are queried back through its HTTP API, with the example
alert rules loaded (and checked by promtool).
"""
import http.server
import json
import socket
import time
import os
import pathlib
import subprocess
import tempfile
import threading

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from netutil import free_port, get, wait_until
from report import check, finish

weir = os.environ["WEIR_BIN"]
root = pathlib.Path(__file__).resolve().parents[2]
env = dict(os.environ, WEIR_CACHE_DIR=str(root / "target/weir-test-cache"))
env.pop("WEIR_OPENLINEAGE_URL", None)
spec_dir = root / "tests/data/openlineage"

# every schema by its $id, so references resolve offline
schemas = [json.loads(p.read_text()) for p in [spec_dir / "OpenLineage.json", *sorted((spec_dir / "facets").glob("*.json"))]]
registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
event_validator = Draft202012Validator(schemas[0], registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)
# a facet key (e.g. "parent") -> the validator of the facet file that defines it
facet_validators = {}
for s in schemas[1:]:
    for key in s.get("properties", {}):
        facet_validators[key] = Draft202012Validator(s, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


def problems(event):
    """Every schema violation of one event, facets included."""
    found = [e.message for e in event_validator.iter_errors(event)]
    groups = [event["run"].get("facets", {}), event["job"].get("facets", {})]
    for d in event.get("inputs", []) + event.get("outputs", []):
        groups += [d.get("facets", {}), d.get("inputFacets", {}), d.get("outputFacets", {})]
    for facets in groups:
        for key, value in facets.items():
            for field in ("_producer", "_schemaURL"):
                if field not in value:
                    found.append(f"facet {key} has no {field}")
            v = facet_validators.get(key)
            if v is not None:
                found += [f"{key}: {e.message}" for e in v.iter_errors({key: value})]
            elif key != "weir_plugins":
                found.append(f"facet {key} is not a standard facet")
    return found


def validate_all(events, label):
    bad = [(e["eventType"], e["job"]["name"], p) for e in events for p in problems(e)]
    check(f"{label}: {len(events)} events valid against the OpenLineage schemas", events and not bad, str(bad[:5]))


def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PIPELINE = """[pipeline]
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

[steps.totals]
input = "clean"
output = { path = "out/totals", partition_by = "day" }
"""


def setup(d, lineage):
    (d / "in").mkdir(exist_ok=True)
    (d / "in/2024-05-01.csv").write_text("id,amount,day\n1,10,2024-05-01\n2,20,2024-05-01\n3,30,2024-05-01\n")
    (d / "in/2024-05-02.csv").write_text("id,amount,day\n4,40,2024-05-02\n5,50,2024-05-02\n")
    (d / "in/2024-05-03.csv").write_text("id,amount,day\n7,70,2024-05-03\n")
    (d / "in/broken.csv").write_text("id,amount,day\n,10,broken\n6,60,broken\n")
    (d / "pipeline.toml").write_text(PIPELINE + lineage)


def run(d, *args, extra_env=None, cwd=None):
    return subprocess.run([weir, *args], cwd=cwd or d, env=dict(env, **(extra_env or {})), capture_output=True, text=True)


def sequence(events):
    return [(e["eventType"], e["job"]["name"]) for e in events]


with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    setup(d, '\n[lineage]\nurl = "file://lineage/events.jsonl"\nnamespace = "analytics"\n')

    # a run that succeeds, started from another directory (paths are the pipeline file's)
    r = run(d, "run", str(d / "pipeline.toml"), "--partition", "2024-05-01", cwd=d.parent)
    check("a partition run succeeds", r.returncode == 0, r.stderr)
    events = read_events(d / "lineage/events.jsonl")
    validate_all(events, "successful run")
    check(
        "START, each step's START and COMPLETE, then COMPLETE",
        sequence(events)
        == [
            ("START", "orders"),
            ("START", "orders.clean"),
            ("COMPLETE", "orders.clean"),
            ("START", "orders.totals"),
            ("COMPLETE", "orders.totals"),
            ("COMPLETE", "orders"),
        ],
        str(sequence(events)),
    )
    run_id = events[0]["run"]["runId"]
    steps = [e for e in events if e["job"]["name"] != "orders"]
    check(
        "each step's parent is the pipeline run",
        all(e["run"]["facets"]["parent"]["run"]["runId"] == run_id for e in steps),
        str([e["run"]["facets"].get("parent") for e in steps]),
    )
    check("the namespace is the configured one", all(e["job"]["namespace"] == "analytics" for e in events))
    check(
        "nominalTime is the partition's day",
        events[0]["run"]["facets"]["nominalTime"]["nominalStartTime"] == "2024-05-01T00:00:00Z",
        str(events[0]["run"]["facets"].get("nominalTime")),
    )
    clean_done = events[2]
    out = clean_done["outputs"][0]
    check("the output dataset is the file path", out["namespace"] == "file" and out["name"] == str(d / "out/clean"), str(out))
    check("outputStatistics counts the rows", out["outputFacets"]["outputStatistics"]["rowCount"] == 3, str(out))
    check("inputStatistics counts the rows read", clean_done["inputs"][0]["inputFacets"]["inputStatistics"]["rowCount"] == 3)
    check(
        "the input dataset is the partition's file",
        clean_done["inputs"][0]["name"] == str(d / "in/2024-05-01.csv"),
        str(clean_done["inputs"]),
    )
    fields = [f["name"] for f in out["facets"]["schema"]["fields"]]
    check("the schema facet names the columns", fields == ["id", "amount", "day"], str(fields))
    assertions = out["facets"]["dataQualityAssertions"]["assertions"]
    check("one assertion per check, passed", assertions == [{"assertion": "not_null(id)", "success": True, "severity": "block"}], str(assertions))
    check("the totals step reads what clean wrote", events[4]["inputs"][0]["name"] == str(d / "out/clean"))
    check("the run's COMPLETE names what it read and wrote", len(events[-1]["outputs"]) == 2 and len(events[-1]["inputs"]) == 1, str(events[-1]))
    check("processing_engine is weir", events[0]["run"]["facets"]["processing_engine"]["name"] == "weir")

    # a run whose blocking check fails
    (d / "lineage/events.jsonl").unlink()
    r = run(d, "run", "pipeline.toml", "--partition", "broken")
    check("a failing blocking check fails the run", r.returncode != 0, r.stderr)
    events = read_events(d / "lineage/events.jsonl")
    validate_all(events, "failed run")
    check("the run ends in FAIL", sequence(events)[0] == ("START", "orders") and sequence(events)[-1] == ("FAIL", "orders"), str(sequence(events)))
    err = events[-1]["run"]["facets"].get("errorMessage", {})
    check("FAIL carries the error", "not_null(id)" in err.get("message", ""), str(err))
    clean_failed = [e for e in events if e["job"]["name"] == "orders.clean" and e["eventType"] == "FAIL"]
    check(
        "the step's FAIL reports the failed assertion on the output it would have written",
        clean_failed
        and clean_failed[0]["outputs"][0]["name"] == str(d / "out/clean")
        and clean_failed[0]["outputs"][0]["facets"]["dataQualityAssertions"]["assertions"]
        == [{"assertion": "not_null(id)", "success": False, "severity": "block"}],
        str(clean_failed),
    )

    # a backfill: its own run, the parent of each partition's run
    (d / "lineage/events.jsonl").unlink()
    r = run(d, "backfill", "pipeline.toml", "--partitions", "2024-05-02,2024-05-03")
    check("the backfill succeeds", r.returncode == 0, r.stderr)
    events = read_events(d / "lineage/events.jsonl")
    validate_all(events, "backfill")
    seq = sequence(events)
    check("the backfill starts first and completes last", seq[0] == ("START", "orders.backfill") and seq[-1] == ("COMPLETE", "orders.backfill"), str(seq))
    backfill_id = events[0]["run"]["runId"]
    runs = [e for e in events if e["job"]["name"] == "orders" and e["eventType"] == "START"]
    check(
        "each partition run names the backfill as parent",
        len(runs) == 2 and all(e["run"]["facets"]["parent"]["run"]["runId"] == backfill_id for e in runs),
        str([e["run"]["facets"].get("parent") for e in runs]),
    )

    def sigterm_before_publish(*args):
        """Run weir paused before its publish, SIGTERM it there; its exit status."""
        (d / "lineage/events.jsonl").unlink()
        p = subprocess.Popen(
            [weir, *args], cwd=d, env=dict(env, WEIR_DEBUG_PAUSE="before-publish:60000"), stderr=subprocess.PIPE, text=True)
        for line in p.stderr:
            if "debug pause at before-publish" in line:
                break
        p.terminate()
        p.wait(timeout=30)
        return p.returncode

    # SIGTERM during a run: weir stops as before, and the run and its step send ABORT
    code = sigterm_before_publish("run", "pipeline.toml", "--partition", "2024-05-03", "--force")
    check("SIGTERM stops the run as before", code == -15, str(code))
    events = read_events(d / "lineage/events.jsonl")
    validate_all(events, "aborted run")
    check("the run ends in ABORT", sequence(events)[0] == ("START", "orders") and sequence(events)[-1] == ("ABORT", "orders"), str(sequence(events)))
    check("with the signal named", "SIGTERM" in events[-1]["run"]["facets"]["errorMessage"]["message"], str(events[-1]["run"]["facets"]))

    # SIGTERM during a backfill: its partition run, then the backfill itself, send ABORT
    sigterm_before_publish("backfill", "pipeline.toml", "--partitions", "2024-05-02", "--force")
    events = read_events(d / "lineage/events.jsonl")
    validate_all(events, "aborted backfill")
    check(
        "the partition run ends in ABORT, then the backfill",
        sequence(events)[0] == ("START", "orders.backfill") and sequence(events)[-2:] == [("ABORT", "orders"), ("ABORT", "orders.backfill")],
        str(sequence(events)),
    )
    check("the backfill's ABORT is a BACKFILL job", events[-1]["job"]["facets"]["jobType"]["jobType"] == "BACKFILL", str(events[-1]["job"]))

    # the same over HTTP, to a receiver on 127.0.0.1
    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers.get("Content-Type"), json.loads(body)))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/lineage"
    r = run(d, "run", "pipeline.toml", "--partition", "2024-05-02", "--force", extra_env={"WEIR_OPENLINEAGE_URL": url})
    server.shutdown()
    server.server_close()  # down from here on: connections are refused
    check("a run with an HTTP receiver succeeds", r.returncode == 0, r.stderr)
    events = [e for _, _, e in received]
    validate_all(events, "http")
    check("six events POSTed as JSON to the endpoint's path", len(received) == 6 and all(p == "/api/v1/lineage" and t == "application/json" for p, t, _ in received), str([(p, t) for p, t, _ in received]))
    check("in order", sequence(events)[0] == ("START", "orders") and sequence(events)[-1] == ("COMPLETE", "orders"), str(sequence(events)))

    # a receiver that is down: the run succeeds, with one warning
    r = run(d, "run", "pipeline.toml", "--partition", "2024-05-02", "--force", extra_env={"WEIR_OPENLINEAGE_URL": url})
    check("a run whose lineage backend is down succeeds", r.returncode == 0, r.stderr)
    check("and says once that events are not delivered", r.stderr.count("lineage events are not delivered") == 1, r.stderr)

    # a receiver that accepts connections and never answers: bounded by the timeout
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    text = (d / "pipeline.toml").read_text()
    (d / "pipeline.toml").write_text(
        text.replace('url = "file://lineage/events.jsonl"', f'url = "http://127.0.0.1:{hang.getsockname()[1]}/api/v1/lineage"\ntimeout_ms = 300\nretries = 1')
    )
    t = time.monotonic()
    r = run(d, "run", "pipeline.toml", "--partition", "2024-05-02", "--force")
    took = time.monotonic() - t
    hang.close()
    (d / "pipeline.toml").write_text(text)
    check("a run whose lineage backend hangs succeeds", r.returncode == 0, r.stderr)
    check("and is held up by one event's timeouts at most", took < 20 and r.stderr.count("not delivered") == 1, f"{took:.1f}s {r.stderr}")

    # a URL weir cannot send to is refused before the run starts
    r = run(d, "run", "pipeline.toml", "--partition", "2024-05-02", "--force", extra_env={"WEIR_OPENLINEAGE_URL": "https://lineage.example.com"})
    check("an https URL is refused clearly", r.returncode != 0 and "no TLS" in r.stderr, r.stderr)


# ---------------------------------------------------------------------------------------
# Prometheus: weir pushes, Prometheus scrapes the Pushgateway, the API answers.
import shutil
import urllib.parse
import urllib.request


rules = root / "examples/alerts/weir.rules.yml"
r = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
check("promtool accepts the example alert rules", r.returncode == 0, r.stdout + r.stderr)

procs = []
with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    setup(d, "")
    pg_port, prom_port = free_port(), free_port()
    pg = f"http://127.0.0.1:{pg_port}"
    prom = f"http://127.0.0.1:{prom_port}"
    try:
        procs.append(subprocess.Popen(
            [shutil.which("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{pg_port}"],
            stdout=subprocess.DEVNULL, stderr=(d / "pushgateway.log").open("w")))
        (d / "prometheus.yml").write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:{pg_port}"]
""")
        procs.append(subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=(d / "prometheus.log").open("w")))
        wait_until("the Pushgateway", lambda: get(f"{pg}/-/ready")[0] == 200)
        wait_until("Prometheus", lambda: get(f"{prom}/-/ready")[0] == 200)

        def query(q):
            status, body = get(f"{prom}/api/v1/query?query={urllib.parse.quote(q)}")
            return json.loads(body)["data"]["result"] if status == 200 else []

        def value(q):
            """The single value of `q` once Prometheus has scraped it."""
            return float(wait_until(q, lambda: query(q))[0]["value"][1])

        push = {"WEIR_PUSHGATEWAY_URL": pg}
        r = run(d, "run", "pipeline.toml", "--partition", "2024-05-01", extra_env=push)
        check("a run pushing its metrics succeeds", r.returncode == 0, r.stderr)
        sel = '{pipeline="orders",partition="2024-05-01"'
        check("rows written, as Prometheus scraped them", value(f'weir_step_rows_written{sel},step="clean"}}') == 3)
        check("rows read", value(f'weir_step_rows_read{sel},step="totals"}}') == 3)
        written = sum(f.stat().st_size for f in (d / "out/clean").rglob("*.parquet"))
        check("bytes written are the output's", value(f'weir_step_bytes_written{sel},step="clean"}}') == written, str(written))
        check("one attempt", value(f'weir_step_attempts{sel},step="clean"}}') == 1)
        check("the run succeeded", value(f"weir_run_success{sel}}}") == 1)
        check("the check passed", value(f'weir_check_passed{sel},check="not_null(id)",severity="block"}}') == 1)
        first_success = value(f"weir_last_success_timestamp_seconds{sel}}}")
        check("the last success is now", abs(time.time() - first_success) < 600, str(first_success))

        # the same partition fails later: the run shows failed, its last success stays
        (d / "in/2024-05-01.csv").write_text("id,amount,day\n,10,2024-05-01\n")
        r = run(d, "run", "pipeline.toml", "--partition", "2024-05-01", extra_env=push)
        check("a failing run pushes too", r.returncode == 1, r.stderr)
        wait_until("the failed run's metrics", lambda: query(f"weir_run_success{sel}}} == 0"))
        check("blocked by a check", value(f"weir_run_blocked_by_check{sel}}}") == 1)
        check("the failure is the user's to fix", value(f'weir_run_failed{sel},kind="user"}}') == 1)
        check("the last success is kept", value(f"weir_last_success_timestamp_seconds{sel}}}") == first_success)
        alerts = wait_until("the alerts", lambda: {a["metric"]["alertname"] for a in query(f'ALERTS{{alertstate="firing",partition="2024-05-01"}}')} >= {"WeirRunFailed", "WeirBlockingCheckFailed"} and True)
        check("the example rules fire on the failed run", alerts)

        # a Pushgateway that is down: the run succeeds and says so once
        procs[0].terminate()
        procs[0].wait()
        r = run(d, "run", "pipeline.toml", "--partition", "2024-05-02", extra_env=push)
        check("a run whose Pushgateway is down succeeds", r.returncode == 0, r.stderr)
        check("and warns that metrics were not pushed", r.stderr.count("metrics were not pushed") == 1, r.stderr)
    finally:
        for p in procs:
            p.terminate()
            p.wait()

finish("observe")
