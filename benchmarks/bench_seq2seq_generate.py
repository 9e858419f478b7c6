"""enc's encoder-decoder generation vs transformers' EncoderDecoderModel.generate() on the same
converted bert2bert directory (the geometry of the bertseq2seq L-24 modules, fewer layers).

Setup (skipped with --model DIR): a TF-Hub module in the bertseq2seq layout (hidden 1024, 16 heads,
intermediate 4096, vocab 50358, 512 positions, ``--layers`` encoder and decoder layers, random
weights) is written with the project's TF bundle writer (tests/helpers/tf_bundle.py), with a
sentencepiece model grown to 50358 pieces, and converted by ``enc convert`` (so the directory is
what a user gets).

Then, in one process, both runtimes load that directory in float32 and generate from the same input,
interleaved, ``--rounds`` times each:

- enc: ``enc.seq2seq.generate`` (what ``enc generate`` runs on an encoder-decoder directory);
- transformers: ``EncoderDecoderModel.from_pretrained(dir).generate``.

Tokens/s = new tokens / wall time of the whole call (encoder pass included), greedy and beam search
(``--beams``); the token ids must be identical. Prints medians and the ratio enc / transformers.
Threads: ``--threads 1`` by default (the 2 shared cores of this machine give unstable multi-thread numbers).
Usage: python benchmarks/bench_seq2seq_generate.py [--layers 4] [--tokens 32] [--beams 4] [--rounds 3]
       [--model DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _util import ROOT, enc_bin, median  # noqa: E402 - path set up by _util

HIDDEN, HEADS, INTER, VOCAB, POSITIONS = 1024, 16, 4096, 50358, 512
FIX = ROOT / "tests" / "fixtures" / "bertgen"
TEXT = ("summaries of news articles are short and to the point; the encoder reads the input and the decoder "
        "writes the output, warm starting the decoder from a pretrained encoder works well")


def grow_spm(src: Path, dst: Path, size: int) -> None:
    """The fixture's sentencepiece model with extra (never-matched) pieces up to ``size``."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(src.read_bytes())
    low = min(p.score for p in m.pieces) - 1.0
    for i in range(size - len(m.pieces)):
        p = m.pieces.add()
        p.piece, p.score = f"\u2581zz{i:05d}", low - i * 1e-4
    dst.write_bytes(m.SerializeToString())


def make_converted(work: Path, layers: int) -> Path:
    from tests.helpers.tf_bundle import write_bundle

    rng = np.random.default_rng(0)

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def ln(scope):
        return {scope + "/gamma": 1 + w(HIDDEN, std=0.1), scope + "/beta": w(HIDDEN, std=0.1)}

    def dense(scope, n_in, n_out):
        return {scope + "/kernel": w(n_in, n_out), scope + "/bias": w(n_out)}

    p = "module/bert/"
    t = {p + "embeddings/word_embeddings": w(VOCAB, HIDDEN, std=0.5),
         p + "embeddings/position_embeddings": w(POSITIONS, HIDDEN, std=0.1), **ln(p + "embeddings/LayerNorm"),
         "global_step": np.int64(1)}
    for stack in ("encoder", "decoder"):
        for i in range(layers):
            s = f"{p}{stack}/layer_{i}/"
            for n in ("query", "key", "value"):
                t.update(dense(s + f"attention/self/{n}", HIDDEN, HIDDEN))
            t.update(dense(s + "attention/output/dense", HIDDEN, HIDDEN))
            t.update(ln(s + "attention/output/LayerNorm"))
            t.update(dense(s + "intermediate/dense", HIDDEN, INTER))
            t.update(dense(s + "output/dense", INTER, HIDDEN))
            t.update(ln(s + "output/LayerNorm"))
            if stack == "decoder":
                for n in ("query", "key", "value"):
                    t.update(dense(s + f"attention/encdec/{n}", HIDDEN, HIDDEN))
                t.update(dense(s + "attention/encdec_output/dense", HIDDEN, HIDDEN))
                t.update(ln(s + "attention/encdec_output/LayerNorm"))
    module = work / "bert24_like"
    (module / "assets").mkdir(parents=True)
    (module / "tfhub_module.pb").write_bytes(b"\x08\x03")
    write_bundle(module / "variables" / "variables", t)
    del t
    grow_spm(FIX / "separate" / "assets" / "spm.model", module / "assets" / "spm.model", VOCAB)
    out = work / "bert2bert_L-24_like"
    subprocess.run([enc_bin(), "convert", str(module), "-o", str(out), "--no-verify", "--hidden-act", "gelu"],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(module)
    return out


def run_enc(model, tok, ids, input_ids, n: int, beams: int) -> tuple[float, list[int]]:
    from enc import seq2seq
    from enc.generation import Settings

    t0 = time.perf_counter()
    res = seq2seq.generate(model, tok, input_ids, Settings(max_new_tokens=n, temp=0.0), ids, beams)
    return len(res.token_ids) / (time.perf_counter() - t0), res.token_ids


def run_hf(model, input_ids, n: int, beams: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([input_ids]), max_new_tokens=n, num_beams=beams, do_sample=False)
    ids = out[0, 1:].tolist()
    return len(ids) / (time.perf_counter() - t0), ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, help="an existing converted directory (skips the setup)")
    ap.add_argument("--keep", type=Path, help="keep the converted directory here")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="enc-bench-seq2seq-"))
    try:
        t0 = time.perf_counter()
        model_dir = a.model or make_converted(work, a.layers)
        setup = time.perf_counter() - t0
        import transformers

        from enc import seq2seq
        from enc.models.bert_generation import from_pretrained

        tok = seq2seq.load_tokenizer(model_dir)
        input_ids = tok.encode(TEXT).ids
        ours = from_pretrained(model_dir, dtype=torch.float32).prepare_inference()  # as enc generate runs it
        ids = seq2seq.special_ids(model_dir, ours)
        theirs = transformers.EncoderDecoderModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        layers = ours.decoder.config.num_hidden_layers
        print(f"model: {model_dir} (setup {setup:.0f}s): hidden {HIDDEN}, {HEADS} heads, {layers}+{layers} layers, "
              f"vocab {VOCAB}; input {len(input_ids)} tokens, {a.tokens} new tokens, float32, torch threads "
              f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, transformers "
              f"{transformers.__version__}")
        rows = []
        for beams in (1, a.beams):
            enc_tps, hf_tps = [], []
            for _ in range(a.rounds):
                e, e_ids = run_enc(ours, tok, ids, input_ids, a.tokens, beams)
                h, h_ids = run_hf(theirs, input_ids, a.tokens, beams)
                enc_tps.append(e)
                hf_tps.append(h)
                if e_ids != h_ids:
                    raise SystemExit(f"outputs differ (beams {beams}):\n enc {e_ids}\n hf  {h_ids}")
            rows.append(("greedy" if beams == 1 else f"beam search, {beams} beams", median(enc_tps), median(hf_tps),
                         enc_tps, hf_tps, len(e_ids)))
        print(f"{'settings':<24} {'tokens':>6} {'enc tok/s':>10} {'transformers tok/s':>19} {'ratio':>7}   (runs enc | hf)")
        for label, e, h, es, hs, n in rows:
            print(f"{label:<24} {n:>6} {e:>10.2f} {h:>19.2f} {e / h:>6.2f}x   ({', '.join(f'{x:.1f}' for x in es)} | "
                  f"{', '.join(f'{x:.1f}' for x in hs)})")
        print("token ids identical (greedy and beams): yes")
        if a.keep and not a.model:
            shutil.move(str(model_dir), str(a.keep))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
