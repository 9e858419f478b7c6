"""Claim (issue 16): `enc convert` on an ALBERT-xxlarge-sized TF checkpoint (~890 MB fp32, every matrix
transposed, every tensor's CRC32C checked) takes <= 3x the wall time of `cp` of the same bytes, with
peak RSS < 0.5 GB + the largest tensor.

Both run warm (files in the page cache), alternated, median of --repeat runs. The conversion is
timed without verification (--no-verify); a separate run with parity reports its own time and RSS.

    python benchmarks/bench_albert_convert.py [--size xxlarge|base] [--repeat 3] [--with-parity]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _util import ROOT, cp_vs_convert, enc_bin, measure, median, spread

SIZES = {  # V, E, H, L, N, F
    "xxlarge": (30000, 128, 4096, 12, 64, 16384),
    "base": (30000, 128, 768, 12, 12, 3072),
}


def build(dst, size: str) -> int:
    """Write a random ALBERT release of the given size; return the largest tensor's bytes."""
    from tests.helpers.tf_bundle import write_bundle

    V, E, H, L, N, F = SIZES[size]
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    g = "bert/encoder/transformer/group_0/inner_group_0/"
    v = {
        "bert/embeddings/word_embeddings": r(V, E), "bert/embeddings/position_embeddings": r(512, E),
        "bert/embeddings/token_type_embeddings": r(2, E), "bert/embeddings/LayerNorm/gamma": r(E),
        "bert/embeddings/LayerNorm/beta": r(E), "bert/encoder/embedding_hidden_mapping_in/kernel": r(E, H),
        "bert/encoder/embedding_hidden_mapping_in/bias": r(H),
        g + "attention_1/self/query/kernel": r(H, H), g + "attention_1/self/query/bias": r(H),
        g + "attention_1/self/key/kernel": r(H, H), g + "attention_1/self/key/bias": r(H),
        g + "attention_1/self/value/kernel": r(H, H), g + "attention_1/self/value/bias": r(H),
        g + "attention_1/output/dense/kernel": r(H, H), g + "attention_1/output/dense/bias": r(H),
        g + "LayerNorm/gamma": r(H), g + "LayerNorm/beta": r(H),
        g + "ffn_1/intermediate/dense/kernel": r(H, F), g + "ffn_1/intermediate/dense/bias": r(F),
        g + "ffn_1/intermediate/output/dense/kernel": r(F, H), g + "ffn_1/intermediate/output/dense/bias": r(H),
        g + "LayerNorm_1/gamma": r(H), g + "LayerNorm_1/beta": r(H),
        "bert/pooler/dense/kernel": r(H, H), "bert/pooler/dense/bias": r(H),
        "cls/predictions/transform/dense/kernel": r(H, E), "cls/predictions/transform/dense/bias": r(E),
        "cls/predictions/transform/LayerNorm/gamma": r(E), "cls/predictions/transform/LayerNorm/beta": r(E),
        "cls/predictions/output_bias": r(V), "cls/seq_relationship/output_weights": r(2, H),
        "cls/seq_relationship/output_bias": r(2), "global_step": np.array(0, np.int64),
    }
    dst.mkdir(parents=True)
    write_bundle(dst / "model.ckpt-best", v)
    cfg = {"vocab_size": V, "embedding_size": E, "hidden_size": H, "num_hidden_layers": L, "num_hidden_groups": 1,
           "inner_group_num": 1, "num_attention_heads": N, "intermediate_size": F, "hidden_act": "gelu",
           "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02}
    (dst / "albert_config.json").write_text(json.dumps(cfg))
    from tests.helpers.albert_release import train_spm

    shutil.copy(train_spm(dst.parent / "spm"), dst / "30k-clean.model")
    return max(a.nbytes for a in v.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="xxlarge")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out"))
    ap.add_argument("--with-parity", action="store_true")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    src = work / f"albert_{args.size}"
    if args.build_only:
        print(build(src, args.size))
        return
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    # Build in a child: Linux carries a parent's RSS high-water mark into forked children, so this
    # process must stay small for the children's peak RSS to mean anything.
    largest = int(subprocess.run([sys.executable, __file__, "--build-only", "--size", args.size, "--workdir",
                                  str(work)], check=True, capture_output=True, text=True).stdout.split()[-1])
    nbytes = sum(p.stat().st_size for p in src.iterdir())
    print(f"built {src} ({nbytes / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s")
    subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL, check=True)  # warm the cache

    cp_t, enc_t, enc_rss, _ = cp_vs_convert(src, work, args.repeat)
    ratio = median(enc_t) / median(cp_t)
    budget = 0.5e9 + largest
    per_run = [e / c for e, c in zip(enc_t, cp_t, strict=True)]
    print(f"cp:          {spread(cp_t)} s")
    print(f"enc convert: {spread(enc_t)} s, peak RSS {max(enc_rss) / 1e6:.0f} MB")
    print(f"ratio enc/cp = {ratio:.2f}x (median/median; per run {min(per_run):.2f}x-{max(per_run):.2f}x) "
          f"target <= 3x: {'OK' if ratio <= 3 else 'MISSED'}")
    print(f"peak RSS {max(enc_rss) / 1e6:.0f} MB vs budget 0.5 GB + largest tensor = {budget / 1e6:.0f} MB: "
          f"{'OK' if max(enc_rss) < budget else 'MISSED'}")
    if args.with_parity:
        out = work / "hf-verified"
        wall, rss, _ = measure([enc_bin(), "convert", str(src), "-o", str(out), "--json"])
        print(f"enc convert with parity: {wall:.2f} s, peak RSS {rss / 1e6:.0f} MB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
