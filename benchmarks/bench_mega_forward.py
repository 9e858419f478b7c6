"""Claim: enc's MEGA runtime runs a masked-LM forward at least as fast as transformers 4.57 (the last release
with MEGA), on the same 4-layer wikitext-shaped model (mnaylor/mega-base-wikitext geometry: hidden 128,
z 64, intermediate 256, EMA dim 16, NFFN 256, scalenorm, rotary bias, vocab 30522), measured the same way.

transformers 4.57 cannot live beside transformers 5, so its side runs in another interpreter (a throwaway venv
with `pip install torch==2.13.0 "transformers==4.57.*"`, given with --t457-python). Both sides: one thread,
batch 8 x 512 tokens, fp32, inference mode, 2 warm-up passes, then --repeat timed passes; the script prints each
side's tokens/s (median) and their ratio. The model is saved once by the 4.57 side (save_pretrained) and
loaded by enc from that directory.

    python benchmarks/bench_mega_forward.py --t457-python /tmp/t457/bin/python [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _util import ROOT

GEOMETRY = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=4, intermediate_size=256, ema_projection_size=16,
                shared_representation_size=64, nffn_hidden_size=256, max_positions=2048, dropout_prob=0.0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)

TIMER = textwrap.dedent("""
    import json, statistics, sys, time, torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, T, repeat = {B}, {T}, {repeat}
    ids = torch.randint(4, 30000, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    model = build()
    times = []
    with torch.inference_mode():
        for i in range(2 + repeat):
            t0 = time.perf_counter()
            call(model, ids, mask)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    print(json.dumps({{"tokens_per_s": B * T / statistics.median(times), "runs": times}}))
""")

HF_SIDE = """
import sys
from transformers.models.deprecated.mega import MegaConfig, MegaForMaskedLM
def build():
    m = MegaForMaskedLM(MegaConfig(**{geometry})).eval()
    m.save_pretrained(sys.argv[1], safe_serialization=True)
    return m
def call(m, ids, mask):
    return m(input_ids=ids, attention_mask=mask).logits
"""

ENC_SIDE = """
import sys
sys.path.insert(0, {src!r})
from enc.models.mega import from_pretrained
def build():
    return from_pretrained(sys.argv[1])
def call(m, ids, mask):
    return m(ids, mask)["logits"]
"""


def run_side(python: str, body: str, model_dir: Path, B: int, T: int, repeat: int) -> dict:
    code = body + TIMER.format(B=B, T=T, repeat=repeat)
    out = subprocess.run([python, "-c", code, str(model_dir)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t457-python", required=True, help="python of a venv with transformers 4.57 + torch")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "mega"
        hf = run_side(args.t457_python, HF_SIDE.format(geometry=GEOMETRY), model_dir, args.batch, args.length,
                      args.repeat)
        enc = run_side(sys.executable, ENC_SIDE.format(src=str(ROOT / "src")), model_dir, args.batch, args.length,
                       args.repeat)
    print(f"MEGA MLM forward, 4 layers, batch {args.batch} x {args.length} tokens, fp32, 1 thread:")
    print(f"transformers 4.57: {hf['tokens_per_s']:8.0f} tokens/s (runs {', '.join(f'{t:.3f}' for t in hf['runs'])} s)")
    print(f"enc:               {enc['tokens_per_s']:8.0f} tokens/s (runs {', '.join(f'{t:.3f}' for t in enc['runs'])} s)")
    print(f"ratio enc/transformers = {enc['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
          f"(median of {args.repeat}; spread enc {min(enc['runs']):.3f}-{max(enc['runs']):.3f} s, "
          f"transformers {min(hf['runs']):.3f}-{max(hf['runs']):.3f} s)")


if __name__ == "__main__":
    main()
