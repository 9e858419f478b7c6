"""enc.models.gpt2 against transformers' GPT2LMHeadModel: logits, KV-cached decoding, generation."""

from __future__ import annotations

import json

import pytest
import torch

from enc.errors import UsageError
from enc.models import load_model
from enc.models.gpt2 import GPT2Config, from_pretrained


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VARIANTS = {
    "default": {},
    "untied-gelu-layerscale": {"tie_word_embeddings": False, "activation_function": "gelu",
                               "scale_attn_by_inverse_layer_idx": True},
    "inner-relu": {"n_inner": 40, "activation_function": "relu", "layer_norm_epsilon": 1e-3},
}


def _hf(tmp_path, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=3, n_head=4, bos_token_id=96,
                                  eos_token_id=96, **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_cached_decoding_equal_transformers(tmp_path, variant):
    hf = _hf(tmp_path, **VARIANTS[variant])
    model = from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings == (variant != "untied-gelu-layerscale")
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_word_embeddings
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
        cache = model.new_cache(2, 20)
        chunks = [model(ids[:, :7], cache=cache, pos=0), model(ids[:, 7:12], cache=cache, pos=7)]
        chunks += [model(ids[:, i:i + 1], cache=cache, pos=i) for i in range(12, 17)]
        torch.testing.assert_close(torch.cat(chunks, 1), want, rtol=1e-5, atol=1e-5)


def test_right_padding_mask_matches_transformers(tmp_path):
    hf = _hf(tmp_path)
    model = from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
    m = mask.bool()
    torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    from enc.generation import Settings, generate

    hf = _hf(tmp_path)
    model = load_model(tmp_path)
    prompt = [5, 17, 33, 2]
    res = generate(model, None, prompt, Settings(max_new_tokens=30, temp=0.0, ignore_eos=True))
    want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30, min_new_tokens=30,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert res.token_ids == want and res.generated_tokens == 30


def test_loads_gpt2model_weights_and_old_buffers(tmp_path):
    """A GPT2Model checkpoint (no ``transformer.`` prefix) and pre-4.3x files with attn.bias buffers load too."""
    import transformers
    from safetensors.torch import load_file, save_file

    hf = _hf(tmp_path / "lm")
    base = transformers.GPT2Model(hf.config)
    base.load_state_dict(hf.transformer.state_dict())
    base.save_pretrained(tmp_path / "base")
    model = from_pretrained(tmp_path / "base")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    sd = load_file(tmp_path / "lm" / "model.safetensors")
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 48, 48).tril()
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, tmp_path / "lm" / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "lm")(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_decoder_protocol_and_limits(tmp_path):
    _hf(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (model.config.vocab_size, model.config.max_position_embeddings) == (97, 48)
    cache = model.new_cache(1, 8)
    assert cache.k.dtype == torch.bfloat16 and cache.k.shape == (3, 1, 4, 8, 8)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]]), cache=cache, pos=0).shape == (1, 3, 97)
        with pytest.raises(UsageError, match="KV cache holds 8"):
            model(torch.ones(1, 6, dtype=torch.long), cache=cache, pos=3)
        with pytest.raises(UsageError, match="48 positions"):
            model(torch.ones(1, 49, dtype=torch.long))


def test_config_from_dict_ignores_unknown_keys_and_accepts_aliases(tmp_path):
    cfg = GPT2Config.from_dict({"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
                                "max_position_embeddings": 16, "vocab_size": 10, "summary_type": "cls_index",
                                "transformers_version": "5.0"})
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.max_position_embeddings, cfg.head_dim) == (64, 2, 1, 16, 32)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "activation_function": "nope"}))
    from enc.errors import ConfigError

    with pytest.raises(ConfigError, match="nope"):
        from_pretrained(tmp_path)
