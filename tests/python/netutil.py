"""Small helpers the service tests share: a free 127.0.0.1 port, an HTTP GET that never
raises, and polling for a condition (a readiness or query answer, not a sleep standing in
for one)."""
import socket
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, headers=None):
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, r.read().decode()
    except Exception as e:  # not up yet
        return None, str(e)


def wait_until(what, probe, seconds=60):
    """Poll `probe` until it answers something true; return that answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")
