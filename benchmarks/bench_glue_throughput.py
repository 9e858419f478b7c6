"""GLUE scoring throughput: enc vs a plain transformers loop, same model, same token ids, same run.

Model: an ALBERT-base-sized classifier (albert-base-v2 geometry: E 128, H 768, 12 layers, 12 heads,
FFN 3072, vocab 30000), random weights, built by transformers and saved as an HF directory.
Inputs: SST-2-like sentences: token lengths drawn from a distribution shaped like SST-2 dev under
ALBERT's sentencepiece (median ~23, long tail to ~66 incl. [CLS]/[SEP]), random ids, 872 examples.

- transformers: ``AlbertForSequenceClassification`` (SDPA attention), ``torch.no_grad``, batches of
  32 in dataset order, each padded to its longest sequence, with an attention mask.
- enc: ``enc eval glue``'s scoring path (``enc.evals.runtime.predict`` over ``enc.models.heads``):
  length-sorted batches of 32 with dynamic padding, no mask for unpadded batches,
  ``torch.inference_mode``.

Both run in float32 (``--bf16`` runs both under bf16 autocast). Tokenization is excluded on
both sides. Prints examples/s for each, the ratio, and the agreement of the predicted labels.

    python benchmarks/bench_glue_throughput.py [--device cpu|cuda] [--n 872] [--repeats 2] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# SST-2 dev token lengths under ALBERT's sentencepiece, as (length bucket upper bound, share)
LENGTH_HIST = [(8, 0.04), (12, 0.08), (16, 0.12), (20, 0.14), (24, 0.14), (28, 0.12), (32, 0.10), (38, 0.10),
               (44, 0.07), (52, 0.05), (66, 0.04)]


def sst2_like_lengths(n: int, rng: np.random.Generator) -> list[int]:
    bounds = [0] + [b for b, _ in LENGTH_HIST]
    shares = np.array([s for _, s in LENGTH_HIST])
    buckets = rng.choice(len(LENGTH_HIST), size=n, p=shares / shares.sum())
    return [int(rng.integers(max(3, bounds[k] + 1), bounds[k + 1] + 1)) for k in buckets]


def build_model(out: Path) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = transformers.AlbertConfig(vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
                                    num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_new",
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                                    id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(0)
    transformers.AlbertForSequenceClassification(cfg).save_pretrained(out)


def transformers_loop(model, batches: list[list[list[int]]], device: str, bf16: bool) -> list[int]:
    preds: list[int] = []
    ctx = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for batch in batches:
            T = max(len(x) for x in batch)
            ids = torch.tensor([x + [0] * (T - len(x)) for x in batch], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in batch], device=device)
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
            preds += logits.argmax(-1).tolist()
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=872, help="examples (SST-2 dev has 872)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from enc.evals.runtime import Encoded, predict
    from enc.models.heads import load_task_model

    rng = np.random.default_rng(0)
    lengths = sst2_like_lengths(args.n, rng)
    seqs = [[2, *rng.integers(5, 30000, L - 2).tolist(), 3] for L in lengths]
    items = [Encoded(s, [0] * len(s)) for s in seqs]
    batches = [seqs[i:i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]

    with tempfile.TemporaryDirectory() as d:
        build_model(Path(d))
        hf = transformers.AlbertForSequenceClassification.from_pretrained(d).eval().to(args.device)
        ours = load_task_model(d, "sequence-classification").to(args.device)
    precision = "bf16" if args.bf16 else "fp32"

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_hf() -> list[int]:
        return transformers_loop(hf, batches, args.device, args.bf16)

    def run_enc() -> list[int]:
        outs = predict(ours, items, 0, args.device, args.batch_size, precision=precision)
        return [int(np.argmax(o)) for o in outs]

    with torch.no_grad():  # warm up (allocator, kernels) on a few batches
        transformers_loop(hf, batches[:2], args.device, args.bf16)
        predict(ours, items[:64], 0, args.device, args.batch_size, precision=precision)
    times: dict[str, list[float]] = {"transformers": [], "enc": []}
    preds: dict[str, list[int]] = {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both sides alike
        for name, fn in (("transformers", run_hf), ("enc", run_enc)):
            sync()
            t0 = time.perf_counter()
            preds[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    agree = float(np.mean(np.array(preds["enc"]) == np.array(preds["transformers"])))
    tokens = sum(lengths)
    padded = sum(len(b) * max(len(x) for x in b) for b in batches)
    print(f"device {args.device}  threads {torch.get_num_threads()}  {precision}  examples {args.n}  "
          f"batch {args.batch_size}  real tokens {tokens}  transformers padded tokens {padded}")
    for k in ("transformers", "enc"):
        print(f"{k:>13}: {rate[k]:8.1f} examples/s  (median of {args.repeats}: "
              f"{', '.join(f'{t:.3f}s' for t in times[k])})")
    print(f"label agreement {agree:.4f}")
    best = min(times["transformers"]) / min(times["enc"])
    print(f"ratio enc/transformers: {rate['enc'] / rate['transformers']:.2f}x  (best run vs best run: {best:.2f}x)")


if __name__ == "__main__":
    main()
