"""Runs of the `weir` binary held at one of its debug pauses (WEIR_DEBUG_PAUSE), for the
crash and race tests: `killed_at` kills -9 a run there; `paused` returns a run waiting
there, to let another writer act meanwhile."""
import subprocess


def paused(weir, cwd, env, point, ms, *args):
    """Start `weir run ARGS` pausing `ms` at `point`; return it once it is there, and whether it got there."""
    p = subprocess.Popen([weir, "run", *args], cwd=cwd, env=dict(env, WEIR_DEBUG_PAUSE=f"{point}:{ms}"),
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if f"debug pause at {point}" in line:
            return p, True
    return p, False


def killed_at(weir, cwd, env, point, *args):
    """Kill -9 `weir run ARGS` at `point`; whether it got there."""
    p, seen = paused(weir, cwd, env, point, 60000, *args)
    p.kill()
    p.wait(timeout=30)
    return seen
