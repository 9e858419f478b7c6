"""Convert a LUKE-large-shaped checkpoint (500K x 256 entity table): wall time vs copying it, and peak RSS.

Setup: random weights of the ``luke_large_500k`` shape (RoBERTa-large body: hidden 1024, 24 layers, 16 heads,
FFN 4096, 514 positions, vocab 50265; entity table 500000 x 256 with the 256 -> 1024 projection; the
pretraining heads lm_head and entity_predictions; float32: 484M parameters, ~1.9 GB), saved with
``torch.save`` as a plain ``pytorch_model.bin`` (LUKE's release format) with ``metadata.json``, a
500000-line ``entity_vocab.tsv`` (with [MASK2]: its row is rewritten in place) and a 50265-token
RoBERTa ``vocab.json`` + ``merges.txt``. With ``--deepspeed`` the same weights go under ``["module"]`` of
a DeepSpeed ``mp_rank_00_model_states.pt`` with an ``entity_vocab.jsonl`` (mLUKE's format: [MASK2] is
appended, the path that reads the table straight into the enlarged buffer).

Measured, each in its own process (wall time, and that process's own peak RSS from wait4), with the
checkpoint already in the page cache, interleaved over ``--rounds``:

- peer: ``cp`` of the checkpoint file (reads and writes the same bytes once);
- ``enc convert SRC -o OUT --no-verify`` (read lazily, rows added, written as safetensors);
- context: ``torch.load`` of the whole file (what transformers' and studio-ousia's conversion scripts do
  first, before building the model).

plus, with ``--parity``, the default ``enc convert`` (with the parity check). Prints medians and the
ratios convert / copy and peak RSS / checkpoint size. Temp files are removed.
Usage: python benchmarks/bench_luke_convert.py [--rounds 2] [--deepspeed] [--parity] [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _util import ROOT, enc_bin, measure, median  # noqa: E402 - path set up by _util

HIDDEN, HEADS, FFN, POSITIONS, VOCAB, ENTITIES, ENT_DIM = 1024, 16, 4096, 514, 50265, 500_000, 256


def write_tokenizer(work: Path) -> None:
    """A RoBERTa-shaped vocabulary: <s> <pad> </s> <unk>, the 256 byte-level symbols, fillers, <mask> last."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + [chr(c) for c in cs]
    tokens += [f"w{i}" for i in range(VOCAB - len(tokens) - 1)] + ["<mask>"]
    (work / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (work / "merges.txt").write_text("#version: 0.2\n")


def write_checkpoint(work: Path, layers: int, deepspeed: bool) -> Path:
    """Runs in a child process (see --make): the parent never holds the tensors, nor imports torch."""
    import torch

    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd: dict = {"embeddings.position_ids": torch.arange(POSITIONS)[None]}
    word, ent = w(VOCAB, HIDDEN), w(ENTITIES, ENT_DIM)
    sd["embeddings.word_embeddings.weight"] = word
    sd["embeddings.position_embeddings.weight"] = w(POSITIONS, HIDDEN)
    sd["embeddings.token_type_embeddings.weight"] = w(1, HIDDEN)
    for p in ("embeddings.LayerNorm", "entity_embeddings.LayerNorm"):
        sd[p + ".weight"], sd[p + ".bias"] = torch.ones(HIDDEN), torch.zeros(HIDDEN)
    sd["entity_embeddings.entity_embeddings.weight"] = ent
    sd["entity_embeddings.entity_embedding_dense.weight"] = w(HIDDEN, ENT_DIM)
    sd["entity_embeddings.position_embeddings.weight"] = w(POSITIONS, HIDDEN)
    sd["entity_embeddings.token_type_embeddings.weight"] = w(1, HIDDEN)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + m + ".weight"], sd[p + m + ".bias"] = w(HIDDEN, HIDDEN), torch.zeros(HIDDEN)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = w(FFN, HIDDEN), torch.zeros(FFN)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = w(HIDDEN, FFN), torch.zeros(HIDDEN)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(HIDDEN), torch.zeros(HIDDEN)
    sd["pooler.dense.weight"], sd["pooler.dense.bias"] = w(HIDDEN, HIDDEN), torch.zeros(HIDDEN)
    sd["lm_head.dense.weight"], sd["lm_head.dense.bias"] = w(HIDDEN, HIDDEN), torch.zeros(HIDDEN)
    sd["lm_head.layer_norm.weight"], sd["lm_head.layer_norm.bias"] = torch.ones(HIDDEN), torch.zeros(HIDDEN)
    bias = torch.zeros(VOCAB)
    sd["lm_head.bias"], sd["lm_head.decoder.weight"], sd["lm_head.decoder.bias"] = bias, word, bias
    sd["entity_predictions.transform.dense.weight"] = w(ENT_DIM, HIDDEN)
    sd["entity_predictions.transform.dense.bias"] = torch.zeros(ENT_DIM)
    sd["entity_predictions.transform.LayerNorm.weight"] = torch.ones(ENT_DIM)
    sd["entity_predictions.transform.LayerNorm.bias"] = torch.zeros(ENT_DIM)
    sd["entity_predictions.decoder.weight"] = ent
    sd["entity_predictions.bias"] = torch.zeros(ENTITIES)
    cfg = {"bert_model_name": "roberta-large", "hidden_size": HIDDEN, "num_hidden_layers": layers,
           "num_attention_heads": HEADS, "intermediate_size": FFN, "hidden_act": "gelu",
           "max_position_embeddings": POSITIONS, "type_vocab_size": 1, "vocab_size": VOCAB, "layer_norm_eps": 1e-5,
           "entity_vocab_size": ENTITIES, "entity_emb_size": ENT_DIM, "initializer_range": 0.02,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (work / "metadata.json").write_text(json.dumps({"model_config": cfg, "max_seq_length": 512,
                                                    "max_mention_length": 30, "max_entity_length": 128}))
    if deepspeed:
        specials = [["[PAD]", None], ["[UNK]", None], ["[MASK]", "en"]]
        with open(work / "entity_vocab.jsonl", "w") as f:
            for i in range(ENTITIES):
                ents = [specials[i]] if i < 3 else [[f"Entity {i}", "en"], [f"Entität {i}", "de"]]
                f.write(json.dumps({"id": i, "entities": ents, "count": 0}) + "\n")
        path = work / "checkpoints" / "epoch20" / "mp_rank_00_model_states.pt"
        path.parent.mkdir(parents=True)
        torch.save({"module": sd, "optimizer": None, "global_steps": 1000, "dp_world_size": 1,
                    "ds_version": "0.9.5", "sparse_tensor_module_names": set()}, path)
    else:
        with open(work / "entity_vocab.tsv", "w") as f:
            f.write("[PAD]\t0\n[UNK]\t0\n[MASK]\t0\n[MASK2]\t0\n")
            for i in range(4, ENTITIES):
                f.write(f"Entity {i}\t{ENTITIES - i}\n")
        path = work / "pytorch_model.bin"
        torch.save(sd, path)
    return path


LOAD_ALL = """
import sys, torch
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
sd = sd.get("module", sd)
print(sum(t.numel() for t in sd.values()))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--deepspeed", action="store_true", help="mLUKE's DeepSpeed format and entity_vocab.jsonl")
    ap.add_argument("--parity", action="store_true", help="also time the default convert (with parity)")
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)  # internal: build the checkpoint in WORK and exit
    a = ap.parse_args()
    if a.make:
        print(write_checkpoint(a.make, a.layers, a.deepspeed))
        return
    base = Path(tempfile.mkdtemp(prefix="enc-bench-luke-"))
    work = base / "luke_large_500k"
    work.mkdir()
    try:
        ckpt = Path(measure([sys.executable, __file__, "--make", str(work), "--layers", str(a.layers)]
                            + (["--deepspeed"] if a.deepspeed else []))[2].strip())
        write_tokenizer(work)
        size = ckpt.stat().st_size
        env = {"OMP_NUM_THREADS": "1"}
        shutil.copyfile(ckpt, base / "warm.bin")  # page cache warm for every run below
        (base / "warm.bin").unlink()
        rows: dict[str, list[tuple[float, int]]] = {"cp (peer)": [], "enc convert --no-verify": []}
        if a.parity:
            rows["enc convert (with parity)"] = []
        rows["torch.load whole file"] = []
        src = work
        for r in range(a.rounds):
            rows["cp (peer)"].append(measure(["cp", str(ckpt), str(base / "copy.bin")])[:2])
            (base / "copy.bin").unlink()
            out = base / f"out{r}"
            wall, rss, stdout = measure([enc_bin(), "convert", str(src), "-o", str(out), "--no-verify", "--json"], env)
            rows["enc convert --no-verify"].append((wall, rss))
            result = json.loads(stdout)
            shutil.rmtree(out)
            if a.parity:
                wall, rss, stdout = measure([enc_bin(), "convert", str(src), "-o", str(out), "--json"], env)
                rows["enc convert (with parity)"].append((wall, rss))
                result = json.loads(stdout)
                shutil.rmtree(out)
            rows["torch.load whole file"].append(measure([sys.executable, "-c", LOAD_ALL, str(ckpt)], env)[:2])
        copy_s = median([w for w, _ in rows["cp (peer)"]])
        verdict = f", parity {result['parity']['verdict']}" if result.get("parity") else ""
        print(f"checkpoint: {ckpt.name} ({'DeepSpeed' if a.deepspeed else 'plain state_dict'}), {size / 1e9:.2f} GB, "
              f"{a.layers} layers, entity table {ENTITIES}x{ENT_DIM} ({ENTITIES * ENT_DIM * 4 / 1e6:.0f} MB), "
              f"{result['n_tensors']} HF tensors{verdict}, load average {os.getloadavg()[0]:.1f}")
        print(f"{'run':<28} {'wall s':>8} {'x copy':>7} {'peak RSS MB':>12} {'RSS / ckpt':>10}")
        for name, runs in rows.items():
            wall, rss = median([w for w, _ in runs]), median([m for _, m in runs])
            print(f"{name:<28} {wall:>8.2f} {wall / copy_s:>6.2f}x {rss / 1e6:>12.0f} {rss / size:>9.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
