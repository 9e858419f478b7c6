"""The tensor names of ``enc.models.megatron_bert`` (and ``enc.models.gpt2``) for a config.json, without torch.

``enc convert --no-verify`` of a Megatron checkpoint checks its plan against the model's names (strict
key accounting) while the bytes move; building the model on the meta device to list them would import
torch (1.3 s of CPU) for a conversion that otherwise needs none. These are those lists, written out;
``tests/models/test_megatron_bert_keys.py`` holds them equal to ``megatron_bert.expected_keys`` for every
architecture of ``megatron_bert.HEADS``, pre- and post-LN, tied and untied, and to GPT-2's
``build(cfg).state_dict()`` minus its tied keys, so a change to a model that a list misses fails.
"""

from __future__ import annotations

_WB = ("weight", "bias")

# architecture name -> head (as megatron_bert.HEADS maps it to a class)
HEAD_OF: dict[str, str] = {
    "MegatronBertForPreTraining": "pretraining", "MegatronBertForMaskedLM": "mlm", "MegatronBertForCausalLM": "mlm",
    "MegatronBertModel": "base", "BertForPreTraining": "pretraining", "BertForMaskedLM": "mlm",
    "BertLMHeadModel": "mlm", "BertModel": "base",
}


def _wb(*prefixes: str) -> list[str]:
    return [f"{p}.{x}" for p in prefixes for x in _WB]


def megatron_bert_keys(hf_config: dict, architecture: str) -> set[str]:
    """As ``megatron_bert.expected_keys(MegatronBertConfig.from_dict(hf_config), HEADS[architecture])``:
    the state-dict keys written on disk (tied ones excluded)."""
    head = HEAD_OF[architecture]
    post_ln = hf_config.get("model_type") == "bert"
    layers = int(hf_config.get("num_hidden_layers", 24))
    tied = bool(hf_config.get("tie_word_embeddings", True))
    base = "" if head == "base" else "bert."
    keys = {f"{base}embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    if post_ln:
        keys.update(_wb(f"{base}embeddings.LayerNorm"))
    else:
        keys.update(_wb(f"{base}encoder.ln"))
    for i in range(layers):
        p = f"{base}encoder.layer.{i}."
        keys.update(_wb(p + "attention.self.query", p + "attention.self.key", p + "attention.self.value",
                        p + "attention.output.dense", p + "intermediate.dense", p + "output.dense"))
        if post_ln:
            keys.update(_wb(p + "attention.output.LayerNorm", p + "output.LayerNorm"))
        else:
            keys.update(_wb(p + "attention.ln", p + "ln"))
    if head in ("base", "pretraining"):
        keys.update(_wb(f"{base}pooler.dense"))
    if head != "base":
        keys.update(_wb("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm"))
        keys.add("cls.predictions.bias")  # decoder.bias is tied to it
        if not tied:
            keys.add("cls.predictions.decoder.weight")
    if head == "pretraining":
        keys.update(_wb("cls.seq_relationship"))
    return keys


def gpt2_keys(hf_config: dict) -> set[str]:
    """As ``set(gpt2.build(cfg).state_dict()) - set(gpt2.tied_keys(cfg))`` for ``GPT2Config.from_dict(hf_config)``."""
    layers = 12
    for k, v in hf_config.items():  # GPT2Config.from_dict: an alias and the name, the later one wins
        if k in ("n_layer", "num_hidden_layers"):
            layers = int(v)
    keys = {"transformer.wte.weight", "transformer.wpe.weight", *_wb("transformer.ln_f")}
    for i in range(layers):
        p = f"transformer.h.{i}."
        keys.update(_wb(p + "ln_1", p + "ln_2", p + "attn.c_attn", p + "attn.c_proj", p + "mlp.c_fc", p + "mlp.c_proj"))
    if not hf_config.get("tie_word_embeddings", True):
        keys.add("lm_head.weight")
    return keys
