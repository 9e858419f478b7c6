"""Claim: `enc convert` of an `albert_extra_extra_large`-shaped keras-hub preset (AlbertMaskedLM, ~890 MB fp32
in Keras 3 H5 files) runs at a small multiple of `cp` of the same bytes, with peak RSS about 0.5 GB + the
largest tensor (it streams one H5 dataset at a time).

The preset is laid out exactly as keras-hub 0.32's `save_to_preset` writes one (H5 paths, `vars/<i>`
datasets, `name` attributes on `vars` groups; see tests/fixtures/keras_hub/), at xxlarge geometry, with
random weights written by h5py (keras-hub is not an enc dependency). Both sides run warm, alternated,
median of --repeat runs; conversion without verification (--no-verify).

    python benchmarks/bench_keras_hub_convert.py [--size xxlarge|base] [--repeat 3]
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
from _util import ROOT, cp_vs_convert, median

SIZES = {  # V, E, H, L, N, F
    "xxlarge": (30000, 128, 4096, 12, 64, 16384),
    "base": (30000, 128, 768, 12, 12, 3072),
}
FIX = ROOT / "tests" / "fixtures" / "keras_hub" / "mlm_g1"


def build(dst: Path, size: str) -> int:
    import h5py

    V, E, H, L, N, F = SIZES[size]
    D = H // N
    rng = np.random.default_rng(0)
    largest = 0

    def put(f, path: str, shape: tuple, layer_name: str) -> None:
        nonlocal largest
        ds = f.create_dataset(path, shape=shape, dtype="float32")
        ds[...] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        f[path.rsplit("/", 1)[0]].attrs["name"] = layer_name
        largest = max(largest, int(np.prod(shape)) * 4)

    shutil.copytree(FIX, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["config"].update(vocabulary_size=V, num_layers=L, num_heads=N, num_groups=1, num_inner_repetitions=1,
                         embedding_dim=E, hidden_dim=H, intermediate_dim=F, max_sequence_length=512)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    enc = "layers/transformer_encoder/"
    a = enc + "_self_attention_layer/"
    with h5py.File(dst / "model.weights.h5", "w") as f:
        put(f, "layers/reversible_embedding/vars/0", (V, E), "token_embedding")
        put(f, "layers/position_embedding/vars/0", (512, E), "position_embedding")
        put(f, "layers/embedding/vars/0", (2, E), "segment_embedding")
        for i in range(2):
            put(f, f"layers/layer_normalization/vars/{i}", (E,), "embeddings_layer_norm")
        put(f, "layers/dense/vars/0", (E, H), "embedding_projection")
        put(f, "layers/dense/vars/1", (H,), "embedding_projection")
        f.create_group(enc + "vars").attrs["name"] = "group_0_inner_layer_0"
        for n, nm in (("query", "query"), ("key", "key"), ("value", "value")):
            put(f, a + f"{n}_dense/vars/0", (H, N, D), nm)
            put(f, a + f"{n}_dense/vars/1", (N, D), nm)
        put(f, a + "output_dense/vars/0", (N, D, H), "attention_output")
        put(f, a + "output_dense/vars/1", (H,), "attention_output")
        for ln in ("_self_attention_layer_norm", "_feedforward_layer_norm"):
            for i in range(2):
                put(f, enc + f"{ln}/vars/{i}", (H,), ln.lstrip("_"))
        put(f, enc + "_feedforward_intermediate_dense/vars/0", (H, F), "feedforward_intermediate_dense")
        put(f, enc + "_feedforward_intermediate_dense/vars/1", (F,), "feedforward_intermediate_dense")
        put(f, enc + "_feedforward_output_dense/vars/0", (F, H), "feedforward_output_dense")
        put(f, enc + "_feedforward_output_dense/vars/1", (H,), "feedforward_output_dense")
        put(f, "layers/dense_1/vars/0", (H, H), "pooled_dense")
        put(f, "layers/dense_1/vars/1", (H,), "pooled_dense")
    with h5py.File(dst / "task.weights.h5", "w") as f:
        h = "layers/masked_lm_head/"
        put(f, h + "_intermediate_dense/vars/0", (H, E), "intermediate_dense")
        put(f, h + "_intermediate_dense/vars/1", (E,), "intermediate_dense")
        for i in range(2):
            put(f, h + f"_intermediate_layer_norm/vars/{i}", (E,), "intermediate_layer_norm")
        put(f, h + "vars/0", (V,), "mlm_head")
        f.create_dataset("optimizer/vars/0", data=np.int32(0))
        f.create_dataset("optimizer/vars/1", data=np.float32(1e-3))
    return largest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="xxlarge")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out"))
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    src = work / f"keras_hub_albert_{args.size}"
    if args.build_only:
        print(build(src, args.size))
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    # Built in a child so this process (whose RSS high-water mark children inherit) stays small.
    largest = int(subprocess.run([sys.executable, __file__, "--build-only", "--size", args.size, "--workdir",
                                  str(work)], check=True, capture_output=True, text=True).stdout.split()[-1])
    files = [p for p in src.rglob("*") if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)
    print(f"built {src} ({nbytes / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB) in "
          f"{time.perf_counter() - t0:.1f}s")
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm the cache

    cp_t, enc_t, enc_rss, _ = cp_vs_convert(src, work, args.repeat)
    ratio = median(enc_t) / median(cp_t)
    print(f"cp:          {median(cp_t):6.2f} s (median of {args.repeat}; runs {', '.join(f'{t:.2f}' for t in cp_t)})")
    print(f"enc convert: {median(enc_t):6.2f} s (runs {', '.join(f'{t:.2f}' for t in enc_t)}), "
          f"peak RSS {max(enc_rss) / 1e6:.0f} MB")
    print(f"ratio enc/cp = {ratio:.2f}x")
    budget = 0.5e9 + largest
    print(f"peak RSS {max(enc_rss) / 1e6:.0f} MB vs budget 0.5 GB + largest tensor = {budget / 1e6:.0f} MB: "
          f"{'OK' if max(enc_rss) < budget else 'MISSED'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
