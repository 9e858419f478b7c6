"""Shared benchmark plumbing: a timed subprocess with its own peak RSS, and medians."""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks reuse the tests' original-format writers

# Self-contained: every child process (the `enc` script included) runs this checkout's src/, with its
# bytecode compiled once up front as an installed package would have it (not recompiled per run).
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.path.insert(0, str(ROOT / "src"))
compileall.compile_dir(str(ROOT / "src"), quiet=1)


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


def cp_vs_convert(src: Path, work: Path, repeat: int) -> tuple[list[float], list[float], list[int], int]:
    """Alternate `cp -r SRC` and `enc convert SRC --no-verify` ``repeat`` times (warm cache).

    Returns (cp seconds, enc seconds, enc peak RSS bytes, bytes enc wrote) per run.
    """
    import shutil

    cp_t, enc_t, enc_rss, written = [], [], [], 0
    for i in range(repeat):
        dst = work / f"cp{i}"
        os.sync()  # no run is throttled by the previous one's write-back
        cp_t.append(measure(["cp", "-r", str(src), str(dst)])[0])
        shutil.rmtree(dst)
        out = work / f"hf{i}"
        os.sync()
        wall, rss, _ = measure([enc_bin(), "convert", str(src), "-o", str(out), "--no-verify", "--json"])
        enc_t.append(wall)
        enc_rss.append(rss)
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        shutil.rmtree(out)
    return cp_t, enc_t, enc_rss, written


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def enc_bin() -> str:
    return str(Path(sys.executable).parent / "enc")


def spread(xs: list[float]) -> str:
    """'median 1.23 (min 1.10, max 1.50; runs 1.10 1.23 1.50)': every run, not only the best."""
    return (f"median {statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f}; runs "
            + " ".join(f"{x:.2f}" for x in xs) + ")")
