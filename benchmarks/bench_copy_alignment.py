"""Why a conversion's copies are slower than `cp` of the same bytes: folio alignment (issue 16).

`cp` (coreutils 9) copies a file with one `copy_file_range` from offset 0 to offset 0, so source and
destination agree at every offset and the kernel moves whole page-cache folios. A tensor in a
safetensors file sits at another offset (modulo 64 KiB) than in the zip or TF bundle it came from, and
safetensors allows no gaps between tensors, so enc cannot choose a layout that agrees. This script
copies the same 64 MiB of a cached file, interleaved over ``--reps`` rounds, with the destination
offset:

- agreeing with the source modulo 2 MiB (what `cp` gets: the peer),
- agreeing modulo 64 KiB only, and modulo 4 KiB only,
- off by 376 bytes (a safetensors header length),

plus, at the misaligned offset, write() from 2 MiB read-only mappings of the source (the user-space
copy that was tried instead of the kernel's, see the README). Prints each median in GB/s and its ratio
to the aligned kernel copy. Temp files are removed.
Usage: python benchmarks/bench_copy_alignment.py [--reps 12] [--mib 64]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

SRC_OFFSET = 64 * 2**20  # 2 MiB-aligned place in the source file


def kernel_copy(src: int, dst: int, offset: int, n: int) -> None:
    done = 0
    while done < n:
        done += os.copy_file_range(src, dst, n - done, offset + done)


def mapped_write(src: int, dst: int, offset: int, n: int, window: int = 2 * 2**20) -> None:
    pos, end = offset, offset + n
    while pos < end:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        stop = min(end, base + window)
        with mmap.mmap(src, stop - base, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ, offset=base) as m:
            view = memoryview(m)[pos - base:]
            k = 0
            while k < len(view):
                k += os.write(dst, view[k:])
            view.release()
        pos = stop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--mib", type=int, default=64)
    a = ap.parse_args()
    n = a.mib * 2**20
    cases = {  # name: (destination offset, copy function)
        "same offset mod 2 MiB (cp's case; the peer)": (0, kernel_copy),
        "same offset mod 64 KiB only": (65536, kernel_copy),
        "same offset mod 4 KiB only": (4096, kernel_copy),
        "off by 376 bytes": (376, kernel_copy),
        "off by 376 bytes, write() from 2 MiB mappings": (376, mapped_write),
    }
    with tempfile.TemporaryDirectory(prefix="enc-bench-align-") as d:
        src_path = Path(d) / "src.bin"
        with open(src_path, "wb") as f:
            block = os.urandom(2**20)
            for _ in range(SRC_OFFSET // 2**20 + a.mib + 1):
                f.write(block)
        src = os.open(src_path, os.O_RDONLY)
        kernel_copy(src, os.open(Path(d) / "warm.bin", os.O_WRONLY | os.O_CREAT), 0, os.fstat(src).st_size)
        os.unlink(Path(d) / "warm.bin")  # the source is in the page cache for every copy below
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(a.reps):
            for name, (shift, copy) in cases.items():
                out = Path(d) / "out.bin"
                dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.write(dst, b"\0" * shift)
                t = time.perf_counter()
                copy(src, dst, SRC_OFFSET, n)
                times[name].append(time.perf_counter() - t)
                os.close(dst)
                out.unlink()
        os.close(src)
    peer = statistics.median(next(iter(times.values())))
    print(f"{a.mib} MiB from a cached file, {a.reps} interleaved rounds, load average {os.getloadavg()[0]:.1f}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<48} {n / med / 1e9:5.2f} GB/s (median; min {min(ts) * 1e3:.1f} ms, max {max(ts) * 1e3:.1f} ms)"
              f"  = {peer / med:.2f}x the aligned copy's speed")


if __name__ == "__main__":
    main()
