"""enc eval glue / squad on MobileBERT directories: numbers equal transformers; --finetune saves HF dirs.

Scored with --batch-size 1 where compared with transformers one example at a time: MobileBERT's
trigram embedding lets the last token see its right neighbour, so a padded batch (the [PAD]
embedding there instead of zeros) is not bit-identical to an unpadded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from enc.evals.data import GLUE_TASKS, glue_split, load_squad
from enc.evals.runtime import encode_pair
from enc.evals.squad import build_features, postprocess
from enc.models.heads import load_task_model
from enc.tokenization import load_tokenizer
from tests.evals.helpers import FIXTURES, write_wordpiece
from tests.evals.test_cli_glue import cli, labels_of

GLUE, SQUAD = FIXTURES / "glue", FIXTURES / "squad"


def save_mobilebert(out: Path, cls: str, seed: int = 0, **cfg) -> Path:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    vocab = write_wordpiece(out)
    base = dict(vocab_size=vocab, hidden_size=32, embedding_size=16, intra_bottleneck_size=16, num_attention_heads=2,
                intermediate_size=32, num_hidden_layers=2, num_feedforward_networks=2, max_position_embeddings=512,
                hidden_act="relu", trigram_input=True, use_bottleneck=True, key_query_shared_bottleneck=True,
                normalization_type="no_norm", classifier_activation=False, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(transformers.MobileBertConfig(**base)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # N(0, 0.2) everywhere (norm weights around 1): inputs give clearly different outputs
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "LayerNorm.weight" in name else 0.0))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("pooler", [False, True])
def test_glue_equals_transformers(tmp_path: Path, capsys: pytest.CaptureFixture, pooler: bool) -> None:
    import transformers

    names = {0: "entailment", 1: "not_entailment"}
    m = save_mobilebert(tmp_path / "rte", "MobileBertForSequenceClassification", classifier_activation=pooler,
                        num_labels=2, id2label=names, label2id={v: k for k, v in names.items()})
    rc, res, _ = cli(capsys, "glue", "--model", m, "--task", "rte", "--data", GLUE, "--batch-size", "1", "--json")
    assert rc == 0
    tok = load_tokenizer(m)
    hf = transformers.MobileBertForSequenceClassification.from_pretrained(m).eval()
    enc_model = load_task_model(m, "sequence-classification")
    preds = []
    with torch.no_grad():
        for r in glue_split(GLUE_TASKS["rte"], GLUE, "validation").rows:
            e = encode_pair(tok, r["sentence1"], r["sentence2"], 128)
            ids, tt = torch.tensor([e.input_ids]), torch.tensor([e.token_type_ids])
            logits = hf(input_ids=ids, token_type_ids=tt).logits
            torch.testing.assert_close(enc_model(ids, None, tt), logits, rtol=0, atol=1e-4)  # the head itself
            preds.append(int(logits.argmax(-1)))
    labels = labels_of("rte", "validation")
    assert res["results"][0]["metrics"] == {"accuracy": pytest.approx(np.mean(np.array(preds) == labels))}


def test_squad_equals_transformers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers

    m = save_mobilebert(tmp_path / "qa", "MobileBertForQuestionAnswering", seed=3)
    data = SQUAD / "dev-v2.0.json"
    rc, res, _ = cli(capsys, "squad", "--model", m, "--data", data, "--out-dir", tmp_path / "o", "--max-length", "48",
                     "--doc-stride", "8", "--batch-size", "1", "--json")
    assert rc == 0 and res["version"] == "2.0"
    sd = load_squad(data, "2.0")
    feats = build_features(sd.examples, load_tokenizer(m), 48, 8)
    hf = transformers.MobileBertForQuestionAnswering.from_pretrained(m).eval()
    start, end = [], []
    with torch.no_grad():
        for f in feats:
            out = hf(input_ids=torch.tensor([f.input_ids]), token_type_ids=torch.tensor([f.token_type_ids]))
            start.append(out.start_logits[0].numpy())
            end.append(out.end_logits[0].numpy())
    ref = postprocess(sd.examples, feats, start, end, True)
    assert json.loads((tmp_path / "o" / "predictions.json").read_text()) == ref.predictions


def test_finetune_from_a_pretraining_checkpoint_saves_transformers_dirs(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    import transformers

    base = save_mobilebert(tmp_path / "base", "MobileBertForPreTraining", seed=5)
    save = tmp_path / "sst2-ft"
    rc, res, _ = cli(capsys, "glue", "--model", base, "--task", "sst2", "--data", GLUE, "--finetune", "--epochs", "8",
                     "--lr", "2e-3", "--batch-size", "8", "--seed", "0", "--save", save, "--json")
    r = res["results"][0]
    assert rc == 0 and r["finetune"]["steps"] == 64  # 64 training rows / 8 x 8 epochs
    hf, info = transformers.MobileBertForSequenceClassification.from_pretrained(save, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    rc, again, _ = cli(capsys, "glue", "--model", save, "--task", "sst2", "--data", GLUE, "--json")
    assert again["results"][0]["metrics"] == r["metrics"]

    data = SQUAD / "dev-v1.1.json"
    rc, res, _ = cli(capsys, "squad", "--model", base, "--version", "1.1", "--data", data, "--train", data,
                     "--finetune", "--epochs", "3", "--lr", "2e-3", "--batch-size", "8", "--max-length", "96",
                     "--doc-stride", "32", "--out-dir", tmp_path / "o", "--save", tmp_path / "qa-ft", "--json")
    assert rc == 0 and res["results"][0]["finetune"]["steps"] > 0
    hf, info = transformers.MobileBertForQuestionAnswering.from_pretrained(tmp_path / "qa-ft", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_eval_runs_on_a_converted_release(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The directory `enc convert` writes (MobileBertForPreTraining, no pooler) fine-tunes for GLUE."""
    from enc.cli.main import run

    out = tmp_path / "hf"
    example = Path(__file__).resolve().parents[2] / "examples" / "mobilebert_tiny"
    assert run(["convert", str(example), "-o", str(out)]) == 0
    rc, res, _ = cli(capsys, "glue", "--model", out, "--task", "rte", "--data", GLUE, "--finetune", "--epochs", "1",
                     "--limit", "8", "--batch-size", "4", "--json")
    assert rc == 0 and res["results"][0]["examples"] == 8 and res["results"][0]["finetune"]["steps"] == 2
