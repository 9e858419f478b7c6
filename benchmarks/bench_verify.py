"""`enc verify OUT` (no original needed) against `enc parity SRC OUT` (needs it), Mistral-7B geometry.

Writes a raw bf16 release with Mistral 7B v0.1's geometry and N layers (default 2), converts it
(parity on, so the golden record and the output hashes are written), then times, each in a fresh
process: ``enc parity SRC OUT`` (the peer: it needs the original checkpoint), ``enc verify OUT``
(numerics + sha256 of every file), ``--no-hash`` and ``--hash-only``. It also prints the golden
record's size and what hashing the outputs costs inside ``enc convert`` (sha256 of OUT, timed in
this process, next to ``enc convert --no-verify``'s wall time).

Everything goes into one temp directory that is deleted at the end (disk is shared).
Usage: python benchmarks/bench_verify.py [--layers 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mistral_convert import _RUNNER, du, measure, write_release  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="enc-bench-verify-", dir=args.dir))
    try:
        src = root / f"mistral-7b-geometry-{args.layers}L"
        _, nbytes = write_release(src, args.layers)
        print(f"wrote {src.name}: {args.layers} layers, {nbytes / 1e9:.2f} GB bf16")
        out = root / "hf"
        conv = measure(_RUNNER, "enc", "convert", str(src), "-o", str(out), "--json")
        print(f"enc convert (parity + record + hashes): {conv['wall']:6.1f}s  peak RSS {conv['peak_rss_mb']:6.0f} MB")
        plain = measure(_RUNNER, "enc", "convert", str(src), "-o", str(root / "plain"), "--no-verify", "--json")
        shutil.rmtree(root / "plain")
        from enc.verify import output_hashes

        t = time.perf_counter()
        output_hashes(out)
        hash_s = time.perf_counter() - t
        record = (out / "enc_parity.safetensors").stat().st_size
        print(f"output {du(out) / 1e9:.2f} GB; golden record {record / 1e3:.0f} KB "
              f"({record / du(out) * 100:.3f}% of the output)")
        print(f"sha256 of the output: {hash_s:.1f}s, part of enc convert --no-verify's {plain['wall']:.1f}s "
              f"({hash_s / plain['wall'] * 100:.0f}%)")

        runs = {
            "enc parity SRC OUT (needs the original)": ["parity", str(src), str(out), "--json"],
            "enc verify OUT": ["verify", str(out), "--json"],
            "enc verify OUT --no-hash": ["verify", str(out), "--no-hash", "--json"],
            "enc verify OUT --hash-only": ["verify", str(out), "--hash-only", "--json"],
        }
        res = {name: measure(_RUNNER, "enc", *cmd) for name, cmd in runs.items()}
        for name, r in res.items():
            if r["rc"] != 0:
                raise SystemExit(f"{name} exited {r['rc']}")
            print(f"{name:42s} {r['wall']:6.1f}s  peak RSS {r['peak_rss_mb']:6.0f} MB")
        peer = res["enc parity SRC OUT (needs the original)"]["wall"]
        mine = res["enc verify OUT"]["wall"]
        print(f"enc verify / enc parity wall = {mine / peer:.2f}x (and verify needs no original checkpoint)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")


if __name__ == "__main__":
    main()
