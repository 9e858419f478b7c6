"""`enc parity` on a Mistral-7B-geometry bf16 raw release vs the transformers load-both peer.

Writes the raw release of bench_mistral_convert.py (dim 4096, 32 heads, 8 KV heads, FFN 14336,
vocab 32000, bf16, default 4 layers), converts it once with ``enc convert --no-verify``, then, each
in a fresh process (wall time and the process's peak RSS, VmHWM):

- ``enc parity SRC OUT --json``: the original-layout float32 reference against enc's runtime on the
  bf16 output, layer by layer (what the default ``enc convert`` runs before publishing);
- the peer, the obvious way to check a bf16 conversion with transformers: load the converted
  directory twice, in bfloat16 and in float32, run both on the same probes as enc (3 sequences of
  48, 17 and 6 tokens, right padded) with every hidden state, and compare them layer by layer.

Prints both and the ratios (targets of issue 16: wall <= 0.3x, peak RSS <= 0.2x the peer's), and
the per-phase times the default ``enc convert --json`` reports. ``--runs N`` repeats each side and
prints every run; the ratio uses the medians. Everything is written to one temp directory that is
deleted at the end. Usage: python benchmarks/bench_mistral_parity.py [--layers 4] [--runs 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mistral_convert import _RUNNER, measure, write_release  # noqa: E402

_PEER = r"""
import json, sys, time
t = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
out = sys.argv[1]
# the same probes as enc parity (enc.parity.make_probes: seeded, lengths 48/17/6, bos first, right padded)
g = torch.Generator().manual_seed(0)
lengths = [48, 17, 6]
ids = torch.zeros(3, 48, dtype=torch.long)
mask = torch.zeros(3, 48, dtype=torch.long)
for r, n in enumerate(lengths):
    row = torch.randint(3, 32000, (n,), generator=g)
    row[0] = 1
    ids[r, :n], mask[r, :n] = row, 1
m16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
m32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
with torch.inference_mode():
    a = m32(ids, attention_mask=mask, output_hidden_states=True)
    b = m16(ids, attention_mask=mask, output_hidden_states=True)
valid = mask.bool()
worst = 1.0
for x, y in zip(a.hidden_states, b.hidden_states):
    x, y = x[valid].double(), y[valid].double()
    worst = min(worst, torch.nn.functional.cosine_similarity(x, y, dim=-1).min().item())
top1 = (a.logits[valid].argmax(-1) == b.logits[valid].argmax(-1)).double().mean().item()
wall = time.perf_counter() - t
hwm_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": 0, "wall": wall, "peak_rss_mb": hwm_kb / 1024, "min_cos": worst, "top1": top1}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="enc-bench-parity-", dir=args.dir))
    try:
        src = root / f"mistral-7b-geometry-{args.layers}L"
        t = time.perf_counter()
        _, nbytes = write_release(src, args.layers)
        print(f"wrote {src}: {args.layers} layers, {nbytes / 1e9:.2f} GB bf16 in {time.perf_counter() - t:.0f}s")
        out = root / "hf"
        conv = measure(_RUNNER, "enc", "convert", str(src), "-o", str(out), "--no-verify", "--json")
        print(f"enc convert --no-verify: {conv['wall']:.1f}s")

        enc_runs, peer_runs = [], []
        for i in range(args.runs):
            e = measure(_RUNNER, "enc", "parity", str(src), str(out), "--json")
            if e["rc"] != 0:
                raise SystemExit(f"enc parity exited {e['rc']}")
            enc_runs.append(e)
            print(f"run {i + 1}: enc parity            {e['wall']:6.1f}s  peak RSS {e['peak_rss_mb']:6.0f} MB")
            p = measure(_PEER, str(out))
            peer_runs.append(p)
            print(f"run {i + 1}: transformers load-both {p['wall']:6.1f}s  peak RSS {p['peak_rss_mb']:6.0f} MB  "
                  f"(min cos {p['min_cos']:.4f}, top-1 {p['top1']:.3f})")
        ew = statistics.median(r["wall"] for r in enc_runs)
        pw = statistics.median(r["wall"] for r in peer_runs)
        er = statistics.median(r["peak_rss_mb"] for r in enc_runs)
        pr = statistics.median(r["peak_rss_mb"] for r in peer_runs)
        print(f"enc parity / transformers load-both: wall {ew / pw:.2f}x (target <= 0.3x), "
              f"peak RSS {er / pr:.2f}x (target <= 0.2x)")

        shutil.rmtree(out)
        stdout_json = root / "convert.json"
        code = _RUNNER.replace("rc = run(args)",
                               "import contextlib, io\n    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):"
                               f"\n        rc = run(args)\n    open({str(stdout_json)!r}, 'w').write(buf.getvalue())")
        full = measure(code, "enc", "convert", str(src), "-o", str(out), "--json")
        phases = json.loads(stdout_json.read_text()).get("phases", {})
        print(f"enc convert (default, with parity): {full['wall']:.1f}s  peak RSS {full['peak_rss_mb']:.0f} MB; "
              "phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")


if __name__ == "__main__":
    main()
