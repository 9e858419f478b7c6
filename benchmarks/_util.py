"""Shared benchmark plumbing: a timed subprocess with its own peak RSS, and medians."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks reuse the tests' original-format writers


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS in bytes of that process, stdout).

    The peak is the rusage wait4() reports for this one child (its own maximum resident set).
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = p.stdout.read(), p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"command failed ({code}): {' '.join(map(str, cmd))}\n{err.decode()[-2000:]}")
    return wall, ru.ru_maxrss * 1024, out.decode()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def enc_bin() -> str:
    return str(Path(sys.executable).parent / "enc")
