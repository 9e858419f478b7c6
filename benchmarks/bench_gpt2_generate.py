"""enc generate vs transformers generate() on the same converted GPT-2-345M-shaped directory.

Setup (skipped with --model DIR): random GPT-2 medium weights (hidden 1024, 24 layers, 16 heads,
vocab 50257 padded to 50304 as Megatron does) are written in Megatron's layout as an NGC-style zip
(float16) with a synthetic byte-level BPE of GPT-2's size (50257 tokens, 256 byte symbols + merges),
and converted by ``enc convert`` (so the directory is what a user gets).

Then, in one process, both runtimes load that directory in float32 and decode from the same prompt
("The meaning of life is"), interleaved, ``--rounds`` times each:

- enc: ``enc.generation.generate`` (what ``enc generate`` runs: static KV cache, sampler, streaming
  detokenisation), tokens timed by its ``on_token`` callback;
- transformers: ``GPT2LMHeadModel.from_pretrained(dir).generate``, tokens timed by a stopping
  criterion (called once per generated token).

Decode tokens/s = (N - 1) / (time of token N - time of token 1): prefill excluded on both sides.
Settings: greedy (the token ids must be identical), and sampling (--temp 0.8 --top-k 40, top-p and
min-p off on both sides). Prints medians and the ratio enc / transformers (target >= 1.2x).

Threads: ``--threads 1`` by default. This machine's 2 cores are shared; when they are oversubscribed
an OpenMP barrier makes every multi-threaded op wait for a scheduler slice (tens of ms per token), so
single-thread numbers are the stable ones. ``--threads 0`` keeps torch's default.
Usage: python benchmarks/bench_gpt2_generate.py [--tokens 48] [--rounds 3] [--model DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _util import ROOT, enc_bin, median  # noqa: E402 - path set up by _util

HIDDEN, LAYERS, HEADS, VOCAB, PADDED, POSITIONS = 1024, 24, 16, 50257, 50304, 1024
PROMPT = "The meaning of life is"


def synthetic_bpe(vocab_path: Path, merges_path: Path, size: int = VOCAB, seed: int = 0) -> None:
    """A byte-level BPE of ``size`` tokens: the 256 byte symbols, merges of random pairs, <|endoftext|> last."""
    from tokenizers.pre_tokenizers import ByteLevel

    rng = random.Random(seed)
    tokens = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    while len(vocab) < size - 1:
        a, b = rng.choice(tokens[: 256 + len(merges) // 2]), rng.choice(tokens[:256])
        if a + b not in vocab and len(a + b) <= 12:
            vocab[a + b] = len(vocab)
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def make_converted(work: Path) -> Path:
    from tests.helpers.megatron_writer import Spec, pack_zip, write_dir

    from enc.models.gpt2 import GPT2Config, build

    cfg = GPT2Config(vocab_size=PADDED, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in build(cfg).state_dict().items():
        if k == "lm_head.weight":
            continue
        t = torch.randn(v.shape, generator=g) * (0.02 if v.dim() == 2 else 0.1)
        state[k] = (t + 1.0 if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else t).half()
    spec = Spec("gpt2", HIDDEN, HEADS, LAYERS, 4 * HIDDEN, POSITIONS, PADDED, version=0.0, args=False,
                legacy_format=True)
    src = write_dir(work / "ckpt", spec, state)
    del state
    zip_path = pack_zip(src, work / "megatron_gpt2_345m_v0_0.zip")
    shutil.rmtree(src)
    synthetic_bpe(work / "gpt2-vocab.json", work / "gpt2-merges.txt")
    out = work / "megatron-gpt2-345m"
    subprocess.run([enc_bin(), "convert", str(zip_path), "-o", str(out), "--vocab", str(work / "gpt2-vocab.json"),
                    "--merges", str(work / "gpt2-merges.txt"), "--no-verify"], check=True)
    zip_path.unlink()
    return out


def tokens_per_s(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run_enc(model, tok, prompt_ids: list[int], n: int, sample: bool, seed: int) -> tuple[float, list[int]]:
    from enc.generation import Settings, generate

    stamps: list[float] = []
    s = Settings(max_new_tokens=n, temp=0.8 if sample else 0.0, top_k=40, top_p=1.0, min_p=0.0, seed=seed,
                 ignore_eos=True)
    res = generate(model, tok, prompt_ids, s, on_token=lambda i, text: stamps.append(time.perf_counter()) if i >= 0
                   else None)
    return tokens_per_s(stamps), res.token_ids


def run_hf(model, prompt_ids: list[int], n: int, sample: bool, seed: int, eos: int) -> tuple[float, list[int]]:
    import transformers

    stamps: list[float] = []

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 1.0} if sample else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, pad_token_id=eos,
                             stopping_criteria=transformers.StoppingCriteriaList([Stamp()]), **kw)
    return tokens_per_s(stamps), out[0, len(prompt_ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, help="an existing converted GPT-2 directory (skips the setup)")
    ap.add_argument("--keep", type=Path, help="keep the converted directory here")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="enc-bench-gpt2-", dir=a.keep.parent if a.keep else None))
    try:
        t0 = time.perf_counter()
        model_dir = a.model or make_converted(work)
        setup = time.perf_counter() - t0
        import transformers

        from enc.models import load_model
        from enc.tokenization import load_tokenizer

        tok = load_tokenizer(model_dir)
        prompt_ids = tok.encode(PROMPT).ids
        ours = load_model(model_dir, dtype=torch.float32)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = tok.eos_id
        print(f"model: {model_dir} (setup {setup:.0f}s), prompt {len(prompt_ids)} tokens, {a.tokens} new tokens, "
              f"float32, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
              f"transformers {transformers.__version__}")
        rows = []
        for label, sample in (("greedy", False), ("temp 0.8, top-k 40", True)):
            enc_tps, hf_tps = [], []
            for r in range(a.rounds):
                e, e_ids = run_enc(ours, tok, prompt_ids, a.tokens, sample, seed=r)
                h, h_ids = run_hf(theirs, prompt_ids, a.tokens, sample, seed=r, eos=eos)
                enc_tps.append(e)
                hf_tps.append(h)
                if not sample and e_ids != h_ids:
                    raise SystemExit(f"greedy outputs differ:\n enc {e_ids}\n hf  {h_ids}")
                assert len(e_ids) == len(h_ids) == a.tokens
            rows.append((label, median(enc_tps), median(hf_tps), enc_tps, hf_tps))
        print(f"{'settings':<20} {'enc tok/s':>10} {'transformers tok/s':>19} {'ratio':>7}   (runs enc | hf)")
        for label, e, h, es, hs in rows:
            print(f"{label:<20} {e:>10.2f} {h:>19.2f} {e / h:>6.2f}x   ({', '.join(f'{x:.1f}' for x in es)} | "
                  f"{', '.join(f'{x:.1f}' for x in hs)})")
        print("greedy token ids identical: yes")
        if a.keep and not a.model:
            shutil.move(str(model_dir), str(a.keep))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
