"""The MEGA key tables: fairseq names -> transformers 4.x ``Mega*`` names, and what is dropped.

transformers renamed every parameter called ``gamma``/``beta`` because its loader rewrote such keys to
``weight``/``bias``: the EMA's ``move.{delta, alpha, beta, gamma, omega}`` became ``ema_gate.{damping_factor,
decay_factor, ema_expansion_matrix, kernel_projection_matrix, residual_weight}``, the shared query/key affine
``gamma``/``beta`` became ``qk_weight``/``qk_bias``, the rotary bias ``beta`` became ``b_param``. Shapes are
unchanged (the EMA tensors stay 3-D ``[kernel_dim, ndim, 1]``), so every row is a copy.
"""

from __future__ import annotations

from enc.converters.base import DropList, KeyTable, copy

_M = "mega_layer."
# one block, fairseq suffix -> HF suffix (prefixed per source below)
BLOCK = {
    _M + "norm.norm.weight": _M + "norm.norm.weight",
    _M + "norm.norm.bias": _M + "norm.norm.bias",
    _M + "norm.norm.scalar": _M + "norm.norm.scalar",
    _M + "move.delta": _M + "ema_gate.damping_factor",
    _M + "move.alpha": _M + "ema_gate.decay_factor",
    _M + "move.beta": _M + "ema_gate.ema_expansion_matrix",
    _M + "move.gamma": _M + "ema_gate.kernel_projection_matrix",
    _M + "move.omega": _M + "ema_gate.residual_weight",
    _M + "v_proj.weight": _M + "v_proj.weight",
    _M + "v_proj.bias": _M + "v_proj.bias",
    _M + "mx_proj.weight": _M + "mx_proj.weight",
    _M + "mx_proj.bias": _M + "mx_proj.bias",
    _M + "h_proj.weight": _M + "h_proj.weight",
    _M + "h_proj.bias": _M + "h_proj.bias",
    _M + "gamma": _M + "qk_weight",
    _M + "beta": _M + "qk_bias",
    _M + "rel_pos_bias.rel_pos_bias": _M + "rel_pos_bias.rel_pos_bias",
    _M + "rel_pos_bias.alpha": _M + "rel_pos_bias.alpha",
    _M + "rel_pos_bias.beta": _M + "rel_pos_bias.b_param",
    "nffn.norm.norm.weight": "nffn.norm.norm.weight",
    "nffn.norm.norm.bias": "nffn.norm.norm.bias",
    "nffn.norm.norm.scalar": "nffn.norm.norm.scalar",
    "nffn.fc1.weight": "nffn.fc1.weight",
    "nffn.fc1.bias": "nffn.fc1.bias",
    "nffn.fc2.weight": "nffn.fc2.weight",
    "nffn.fc2.bias": "nffn.fc2.bias",
}

# The Colab wrapper HF converted from: MegaLM (embedding_layer, encoders.{i}) + a separate mlm_head Linear.
WRAPPER_TABLE = KeyTable({
    "embedding_layer.weight": ("mega.embedding_layer.word_embeddings.weight", copy),
    **{f"encoders.{{}}.{k}": (f"mega.layers.{{}}.{v}", copy) for k, v in BLOCK.items()},
    "mlm_head.weight": ("mlm_head.weight", copy),
    "mlm_head.bias": ("mlm_head.bias", copy),
})

# fairseq mega_lm (MegaDecoderNoCrossAttn). final_norm is an enc extension of the HF layout.
LM_TABLE = KeyTable({
    "decoder.embed_tokens.weight": ("mega.embedding_layer.word_embeddings.weight", copy),
    **{f"decoder.layers.{{}}.{k}": (f"mega.layers.{{}}.{v}", copy) for k, v in BLOCK.items()},
    "decoder.final_norm.norm.weight": ("mega.final_norm.norm.weight", copy),
    "decoder.final_norm.norm.bias": ("mega.final_norm.norm.bias", copy),
    "decoder.final_norm.norm.scalar": ("mega.final_norm.norm.scalar", copy),
    "decoder.output_projection.weight": ("lm_head.weight", copy),
})

DROP = DropList({
    r"^decoder\.version$": "fairseq decoder version marker",
    r"_float_tensor$": "device-placement buffer (no data)",
    r"^last_optimizer_state\.": "optimizer state",
})
