"""enc's ALBERT runtime loads directories saved by transformers itself, every head layout."""

from __future__ import annotations

import pytest
import torch

from enc.models.albert import AlbertForMaskedLM, AlbertForPreTraining, AlbertModel, from_pretrained
from tests.helpers.albert_release import hf_albert


@pytest.mark.parametrize("kind", ["AlbertForMaskedLM", "AlbertModel", "AlbertForPreTraining"])
def test_loads_transformers_saved_dirs(tmp_path, kind):
    import transformers

    src = hf_albert(90, 16, 24, 4, 2, 1, 3, 40)
    model = getattr(transformers, kind)(src.config).eval()
    model.load_state_dict(src.state_dict(), strict=False)  # same weights, whatever the head
    model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert type(ours) is {"AlbertForMaskedLM": AlbertForMaskedLM, "AlbertModel": AlbertModel,
                          "AlbertForPreTraining": AlbertForPreTraining}[kind]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        out = ours(ids, mask)
    m = mask.bool()
    if kind == "AlbertModel":
        assert torch.allclose(ref.last_hidden_state[m], out["last_hidden_state"][m], atol=1e-5)
        assert torch.allclose(ref.pooler_output, out["pooler_output"], atol=1e-5)
    else:
        logits = ref.logits if kind == "AlbertForMaskedLM" else ref.prediction_logits
        assert torch.allclose(logits[m], out["logits"][m], atol=1e-4)
    # a pretraining checkpoint also serves as a masked LM (fill-mask asks for head="mlm")
    if kind != "AlbertModel":
        assert isinstance(from_pretrained(tmp_path, head="mlm"), AlbertForMaskedLM)


def test_bf16_load_and_forward(tmp_path):
    import transformers

    src = hf_albert(90, 16, 24, 2, 1, 1, 3, 40)
    transformers.AlbertForMaskedLM(src.config).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(ours.parameters()).dtype == torch.bfloat16
    assert ours.predictions.decoder.weight is ours.albert.embeddings.word_embeddings.weight  # still tied
    out = ours(torch.tensor([[2, 5, 6, 3]]))
    assert out["logits"].dtype == torch.bfloat16 and out["logits"].shape == (1, 4, 90)
