"""Convert a BERT-345M-shaped NGC zip: wall time vs copying the zip, and peak RSS.

Setup: random Megatron BERT weights of the NGC ``megatron_bert_345m_v0_1_uncased`` shape (hidden 1024,
24 layers, 16 heads, FFN 4096, 512 positions, vocab 30522 padded to 30592, float16: 336M parameters,
~0.67 GB) are written in Megatron's layout (``release/mp_rank_00/model_optim_rng.pt``, torch's legacy
serialization as 2020 Megatron wrote it, no ``args``), packed into a STORED zip with
``latest_checkpointed_iteration.txt``, plus a 30522-token WordPiece vocab.txt.

Measured, each in its own process (wall time, and that process's own peak RSS from wait4), with the
zip already in the page cache for all of them, interleaved over ``--rounds``:

- peer: ``cp`` of the zip (reads and writes the same bytes once);
- ``enc convert ZIP -o OUT --vocab vocab.txt --no-verify`` (read in place, merged, written);
- ``enc convert ZIP -o OUT --vocab vocab.txt`` (the default: plus the parity check);
- context: ``torch.load`` of the whole member (what transformers' conversion script does first).

plus ``python -c "import torch, enc.converters.megatron"``: the interpreter start-up every enc run pays.
The parent process stays small (it imports no torch and builds the checkpoint in a child), since a
child's peak RSS as wait4 reports it includes what it inherited at fork.

Prints medians and the ratios convert / copy and peak RSS / checkpoint size. Temp files are removed.
Usage: python benchmarks/bench_megatron_convert.py [--rounds 2] [--format legacy|zip]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _util import ROOT, enc_bin, measure, median, spread  # noqa: E402 - path set up by _util

HIDDEN, LAYERS, HEADS, FFN, POSITIONS, VOCAB, PADDED = 1024, 24, 16, 4096, 512, 30522, 30592


def write_vocab(path: Path) -> None:
    """BERT-uncased's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) and filler words."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"w{i}" if i % 2 else f"##w{i}" for i in range(VOCAB - len(tokens))]
    path.write_text("\n".join(tokens) + "\n")


def write_zip(work: Path, fmt: str) -> Path:
    """Runs in a child process (see --make): the parent never holds the tensors, nor imports torch."""
    import torch
    from tests.helpers.megatron_writer import Spec, pack_zip, write_dir

    from enc.models.megatron_bert import MegatronBertConfig, build

    cfg = MegatronBertConfig(vocab_size=PADDED, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in build(cfg).state_dict().items():
        if k.startswith("cls.predictions.decoder."):
            continue
        t = torch.randn(v.shape, generator=g) * (0.02 if v.dim() == 2 else 0.1)
        state[k] = (t + 1.0 if k.endswith(("ln.weight", "LayerNorm.weight")) else t).half()
    spec = Spec("bert", HIDDEN, HEADS, LAYERS, FFN, POSITIONS, PADDED, version=0.0, args=False,
                legacy_format=fmt == "legacy")
    src = write_dir(work / "ckpt", spec, state)
    del state
    z = pack_zip(src, work / "megatron_bert_345m_v0_1_uncased.zip")
    shutil.rmtree(src)
    return z


# transformers' convert_megatron_bert_checkpoint.py: torch.load of the zip member, whole (our own file: trusted)
LOAD_ALL = """
import sys, zipfile, torch
with zipfile.ZipFile(sys.argv[1]) as zf, zf.open("release/mp_rank_00/model_optim_rng.pt") as f:
    sd = torch.load(f, map_location="cpu", weights_only=False)
print(sum(t.numel() for t in sd["model"]["language_model"]["transformer"].values()))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--format", choices=["legacy", "zip"], default="legacy", help="torch serialization of the .pt")
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)  # internal: build the zip in WORK and exit
    a = ap.parse_args()
    if a.make:
        write_zip(a.make, a.format)
        return
    work = Path(tempfile.mkdtemp(prefix="enc-bench-megatron-"))
    try:
        measure([sys.executable, __file__, "--make", str(work), "--format", a.format])
        z = work / "megatron_bert_345m_v0_1_uncased.zip"
        vocab = work / "bert-large-uncased-vocab.txt"
        write_vocab(vocab)
        size = z.stat().st_size
        env = {"OMP_NUM_THREADS": "1"}  # the shared box's 2 cores are oversubscribed: see bench_gpt2_generate
        shutil.copyfile(z, work / "warm.zip")  # page cache warm for every run below
        (work / "warm.zip").unlink()
        rows: dict[str, list[tuple[float, int]]] = {"cp (peer)": [], "enc convert --no-verify": [],
                                                   "enc convert (with parity)": [], "torch.load whole member": [],
                                                   "start-up: import torch, enc": []}
        result = {}
        for r in range(a.rounds):
            # each timed copy or conversion starts with no dirty pages (os.sync first), as in the other
            # conversion benchmarks: otherwise each run is throttled by the previous one's write-back
            os.sync()
            rows["cp (peer)"].append(measure(["cp", str(z), str(work / "copy.zip")])[:2])
            (work / "copy.zip").unlink()
            out = work / f"out{r}"
            os.sync()
            wall, rss, _ = measure([enc_bin(), "convert", str(z), "-o", str(out), "--vocab", str(vocab), "--no-verify"],
                                   env)
            rows["enc convert --no-verify"].append((wall, rss))
            shutil.rmtree(out)
            wall, rss, stdout = measure([enc_bin(), "convert", str(z), "-o", str(out), "--vocab", str(vocab), "--json"],
                                        env)
            rows["enc convert (with parity)"].append((wall, rss))
            result = json.loads(stdout)
            shutil.rmtree(out)
            rows["torch.load whole member"].append(measure([sys.executable, "-c", LOAD_ALL, str(z)], env)[:2])
            rows["start-up: import torch, enc"].append(
                measure([sys.executable, "-c", "import torch, enc.converters.megatron, enc.cli.main"], env)[:2])
        copy_s = median([w for w, _ in rows["cp (peer)"]])
        print(f"checkpoint: {z.name}, {size / 1e9:.2f} GB ({a.format} torch format, STORED zip), "
              f"{result['n_tensors']} HF tensors, parity {result['parity']['verdict']} "
              f"({result['parity']['dtype']}, worst nmse {result['parity']['worst']['nmse']:.1e}), "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'run':<28} {'wall s':>8} {'x copy':>7} {'peak RSS MB':>12} {'RSS / ckpt':>10}")
        for name, runs in rows.items():
            wall, rss = median([w for w, _ in runs]), median([m for _, m in runs])
            print(f"{name:<28} {wall:>8.2f} {wall / copy_s:>6.2f}x {rss / 1e6:>12.0f} {rss / size:>9.2f}x")
        cp_t = [w for w, _ in rows["cp (peer)"]]
        enc_t = [w for w, _ in rows["enc convert --no-verify"]]
        per_run = [e / c for e, c in zip(enc_t, cp_t, strict=True)]
        ratio = median(enc_t) / median(cp_t)
        print(f"cp runs: {spread(cp_t)} s; enc --no-verify runs: {spread(enc_t)} s")
        print(f"ratio enc/cp = {ratio:.2f}x (median/median; per run {min(per_run):.2f}x-{max(per_run):.2f}x) "
              f"target <= 2x: {'OK' if ratio <= 2 else 'MISSED'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
