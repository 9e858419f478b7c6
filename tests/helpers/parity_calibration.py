"""Calibrate Mistral/Mixtral parity bounds: worst metrics of CORRECT conversions, per dtype and depth.

    PYTHONPATH=src python -m tests.helpers.parity_calibration [--quick]

Builds random raw releases (tests/helpers/mistral_writer.py), converts them with enc in float32,
float16 and bfloat16, and prints, for each, the worst row of the layer-local report (the default
for Mistral) next to the end-to-end one (each converted layer fed its own previous output). The
README's "Parity thresholds" table states the bounds these numbers were compared with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from enc.convert import convert
from enc.converters.base import ConvertOptions
from enc.converters.mistral import MistralConverter
from enc.parity import Teacher, compare, weights_dtype
from tests.helpers.mistral_writer import tiny_hf, write_release

# (name, tiny_hf kwargs): the two Mixtral geometries of issue 17 and deep dense models
MODELS = {
    "mixtral-256x4": dict(moe=True, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, inter=512, experts=8,
                          top_k=2, rope_theta=1e6, vocab=1000),
    "mixtral-512x8": dict(moe=True, hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64, inter=1024, experts=8,
                          top_k=2, rope_theta=1e6, vocab=1000),
    "dense-64x16": dict(hidden=64, layers=16, vocab=1000),
    "dense-64x32": dict(hidden=64, layers=32, vocab=1000),
    "dense-128x32": dict(hidden=128, layers=32, heads=4, kv_heads=2, head_dim=32, inter=256, vocab=1000),
}
QUICK = ("mixtral-256x4", "dense-64x16")


def reports(src: Path, out: Path):
    conv = MistralConverter(src, ConvertOptions())
    probes, dtype = conv.probes(), weights_dtype(out)
    with torch.inference_mode():
        t = Teacher()
        local = compare(conv.reference_activations(probes), conv.converted_activations(out, probes, t), dtype,
                        teacher=t)
        e2e = compare(conv.reference_activations(probes), conv.converted_activations(out, probes), dtype)
    return local, e2e


def worst(rep) -> str:
    rows = [r for r in rep.rows if r.kind != "router"]
    routers = [r for r in rep.rows if r.kind == "router"]
    top1 = [r.top1 for r in rep.rows if r.top1 is not None]
    s = (f"nmse {max(r.nmse for r in rows):.2e}  rel {max(r.rel for r in rows):.3f}  "
         f"cos {min(r.cos for r in rows):.5f}  top1 {min(top1):.3f}")
    if routers:
        s += (f"  router-cos {min(r.cos for r in routers):.5f}  routing {min(r.routing for r in routers):.3f}")
    ff = rep.first_failure
    return s + ("  PASS" if rep.passed else f"  FAIL at {ff.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args(argv)
    names = QUICK if args.quick else tuple(MODELS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for seed in range(args.seeds):
                model = tiny_hf(**MODELS[name], seed=seed)
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    d = Path(tmp) / f"{name}-{seed}-{dtype}"
                    src = write_release(d / "src", model, dtype=dtype, tokenizer=None)
                    convert(src, d / "out", verify=False)
                    local, e2e = reports(src, d / "out")
                    tag = f"{name} seed {seed} {str(dtype)[6:]:9s}"
                    print(f"{tag} layer-local: {worst(local)}")
                    print(f"{' ' * len(tag)} end-to-end:  {worst(e2e)}")
                    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
