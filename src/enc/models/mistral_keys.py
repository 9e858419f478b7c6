"""The tensor names of ``enc.models.mistral``'s model for a config.json, without importing torch.

``enc convert --no-verify`` checks its plan against the model's names (strict key accounting) while
the bytes move; building the model on the meta device to list them would import torch (1.5-2 s) for
a conversion that otherwise needs none. This is that list, written out; the test
``tests/models/test_mistral_keys.py`` holds it equal to ``build(cfg).state_dict()`` (minus the tied
``lm_head``) for dense, Mixtral and tied configs, so a change to the model that this list misses fails.
"""

from __future__ import annotations

_LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
          "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_EXPERT = ("w1.weight", "w2.weight", "w3.weight")


def expected_keys(hf_config: dict) -> set[str]:
    """Keys a checkpoint for this config holds (as ``enc.models.mistral.expected_keys``)."""
    mixtral = hf_config.get("model_type") == "mixtral"
    layers = int(hf_config["num_hidden_layers"])
    experts = int(hf_config.get("num_local_experts") or (8 if mixtral else 0))
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not hf_config.get("tie_word_embeddings", False):
        keys.add("lm_head.weight")
    for i in range(layers):
        p = f"model.layers.{i}."
        keys.update(p + k for k in _LAYER)
        if experts:
            keys.add(p + "block_sparse_moe.gate.weight")
            keys.update(f"{p}block_sparse_moe.experts.{e}.{k}" for e in range(experts) for k in _EXPERT)
        else:
            keys.update(p + k for k in _MLP)
    return keys
