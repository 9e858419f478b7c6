"""ALBERT masked-LM logits with numpy: ``enc fill-mask`` on CPU without importing torch.

Importing torch costs ~1.3 s of CPU, several times what tokenizing a sentence and running an
ALBERT-base forward over it take. For the one case where that import is pure overhead (ALBERT,
float32 compute on the CPU, a checkpoint in the canonical layout) this module runs the same forward
as :mod:`enc.models.albert` with numpy float32 arrays memory-mapped from the safetensors file.
Tests hold its predictions equal to transformers' pipeline and to the torch runtime (same top-k
tokens, scores within 1e-5).

:func:`load` decides, and answers None for anything it does not do exactly as the torch path would:
another model type, a dtype other than float32 asked for, weights that are not F32/F16/BF16,
an activation without a numpy twin, a key or shape the torch loader would reject or treat
specially (a stored, untied decoder weight). The caller then runs the torch path, which reports
whatever is wrong with the usual one-line errors. ``ENC_NUMPY=0`` turns this path off.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np

from enc.models.albert_config import AlbertConfig, mlm_shapes


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * (x * x * x))))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


# the activations of enc.models.common.ACTIVATIONS with an elementwise numpy twin ("gelu", the erf form, has none)
ACTIVATIONS = {
    "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
    "relu": lambda x: np.maximum(x, np.float32(0)), "silu": _silu, "swish": _silu, "tanh": np.tanh,
    "linear": lambda x: x,
}
_FLOAT_CODES = ("F32", "F16", "BF16")  # upcast to float32 exactly, as the torch loader's copy into fp32 does


def enabled() -> bool:
    return os.environ.get("ENC_NUMPY", "1") != "0"


class AlbertMLM:
    """The forward of ``enc.models.albert.AlbertForMaskedLM`` in numpy float32 (eval mode)."""

    def __init__(self, config: AlbertConfig, weights: dict[str, np.ndarray]):
        self.config = config
        self.w = weights
        self.act = ACTIVATIONS[config.hidden_act]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        # one 2-D GEMM over every row (numpy runs a 3-D @ 2-D product slice by slice, far slower)
        w = self.w[name + ".weight"]
        y = x.reshape(-1, x.shape[-1]) @ w.T + self.w[name + ".bias"]
        return y.reshape(*x.shape[:-1], w.shape[0])

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        d = x - mean
        var = (d * d).mean(-1, keepdims=True)
        return d / np.sqrt(var + np.float32(self.config.layer_norm_eps)) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _layer(self, x: np.ndarray, p: str, mask: np.ndarray | None) -> np.ndarray:
        B, T, H = x.shape
        nh = self.config.num_attention_heads
        hd = H // nh

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(B, T, nh, hd).transpose(0, 2, 1, 3)

        q, k, v = (heads(self._linear(x, p + "attention." + n)) for n in ("query", "key", "value"))
        s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / math.sqrt(hd))
        if mask is not None:
            s = s + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
        a = self._norm(x + self._linear(ctx, p + "attention.dense"), p + "attention.LayerNorm")
        f = self._linear(self.act(self._linear(a, p + "ffn")), p + "ffn_output")
        return self._norm(a + f, p + "full_layer_layer_norm")

    def logits(self, ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray,
               rows: list[tuple[int, int]]) -> np.ndarray:
        """Vocabulary logits [len(rows), V] at the (batch row, position) pairs ``rows`` (the masks)."""
        c, w = self.config, self.w
        T = ids.shape[1]
        e = "albert.embeddings."
        x = (w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:T][None]
             + w[e + "token_type_embeddings.weight"][token_type_ids])
        x = self._norm(x, e + "LayerNorm")
        x = self._linear(x, "albert.encoder.embedding_hidden_mapping_in")
        # additive mask as enc.models.common.padding_mask builds it: 0 where attended, float32 min where not
        mask = None
        if not attention_mask.all():
            mask = ((1.0 - attention_mask.astype(np.float32)) * np.finfo(np.float32).min)[:, None, None, :]
        per_group = c.num_hidden_layers / c.num_hidden_groups
        for layer in range(c.num_hidden_layers):
            g = int(layer / per_group)
            for i in range(c.inner_group_num):
                x = self._layer(x, f"albert.encoder.albert_layer_groups.{g}.albert_layers.{i}.", mask)
        h = x[tuple(np.array(rows, dtype=np.int64).reshape(-1, 2).T)]  # [R, H]: the head only where asked
        h = self._norm(self.act(self._linear(h, "predictions.dense")), "predictions.LayerNorm")
        return h @ w[e + "word_embeddings.weight"].T + w["predictions.bias"]


def load(model_dir: str | Path, dtype=None, device: str = "cpu") -> AlbertMLM | None:
    """The numpy ALBERT masked LM of ``model_dir``, or None where the torch path must run (see the module doc).

    Errors in config.json or the safetensors header are raised as the torch path raises them (the same
    readers); anything else unusual answers None.
    """
    from enc.models.loading import read_config, weight_files

    if not enabled() or device != "cpu" or (dtype is not None and str(dtype) not in ("torch.float32", "float32")):
        return None
    raw = read_config(model_dir)
    if raw.get("model_type") != "albert":
        return None
    cfg = AlbertConfig.from_dict(raw)
    if cfg.hidden_act not in ACTIVATIONS:
        return None
    files = weight_files(model_dir)
    if any(f.suffix != ".safetensors" for f in files):
        return None
    from enc.io.safetensors_in import read_header

    want = mlm_shapes(cfg)
    weights: dict[str, np.ndarray] = {}
    for path in files:
        entries, _ = read_header(path)  # every offset and size checked, one-line errors naming the file
        if not entries:
            continue
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(buf) < max(e.offset + e.nbytes for e in entries.values()):
            return None  # the file changed since its header was read: the torch path reports it
        for name, e in entries.items():
            if name.startswith("sop_classifier."):
                continue  # the pretraining head, which a masked-LM load drops
            if name not in want or want[name] != e.shape or e.dtype.st not in _FLOAT_CODES or name in weights:
                return None
            if e.dtype.st == "BF16":  # the high half of a float32: exact
                bits = np.frombuffer(buf, "<u2", e.nbytes // 2, e.offset).astype(np.uint32) << 16
                weights[name] = bits.view(np.float32).reshape(e.shape)
            else:
                a = np.frombuffer(buf, "<f4" if e.dtype.st == "F32" else "<f2", e.nbytes // e.dtype.itemsize, e.offset)
                a = a.reshape(e.shape).astype(np.float32, copy=False)
                weights[name] = a if a.flags.aligned else a.copy()  # BLAS wants aligned rows
    if "predictions.bias" not in weights and "predictions.decoder.bias" in weights:
        weights["predictions.bias"] = weights["predictions.decoder.bias"]  # as enc.models.albert.load_weights
    weights.pop("predictions.decoder.bias", None)
    # the decoder weight is tied to the word embeddings; a stored one is left to the torch loader
    need = set(want) - {"albert.pooler.weight", "albert.pooler.bias", "predictions.decoder.bias",
                        "predictions.decoder.weight"}
    if "predictions.decoder.weight" in weights or not need <= set(weights):
        return None
    pooler = {"albert.pooler.weight", "albert.pooler.bias"} & set(weights)
    if pooler and len(pooler) != 2:
        return None  # half a pooler: the torch loader's missing-weight error
    return AlbertMLM(cfg, weights)
