"""Wall time and peak memory of one process, for the Python-driven benchmarks
(bench/postgres.py, bench/delta.py)."""
import subprocess
import time


def hwm_kb(pid):
    """A live process's peak resident set (VmHWM) in KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(cmd, **kw):
    """Wall seconds and peak RSS (MB) of one process. The peak is its VmHWM, read every
    20 ms until it exits: wait4's ru_maxrss would count this (large) parent's memory too,
    since a forked child keeps its high-water mark across exec."""
    t = time.monotonic()
    p = subprocess.Popen(cmd, **kw)
    peak = 0
    while p.poll() is None:
        peak = max(peak, hwm_kb(p.pid))
        time.sleep(0.02)
    secs = time.monotonic() - t
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode})")
    return secs, peak / 1024
