"""Claim (issue 16): `enc fill-mask` cold start (process start to answer) on an ALBERT-base-sized model
takes <= 0.35x the wall time of the transformers fill-mask pipeline on the same directory.

The model has ALBERT-base geometry (E=128, H=768, 12 layers, 12 heads, FFN 3072) with random
weights and the vocabulary of the sentencepiece model it ships with (the bundled example's when
present). Runs alternate, median of --repeat.

    python benchmarks/bench_fill_mask_cold.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from _util import ROOT, enc_bin, measure, median, spread

TEXT = "plants create [MASK] through photosynthesis."


def build(work: Path) -> Path:
    import sentencepiece as spm
    from tests.helpers.albert_release import hf_albert, train_spm, write_release

    example = ROOT / "examples" / "albert_tiny" / "30k-clean.model"
    spm_file = example if example.is_file() else train_spm(work / "spm")
    vocab = spm.SentencePieceProcessor(model_file=str(spm_file)).get_piece_size()
    model = hf_albert(vocab, 128, 768, 12, 1, 1, 12, 3072)
    src = write_release(work / "albert_base_release", model, spm_file)
    out = work / "albert-base-hf"
    measure([enc_bin(), "convert", str(src), "-o", str(out), "--no-verify"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "fill-mask"))
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    model_dir = build(work)
    ours_cmd = [enc_bin(), "fill-mask", TEXT, "--model", str(model_dir), "--top-k", "5", "--json"]
    peer = ("from transformers import pipeline; import json, sys; "
            f"p = pipeline('fill-mask', model=sys.argv[1], top_k=5); print(json.dumps(p({TEXT!r}), default=str))")
    peer_cmd = [sys.executable, "-c", peer, str(model_dir)]
    measure(ours_cmd)  # warm the page cache for both
    measure(peer_cmd)
    ours, theirs = [], []
    for _ in range(args.repeat):
        ours.append(measure(ours_cmd)[0])
        theirs.append(measure(peer_cmd)[0])
    ratio = median(ours) / median(theirs)
    per_run = [a / b for a, b in zip(ours, theirs, strict=True)]
    print(f"enc fill-mask:              {spread(ours)} s")
    print(f"transformers pipeline:      {spread(theirs)} s")
    print(f"ratio enc/transformers = {ratio:.2f}x (median/median; per run {min(per_run):.2f}x-{max(per_run):.2f}x) "
          f"target <= 0.35x: {'OK' if ratio <= 0.35 else 'MISSED'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
