"""The pass/fail bookkeeping the Python checks share: `check(name, ok, detail)` prints one
line per check; `finish(label)` prints "label: N passed, M failed" and exits non-zero on a failure."""
import sys

_failures = []
_passed = 0


def check(name, ok, detail=""):
    global _passed
    if ok:
        _passed += 1
        print(f"ok   {name}")
    else:
        _failures.append(name)
        print(f"FAIL {name} {detail}")


def finish(label):
    print(f"{label}: {_passed} passed, {len(_failures)} failed")
    sys.exit(1 if _failures else 0)
