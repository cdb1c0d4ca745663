"""One backend's rows in a process of its own, so that a fault there (a poisoned CUDA context, a
crash, a hang) costs only that backend's rows.

``run_child(cmd, timeout)`` runs a command with its output passed through (and its tail kept,
to tell how it failed), killing its whole process group at the timeout. ``strip_options``
removes options (with their values) from an argument list, to hand a child the parent's
arguments with its own ``--impls`` / ``--out`` / ``--budget-s``.
"""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from benchmarks import faults


def run_child(cmd: Sequence[str], timeout: Optional[float]) -> tuple[int, bool, str, float]:
    """(exit status, timed out, the last 60 lines of output, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tail: collections.deque = collections.deque(maxlen=60)

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group already gone
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    return proc.returncode, timed_out, "".join(tail), time.monotonic() - started


def failure(rc: int, timed_out: bool, tail: str, seconds: float, complete: bool) -> Optional[dict]:
    """How a child failed ({kind, rc, seconds, reason}), or None when it ran to its end."""
    if not timed_out and rc in (0, 1) and complete:
        return None
    kind = faults.classify(tail, timed_out)
    last = " ".join(tail.strip().splitlines()[-3:])[-500:]
    what = (f"killed after {seconds:.0f} s (its timeout)" if timed_out else
            f"its process ended with status {rc}" + ("" if complete else " before it finished"))
    return {"kind": kind, "rc": rc, "seconds": round(seconds, 1), "reason": f"{what}: {last}"}


def strip_options(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """``argv`` without ``options`` (each with its value, as ``--x v`` or ``--x=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in options):
            continue
        out.append(a)
    return out
