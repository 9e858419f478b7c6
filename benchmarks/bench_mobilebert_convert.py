"""Claim: `enc convert` on a full-size MobileBERT-shaped TF checkpoint (the OPT release's geometry,
~25M parameters, with Adam slots and global_step: ~300 MB on disk, of which the converter keeps a
third) takes <= 1.5x the wall time of `cp` of the same bytes, with peak RSS < 0.5 GB + the largest
tensor.

Both run warm (files in the page cache), alternated, median of --repeat runs. The conversion is
timed without verification (--no-verify); --with-parity adds one verified run (its time and RSS).

    python benchmarks/bench_mobilebert_convert.py [--repeat 3] [--with-parity]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _util import ROOT, cp_vs_convert, enc_bin, measure, median

OPT = dict(vocab_size=30522, hidden_size=512, embedding_size=128, intra_bottleneck_size=128, num_attention_heads=4,
           intermediate_size=512, num_hidden_layers=24, max_position_embeddings=512, hidden_act="relu",
           type_vocab_size=2, trigram_input=True, use_bottleneck=True, use_bottleneck_attention=False,
           key_query_shared_bottleneck=True, num_feedforward_networks=4, normalization_type="no_norm",
           classifier_activation=False)


def build(dst: Path) -> tuple[int, int]:
    """Write the random release; return (parameters, largest tensor's bytes)."""
    from tests.helpers.mobilebert_release import hf_mobilebert, tf_variables, write_release

    model = hf_mobilebert(std=0.02, **OPT)
    weights = tf_variables(model)
    write_release(dst, model, config_name="uncased_L-24_H-128_B-512_A-4_F-4_OPT.json", slots=True)
    return sum(a.size for a in weights.values()), max(a.nbytes for a in weights.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out"))
    ap.add_argument("--with-parity", action="store_true")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    src = work / "mobilebert_opt"
    if args.build_only:
        print(*build(src))
        return
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    # Build in a child, so this process stays small (children inherit the parent's RSS high-water mark).
    params, largest = map(int, subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(work)],
                                              check=True, capture_output=True, text=True).stdout.split()[-2:])
    nbytes = sum(p.stat().st_size for p in src.iterdir())
    print(f"built {src}: {params / 1e6:.1f}M parameters (+ Adam slots), {nbytes / 1e6:.0f} MB on disk, "
          f"largest tensor {largest / 1e6:.1f} MB, in {time.perf_counter() - t0:.1f}s")
    subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL, check=True)  # warm the cache

    cp_t, enc_t, enc_rss, written = cp_vs_convert(src, work, args.repeat)
    ratio = median(enc_t) / median(cp_t)
    budget = 0.5e9 + largest
    print(f"cp -r (all {nbytes / 1e6:.0f} MB): {median(cp_t):6.2f} s (median of {args.repeat})")
    print(f"enc convert (writes {written / 1e6:.0f} MB): {median(enc_t):6.2f} s, peak RSS {max(enc_rss) / 1e6:.0f} MB")
    print(f"ratio enc/cp = {ratio:.2f}x (target <= 1.5x): {'OK' if ratio <= 1.5 else 'MISSED'}")
    print(f"peak RSS {max(enc_rss) / 1e6:.0f} MB vs budget 0.5 GB + largest tensor = {budget / 1e6:.0f} MB: "
          f"{'OK' if max(enc_rss) < budget else 'MISSED'}")
    if args.with_parity:
        out = work / "hf-verified"
        wall, rss, _ = measure([enc_bin(), "convert", str(src), "-o", str(out), "--json"])
        print(f"enc convert with parity: {wall:.2f} s, peak RSS {rss / 1e6:.0f} MB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
