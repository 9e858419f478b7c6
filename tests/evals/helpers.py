"""Tiny models made by transformers in the tests, with a sentencepiece vocabulary for the fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def corpus() -> list[str]:
    lines = []
    for p in sorted((FIXTURES / "glue").rglob("*.tsv")):
        lines += [" ".join(c for c in ln.split("\t") if c and not c.isdigit()) for ln in p.read_text().splitlines()]
    for p in sorted((FIXTURES / "squad").glob("*.json")):
        for art in json.loads(p.read_text())["data"]:
            for para in art["paragraphs"]:
                lines.append(para["context"])
                lines += [qa["question"] for qa in para["qas"]]
    return lines


def train_spm(out_dir: Path, vocab_size: int = 300) -> Path:
    """ALBERT-style unigram sentencepiece (pad 0, unk 1, [CLS] [SEP] [MASK]) over the fixture text."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n")
    spm.SentencePieceTrainer.Train(
        input=str(text), model_prefix=str(out_dir / "spiece"), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, unk_id=1, eos_id=-1, bos_id=-1, control_symbols="[CLS],[SEP],[MASK]", character_coverage=1.0,
        minloglevel=2, normalization_rule_name="nmt_nfkc_cf",
    )
    text.unlink()
    return out_dir / "spiece.model"


def albert_config(vocab_size: int, **kw):
    import transformers

    base = dict(vocab_size=vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, hidden_act="gelu_new", max_position_embeddings=512, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.1)
    base.update(kw)
    return transformers.AlbertConfig(**base)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """LayerNorm weights start at ones and biases at zero; perturb them so a missed one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name.startswith(("classifier.", "qa_outputs.")):
                p.mul_(20.0)  # make the head's outputs clearly non-tied


def save_albert(out: Path, spiece: Path, cls: str = "AlbertForSequenceClassification", seed: int = 0, **cfg) -> Path:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(albert_config(**cfg)).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    (out / "spiece.model").write_bytes(spiece.read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "keep_accents": False,
                                                          "remove_space": True}))
    return out


def write_wordpiece(out: Path) -> int:
    """A lower-cased WordPiece vocabulary over the fixture text, as tokenizer.json (enc's builder)."""
    import re

    from enc.tokenization import HFTokenizer

    words = sorted({w for line in corpus() for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"##{c}" for c in chars if f"##{c}" not in words)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    HFTokenizer.bert_wordpiece(out / "vocab.txt", lowercase=True).save(str(out / "tokenizer.json"))
    return len(vocab)


def save_megatron(out: Path, cls: str = "MegatronBertForSequenceClassification", seed: int = 0, **cfg) -> Path:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    vocab = write_wordpiece(out)
    base = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(transformers.MegatronBertConfig(**base)).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    return out
