"""enc.models.megatron_bert against transformers' MegatronBert classes."""

from __future__ import annotations

import pytest
import torch

from enc.models import load_model
from enc.models.loading import load_into, load_state_dict, strip_prefix
from enc.models.megatron_bert import (
    MegatronBertConfig,
    MegatronBertForMaskedLM,
    MegatronBertForPreTraining,
    MegatronBertModel,
    expected_keys,
    from_pretrained,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw):
    import transformers

    return transformers.MegatronBertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=48, max_position_embeddings=40, layer_norm_eps=1e-5, **kw)


def _perturb(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 90, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    types[0, 7:] = 1
    return ids, mask, types


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_pretraining_equals_transformers(tmp_path, act):
    import transformers

    torch.manual_seed(0)
    hf = _perturb(transformers.MegatronBertForPreTraining(_cfg(hidden_act=act)))
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert isinstance(model, MegatronBertForPreTraining)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids, mask, types = _inputs()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        got = model(ids, mask, types, output_hidden_states=True)
    m = mask.bool()
    torch.testing.assert_close(got["logits"][m], want.prediction_logits[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["seq_relationship_logits"], want.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    assert len(got["hidden_states"]) == len(want.hidden_states) == 4
    for a, b in zip(got["hidden_states"], want.hidden_states, strict=True):
        torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-5)


def test_masked_lm_checkpoint_and_mlm_head_of_a_pretraining_one(tmp_path):
    import transformers

    torch.manual_seed(1)
    hf = _perturb(transformers.MegatronBertForMaskedLM(_cfg()))
    hf.save_pretrained(tmp_path / "mlm")
    ids, mask, types = _inputs()
    model = load_model(tmp_path / "mlm")
    assert isinstance(model, MegatronBertForMaskedLM) and model.bert.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types)["logits"][mask.bool()],
                                   hf(ids, attention_mask=mask, token_type_ids=types).logits[mask.bool()],
                                   rtol=1e-5, atol=1e-5)
    pre = _perturb(transformers.MegatronBertForPreTraining(_cfg()))
    pre.save_pretrained(tmp_path / "pre")
    mlm = load_model(tmp_path / "pre", head="mlm")  # what enc fill-mask asks for
    assert isinstance(mlm, MegatronBertForMaskedLM)
    with torch.no_grad():
        torch.testing.assert_close(mlm(ids, mask, types)["logits"][mask.bool()],
                                   pre(ids, attention_mask=mask, token_type_ids=types).prediction_logits[mask.bool()],
                                   rtol=1e-5, atol=1e-5)


def test_base_model_loads_bert_prefixed_keys_of_a_task_checkpoint(tmp_path):
    import transformers

    torch.manual_seed(2)
    hf = _perturb(transformers.MegatronBertForSequenceClassification(_cfg(num_labels=3)))
    hf.save_pretrained(tmp_path)
    ids, mask, types = _inputs()
    with torch.no_grad():
        want = hf.bert(ids, attention_mask=mask, token_type_ids=types)
    base = from_pretrained(tmp_path)  # architectures: ForSequenceClassification -> the encoder
    assert isinstance(base, MegatronBertModel) and base.pooler is not None
    cfg = MegatronBertConfig.from_dict(hf.config.to_dict() | {"some_future_key": 1})
    assert cfg.num_labels == 3
    manual = MegatronBertModel(cfg)  # what a task head wraps: strip_prefix + load_into
    sd = strip_prefix(load_state_dict(tmp_path), "bert.", set(manual.state_dict()))
    load_into(manual, sd, tmp_path, ignore_unexpected=("classifier.",))
    for m in (base, manual.eval()):
        with torch.no_grad():
            out = m(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        assert set(out) == {"last_hidden_state", "pooler_output", "hidden_states"}
        torch.testing.assert_close(out["last_hidden_state"][mask.bool()], want.last_hidden_state[mask.bool()],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["pooler_output"], want.pooler_output, rtol=1e-5, atol=1e-5)


def test_parameter_names_are_transformers_names():
    import transformers

    hf = transformers.MegatronBertForPreTraining(_cfg())
    ours = MegatronBertForPreTraining(MegatronBertConfig.from_dict(_cfg().to_dict()))
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert expected_keys(ours.config) == set(hf.state_dict()) - {"cls.predictions.decoder.weight",
                                                                 "cls.predictions.decoder.bias"}
    assert set(MegatronBertModel(ours.config).state_dict()) == set(transformers.MegatronBertModel(_cfg()).state_dict())


@pytest.mark.parametrize("cls_name", ["BertForPreTraining", "BertForMaskedLM", "BertModel"])
def test_original_post_ln_bert_equals_transformers(tmp_path, cls_name):
    """model_type "bert" (post-LN) runs in the same module: BertFor* directories load and match."""
    import transformers

    torch.manual_seed(5)
    cfg = transformers.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40)
    hf = _perturb(getattr(transformers, cls_name)(cfg))
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids, mask, types = _inputs()
    m = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        got = model(ids, mask, types, output_hidden_states=True)
    if cls_name == "BertModel":
        torch.testing.assert_close(got["last_hidden_state"][m], want.last_hidden_state[m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["pooler_output"], want.pooler_output, rtol=1e-5, atol=1e-5)
    else:
        logits = want.prediction_logits if cls_name == "BertForPreTraining" else want.logits
        torch.testing.assert_close(got["logits"][m], logits[m], rtol=1e-5, atol=1e-5)
    for a, b in zip(got["hidden_states"], want.hidden_states, strict=True):
        torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-5)
