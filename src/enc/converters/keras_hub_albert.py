"""keras-hub (formerly keras-nlp) ALBERT presets -> HF ALBERT.

A preset directory (``save_to_preset``) holds ``config.json`` (an ``AlbertBackbone``),
``model.weights.h5`` (Keras 3 H5 weights), ``assets/tokenizer/vocabulary.spm``, and for tasks
``task.json`` + ``task.weights.h5`` (the head's weights and the optimizer's variables). The H5 files
are read with h5py (``enc.io.keras_h5``): no Keras, no TensorFlow.

Keras names layers held in a container by class (``dense`` is the embedding projection, ``dense_1``
the pooler, ``transformer_encoder_3`` the fourth encoder block); :func:`canonical` turns every H5
path into the layer's own name, taken from the ``name`` attribute Keras 3 writes on each ``vars``
group (or, for files without it, from keras-hub's fixed construction order). The table then maps
canonical names to HF names. EinsumDense kernels are 3-D: query/key/value ``[hidden, heads, head_dim]``
become HF's ``[hidden, hidden]`` by a reshape and a transpose, the attention output ``[heads,
head_dim, hidden]`` likewise; their biases are flattened. Dense kernels are transposed.

Output by what the preset holds: ``AlbertMaskedLM`` -> ``AlbertForMaskedLM`` (with the pooler keras-hub
has), ``AlbertTextClassifier`` -> ``AlbertForSequenceClassification``, a backbone alone -> ``AlbertModel``.

One semantic difference has no exact HF spelling: keras-hub's masked-LM head LayerNorm uses epsilon
1e-5 while every backbone LayerNorm (and HF's single ``layer_norm_eps``) uses 1e-12. The output keeps
1e-12, exact for the 2 + 3 x layers backbone norms; the head norm then differs by a relative
eps / (2 var) of its input, which parity measures against keras-hub's own head (see README).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from enc.converters.base import (
    Activation,
    Converter,
    DropList,
    KeyTable,
    Plan,
    Probe,
    Transform,
    apply_table,
    copy,
    transpose,
)
from enc.errors import ConfigError, FormatError, MissingFile
from enc.io.fastcopy import RawOp
from enc.io.jsonfile import read_json_object
from enc.io.lazy import LazyTensor

MODEL_WEIGHTS = "model.weights.h5"
TASK_WEIGHTS = "task.weights.h5"
SPM = Path("assets") / "tokenizer" / "vocabulary.spm"

# [hidden, heads, head_dim] -> [heads*head_dim, hidden]; [heads, head_dim] -> [heads*head_dim]
# (each with the same rearrangement on raw bytes, enc.io.fastcopy.RawOp: a flatten keeps the bytes)
qkv_kernel = Transform("reshape(hidden,heads*head_dim)|transpose", lambda t: t.reshape(t.shape[0], -1).t(),
                       lambda s: (s[1] * s[2], s[0]),
                       raw=lambda s: RawOp("reshape|transpose", lambda a: a.reshape(a.shape[0], -1).T)
                       if len(s) == 3 else None)
qkv_bias = Transform("flatten", lambda t: t.reshape(-1), lambda s: (s[0] * s[1],),
                     raw=lambda s: RawOp("flatten", lambda a: a.reshape(-1), same_bytes=True) if len(s) == 2 else None)
# [heads, head_dim, hidden] -> [hidden, heads*head_dim]
out_kernel = Transform("reshape(heads*head_dim,hidden)|transpose", lambda t: t.reshape(-1, t.shape[-1]).t(),
                       lambda s: (s[2], s[0] * s[1]),
                       raw=lambda s: RawOp("reshape|transpose", lambda a: a.reshape(-1, a.shape[-1]).T)
                       if len(s) == 3 else None)

_E = "model/group_{}_inner_layer_{}/"
_A = _E + "_self_attention_layer/"
_HF = "albert.encoder.albert_layer_groups.{}.albert_layers.{}."

TABLE = KeyTable({
    "model/token_embedding/vars/0": ("albert.embeddings.word_embeddings.weight", copy),
    "model/position_embedding/vars/0": ("albert.embeddings.position_embeddings.weight", copy),
    "model/segment_embedding/vars/0": ("albert.embeddings.token_type_embeddings.weight", copy),
    "model/embeddings_layer_norm/vars/0": ("albert.embeddings.LayerNorm.weight", copy),
    "model/embeddings_layer_norm/vars/1": ("albert.embeddings.LayerNorm.bias", copy),
    "model/embedding_projection/vars/0": ("albert.encoder.embedding_hidden_mapping_in.weight", transpose),
    "model/embedding_projection/vars/1": ("albert.encoder.embedding_hidden_mapping_in.bias", copy),
    _A + "query_dense/vars/0": (_HF + "attention.query.weight", qkv_kernel),
    _A + "query_dense/vars/1": (_HF + "attention.query.bias", qkv_bias),
    _A + "key_dense/vars/0": (_HF + "attention.key.weight", qkv_kernel),
    _A + "key_dense/vars/1": (_HF + "attention.key.bias", qkv_bias),
    _A + "value_dense/vars/0": (_HF + "attention.value.weight", qkv_kernel),
    _A + "value_dense/vars/1": (_HF + "attention.value.bias", qkv_bias),
    _A + "output_dense/vars/0": (_HF + "attention.dense.weight", out_kernel),
    _A + "output_dense/vars/1": (_HF + "attention.dense.bias", copy),
    _E + "_self_attention_layer_norm/vars/0": (_HF + "attention.LayerNorm.weight", copy),
    _E + "_self_attention_layer_norm/vars/1": (_HF + "attention.LayerNorm.bias", copy),
    _E + "_feedforward_intermediate_dense/vars/0": (_HF + "ffn.weight", transpose),
    _E + "_feedforward_intermediate_dense/vars/1": (_HF + "ffn.bias", copy),
    _E + "_feedforward_output_dense/vars/0": (_HF + "ffn_output.weight", transpose),
    _E + "_feedforward_output_dense/vars/1": (_HF + "ffn_output.bias", copy),
    _E + "_feedforward_layer_norm/vars/0": (_HF + "full_layer_layer_norm.weight", copy),
    _E + "_feedforward_layer_norm/vars/1": (_HF + "full_layer_layer_norm.bias", copy),
    "model/pooled_dense/vars/0": ("albert.pooler.weight", transpose),
    "model/pooled_dense/vars/1": ("albert.pooler.bias", copy),
    # AlbertMaskedLM (task.weights.h5): MaskedLMHead; its output kernel is the (tied) token embedding
    "task/mlm_head/_intermediate_dense/vars/0": ("predictions.dense.weight", transpose),
    "task/mlm_head/_intermediate_dense/vars/1": ("predictions.dense.bias", copy),
    "task/mlm_head/_intermediate_layer_norm/vars/0": ("predictions.LayerNorm.weight", copy),
    "task/mlm_head/_intermediate_layer_norm/vars/1": ("predictions.LayerNorm.bias", copy),
    "task/mlm_head/vars/0": ("predictions.bias", copy),
    # AlbertTextClassifier (task.weights.h5): Dense "logits" over the pooled output
    "task/logits/vars/0": ("classifier.weight", transpose),
    "task/logits/vars/1": ("classifier.bias", copy),
})

DROP = DropList({
    r"^task/optimizer/": "Keras optimizer variables (iterations, learning rate, moments)",
    r"^model/optimizer/": "Keras optimizer variables (iterations, learning rate, moments)",
})

# keras-hub's construction order: the class-based H5 names of the backbone's layers -> their names.
_BACKBONE_ORDER = {"reversible_embedding": "token_embedding", "position_embedding": "position_embedding",
                   "embedding": "segment_embedding", "layer_normalization": "embeddings_layer_norm",
                   "dense": "embedding_projection", "dense_1": "pooled_dense"}
_TASK_ORDER = {"masked_lm_head": "mlm_head", "dense": "logits"}
_ENCODER = re.compile(r"^transformer_encoder(?:_(\d+))?$")
_ENCODER_NAME = re.compile(r"^group_(\d+)_inner_layer_(\d+)$")
TASKS = {"AlbertMaskedLM": "mlm", "AlbertTextClassifier": "cls"}
ARCHITECTURES = {"mlm": "AlbertForMaskedLM", "cls": "AlbertForSequenceClassification", "base": "AlbertModel"}
TIED = ("predictions.decoder.weight", "predictions.decoder.bias")
MLM_HEAD_EPS = 1e-5  # keras_hub MaskedLMHead(layer_norm_epsilon=1e-05)
BACKBONE_EPS = 1e-12  # keras_hub AlbertBackbone LayerNormalization(epsilon=1e-12)


def _keras_class(cfg: dict) -> str:
    reg = cfg.get("registered_name")
    if isinstance(reg, str) and ">" in reg:
        return reg.split(">", 1)[1]
    return str(cfg.get("class_name", ""))


def _is_keras_preset_config(cfg: dict) -> bool:
    reg, mod = cfg.get("registered_name"), cfg.get("module")
    return (isinstance(reg, str) and reg.startswith(("keras_hub>", "keras_nlp>"))) or (
        isinstance(mod, str) and mod.startswith(("keras_hub.", "keras_nlp.")))


def read_backbone_config(path: Path) -> dict:
    """The ``config`` of an ``AlbertBackbone`` config.json, validated."""
    cfg = read_json_object(path)
    cls = _keras_class(cfg)
    if cls != "AlbertBackbone":
        raise FormatError(path, f"keras-hub preset of {cls or 'an unknown class'}; enc converts AlbertBackbone presets")
    inner = cfg.get("config")
    if not isinstance(inner, dict):
        raise ConfigError(path, "no 'config' object in the preset's config.json")
    for key in ("vocabulary_size", "num_layers", "num_heads", "embedding_dim", "hidden_dim", "intermediate_dim"):
        v = inner.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(path, f"{key} must be a positive integer, got {v!r}")
    for key, default in (("num_groups", 1), ("num_inner_repetitions", 1), ("max_sequence_length", 512),
                         ("num_segments", 2)):
        v = inner.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(path, f"{key} must be a positive integer, got {v!r}")
        inner[key] = v
    if inner["hidden_dim"] % inner["num_heads"]:
        raise ConfigError(path, f"hidden_dim {inner['hidden_dim']} is not divisible by num_heads {inner['num_heads']}")
    if inner["num_layers"] % inner["num_groups"]:
        raise ConfigError(path, f"num_layers {inner['num_layers']} is not divisible by num_groups "
                                f"{inner['num_groups']}")
    return inner


class KerasHubAlbertConverter(Converter):
    name = "keras_hub_albert"
    accepts = {"tokenizer": "the sentencepiece model to use instead of the preset's"}
    description = "keras-hub (keras-nlp) ALBERT preset directory (config.json + model.weights.h5 [+ task])"

    @classmethod
    def detect(cls, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir() or not (path / "config.json").is_file():
            return False
        try:
            return _is_keras_preset_config(read_json_object(path / "config.json"))
        except Exception:  # noqa: BLE001 - an unreadable config is not a keras-hub preset; others may claim it
            return False

    def __init__(self, path, options=None):
        super().__init__(path, options)
        root = self.path if self.path.is_dir() else self.path.parent
        self.root = root
        self.config_path = root / "config.json"
        if not self.config_path.is_file():
            raise MissingFile(self.config_path, "keras-hub preset config not found")
        self.kcfg = read_backbone_config(self.config_path)
        self.weights_path = root / MODEL_WEIGHTS
        if not self.weights_path.is_file():
            sharded = root / "model.weights.json"
            if sharded.is_file():
                raise FormatError(sharded, "sharded keras-hub weights are not supported yet")
            raise MissingFile(self.weights_path, "the preset has no backbone weights")
        self.task_path = root / "task.json"
        self.task_weights = root / TASK_WEIGHTS
        self.task_cfg: dict = {}
        self.kind = "base"
        if self.task_path.is_file():
            task = read_json_object(self.task_path)
            tcls = _keras_class(task)
            if tcls not in TASKS:
                raise FormatError(self.task_path, f"task {tcls or '?'} is not an ALBERT task enc converts "
                                                  f"({', '.join(TASKS)})")
            self.kind = TASKS[tcls]
            self.task_cfg = task.get("config") if isinstance(task.get("config"), dict) else {}
            if not self.task_weights.is_file():
                raise MissingFile(self.task_weights, f"task.json names {tcls} but its weights file is missing")
        self.spm_path = self._find_spm(root)
        self._source: dict[str, LazyTensor] | None = None
        self.notes: list[str] = []
        if self.kind == "cls":
            self._check_classifier()

    def _check_classifier(self) -> None:
        n = self.task_cfg.get("num_classes")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(self.task_path, f"num_classes must be a positive integer, got {n!r}")
        act = self.task_cfg.get("activation")
        if act not in (None, "linear", "softmax"):
            raise ConfigError(self.task_path, f"classifier activation {act!r} has no transformers equivalent "
                                              "(AlbertForSequenceClassification outputs logits)")
        if act == "softmax":
            self.notes.append("the keras-hub classifier applies softmax; AlbertForSequenceClassification returns "
                              "the logits before it (same argmax)")

    def _find_spm(self, root: Path) -> Path:
        override = self.options.overrides.get("tokenizer")
        if override:
            p = Path(override)
            if not p.is_file():
                raise MissingFile(p, "tokenizer file not found")
            return p
        p = root / SPM
        if not p.is_file():
            raise MissingFile(p, "the preset has no sentencepiece vocabulary (pass --tokenizer FILE)")
        return p

    # ------------------------------------------------------------------ config
    @property
    def dims(self) -> dict:
        c = self.kcfg
        return {"V": c["vocabulary_size"], "E": c["embedding_dim"], "H": c["hidden_dim"], "L": c["num_layers"],
                "G": c["num_groups"], "I": c["num_inner_repetitions"], "N": c["num_heads"],
                "F": c["intermediate_dim"], "P": c["max_sequence_length"], "T": c["num_segments"]}

    def _spm_ids(self) -> dict:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(self.spm_path))
        except (OSError, RuntimeError) as e:
            raise FormatError(self.spm_path, f"not a sentencepiece model ({str(e).strip()[:120]})") from None
        return {p: sp.PieceToId(p) for p in ("[CLS]", "[SEP]", "<pad>", "[MASK]")}

    def hf_config(self) -> dict:
        d = self.dims
        ids = self._spm_ids()
        cfg = {
            "architectures": [ARCHITECTURES[self.kind]],
            "model_type": "albert",
            "vocab_size": d["V"], "embedding_size": d["E"], "hidden_size": d["H"],
            "num_hidden_layers": d["L"], "num_hidden_groups": d["G"], "inner_group_num": d["I"],
            "num_attention_heads": d["N"], "intermediate_size": d["F"],
            "hidden_act": "gelu_new",  # keras_hub gelu_approximate: the tanh approximation
            "hidden_dropout_prob": float(self.kcfg.get("dropout", 0.0) or 0.0),
            "attention_probs_dropout_prob": float(self.kcfg.get("dropout", 0.0) or 0.0),
            "max_position_embeddings": d["P"], "type_vocab_size": d["T"],
            "initializer_range": 0.02, "layer_norm_eps": BACKBONE_EPS,
            "classifier_dropout_prob": 0.1, "position_embedding_type": "absolute",
            "pad_token_id": ids["<pad>"], "bos_token_id": ids["[CLS]"], "eos_token_id": ids["[SEP]"],
            "tie_word_embeddings": True,
        }
        if self.kind == "cls":
            n = self.task_cfg["num_classes"]
            cfg["num_labels"] = n
            cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
            cfg["label2id"] = {f"LABEL_{i}": i for i in range(n)}
            cfg["classifier_dropout_prob"] = float(self.task_cfg.get("dropout", 0.1) or 0.0)
        return cfg

    # ------------------------------------------------------------------ tensors
    def source_tensors(self) -> dict[str, LazyTensor]:
        if self._source is None:
            from enc.io.keras_h5 import lazy_tensors

            src = lazy_tensors(self.weights_path, "model/")
            if self.kind != "base":
                src.update(lazy_tensors(self.task_weights, "task/"))
            self._source = src
        return self._source

    def source_files(self) -> list[Path]:
        files = [self.config_path, self.weights_path, self.spm_path]
        if self.kind != "base":
            files += [self.task_path, self.task_weights]
        return files

    def canonical(self, key: str) -> str:
        """``model/layers/transformer_encoder_3/...`` -> ``model/group_1_inner_layer_1/...`` (see module doc)."""
        from enc.io.keras_h5 import group_attr

        top, _, rest = key.partition("/")
        parts = rest.split("/")
        if len(parts) < 2 or parts[0] != "layers":
            return key  # optimizer/..., vars/... : left for the drop list (or reported as unknown)
        layer = parts[1]
        file = self.weights_path if top == "model" else self.task_weights
        cache = self.__dict__.setdefault("_names", {})
        if (top, layer) not in cache:
            cache[(top, layer)] = group_attr(file, f"layers/{layer}/vars")
        name = cache[(top, layer)]
        if top == "model":
            m = _ENCODER.match(layer)
            if m and not (name and _ENCODER_NAME.match(name)):
                k = int(m.group(1) or 0)  # keras-hub builds group-major, inner-minor
                name = f"group_{k // self.dims['I']}_inner_layer_{k % self.dims['I']}"
            elif not m and name not in _BACKBONE_ORDER.values():
                name = _BACKBONE_ORDER.get(layer, layer)
        else:
            if name not in _TASK_ORDER.values():
                name = _TASK_ORDER.get(layer, layer)
        return "/".join([top, name, *parts[2:]])

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        from enc.models.albert_keys import backbone_shapes, expected_shapes  # torch-free, tested equal

        hf = self.hf_config()
        if self.kind == "mlm":
            return {k: v for k, v in expected_shapes(hf, "mlm").items() if k not in TIED}
        base = {"albert." + k: v for k, v in backbone_shapes(hf).items()}
        if self.kind == "cls":
            n = self.task_cfg["num_classes"]
            base.update({"classifier.weight": (n, hf["hidden_size"]), "classifier.bias": (n,)})
        return base

    def expected_keys(self) -> set[str]:
        keys = set(self.expected_shapes())
        return {k[len("albert."):] for k in keys} if self.kind == "base" else keys

    def plan(self) -> Plan:
        plan = apply_table(self.source_tensors(), TABLE, DROP, self.weights_path, rename=self.canonical)
        expected = self.expected_shapes()
        for key, lazy in plan.tensors.items():
            if key in expected and tuple(lazy.shape) != expected[key]:
                src = ", ".join(lazy.sources) or key
                raise ConfigError(self.config_path, f"config.json disagrees with the weights: {src} has shape "
                                                    f"{list(lazy.shape)} -> {list(lazy.shape)} as {key}, the config "
                                                    f"implies {list(expected[key])}")
        if self.kind == "base":  # transformers saves AlbertModel without the "albert." prefix
            plan.tensors = {k[len("albert."):]: v for k, v in plan.tensors.items()}
        plan.notes.extend(self.notes)
        return plan

    def summary(self) -> dict:
        return {"config": self.kcfg, "task": self.kind, "weights": str(self.weights_path),
                "vocabulary": str(self.spm_path)}

    # ------------------------------------------------------------------ tokenizer files
    def write_extra_files(self, out_dir: Path) -> list[str]:
        from enc.converters.albert_tf import write_albert_tokenizer

        # keras-hub's AlbertTokenizer runs sentencepiece on the text as given: no lower-casing.
        write_albert_tokenizer(self.spm_path, out_dir, self.dims["P"], do_lower_case=False)
        return list(self.notes)

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[Probe]:
        from enc.parity import make_probes

        d = self.dims
        ids = self._spm_ids()
        low = min(5, d["V"] - 1)
        return make_probes(d["V"], d["P"], low=low, cls_id=ids["[CLS]"], sep_id=ids["[SEP]"],
                           pad_id=max(ids["<pad>"], 0), type_vocab_size=d["T"])

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        weights = {self.canonical(k): v for k, v in self.source_tensors().items()}

        def var(name: str) -> torch.Tensor:
            return weights[name].load().float()

        for probe in probes:
            yield from keras_albert_forward(var, self.dims, self.kind, probe)

    def verify_context(self) -> dict:
        """What :meth:`output_activations` needs besides the output directory (kept in the golden record)."""
        return {"kind": self.kind}

    def converted_activations(self, out_dir: Path, probes: Sequence[Probe]) -> Iterator[Activation]:
        return self.output_activations(Path(out_dir), probes, self.verify_context())

    @classmethod
    def output_activations(cls, out_dir: Path, probes: Sequence[Probe], context: dict,
                           device: str = "cpu") -> Iterator[Activation]:
        """enc's model on the converted directory (parity and ``enc verify``), the reference's names."""
        kind = context["kind"]
        if kind == "cls":
            from enc.models.heads import load_task_model

            model = load_task_model(out_dir, "sequence-classification")
        else:
            from enc.models.albert import from_pretrained

            model = from_pretrained(out_dir, head="mlm" if kind == "mlm" else "base")
        model = model.to(device)
        backbone = model.backbone if kind == "cls" else model
        for probe in probes:
            m = probe.attention_mask.bool()
            enc_out = backbone(probe.input_ids, probe.attention_mask, probe.token_type_ids, output_hidden_states=True)
            yield Activation("embeddings", enc_out["hidden_states"][0].float(), mask=m)
            for i, h in enumerate(enc_out["hidden_states"][1:]):
                yield Activation(f"layer.{i}", h.float(), mask=m)
            yield Activation("pooled_output", enc_out["pooler_output"].float())
            if kind == "mlm":
                yield Activation("mlm_logits", enc_out["logits"].float(), "logits", m)
            elif kind == "cls":
                logits = model(probe.input_ids, probe.attention_mask, probe.token_type_ids)
                yield Activation("class_logits", logits.float(), "logits")

    @classmethod
    def transformers_activations(cls, out_dir: Path, probes: Sequence[Probe], context: dict,
                                 device: str = "cpu") -> Iterator[Activation]:
        """The same names from transformers' Albert classes (``enc verify --runtime transformers``).

        transformers' AlbertForMaskedLM has no pooler, so pooled_output is not produced for an MLM preset."""
        from enc.verify import load_transformers_model

        kind = context["kind"]
        auto = {"mlm": "AutoModelForMaskedLM", "cls": "AutoModelForSequenceClassification"}.get(kind, "AutoModel")
        model = load_transformers_model(out_dir, auto, device)
        backbone = model if kind == "base" else model.albert
        pooled: dict = {}
        handle = backbone.register_forward_hook(lambda _m, _i, out: pooled.__setitem__("p", out.pooler_output))
        try:
            for probe in probes:
                m = probe.attention_mask.bool()
                pooled.clear()
                out = model(probe.input_ids, attention_mask=probe.attention_mask, token_type_ids=probe.token_type_ids,
                            output_hidden_states=True)
                yield Activation("embeddings", out.hidden_states[0].float(), mask=m)
                for i, h in enumerate(out.hidden_states[1:]):
                    yield Activation(f"layer.{i}", h.float(), mask=m)
                if pooled.get("p") is not None:
                    yield Activation("pooled_output", pooled["p"].float())
                if kind == "mlm":
                    yield Activation("mlm_logits", out.logits.float(), "logits", m)
                elif kind == "cls":
                    yield Activation("class_logits", out.logits.float(), "logits")
        finally:
            handle.remove()


# ---------------------------------------------------------------------- the original, in keras-hub's layout


def _gelu_approximate(x: torch.Tensor) -> torch.Tensor:
    # keras.activations.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    # keras.layers.LayerNormalization over the last axis
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * gamma + beta


def keras_albert_forward(var, d: dict, kind: str, probe: Probe) -> Iterator[Activation]:
    """keras-hub's AlbertBackbone (+ its task head) on the H5 tensors as stored: 3-D EinsumDense kernels."""
    ids, mask = probe.input_ids, probe.attention_mask
    segments = probe.token_type_ids if probe.token_type_ids is not None else torch.zeros_like(ids)
    T = ids.shape[1]
    valid = mask.bool()

    x = var("model/token_embedding/vars/0")[ids] + var("model/position_embedding/vars/0")[:T][None]
    x = x + var("model/segment_embedding/vars/0")[segments]
    x = _layer_norm(x, var("model/embeddings_layer_norm/vars/0"), var("model/embeddings_layer_norm/vars/1"),
                    BACKBONE_EPS)
    x = x @ var("model/embedding_projection/vars/0") + var("model/embedding_projection/vars/1")
    yield Activation("embeddings", x, mask=valid)

    # keras MultiHeadAttention: padding_mask masks keys; masked scores get a large negative number
    key_mask = valid[:, None, None, :]
    k = 0
    for g in range(d["G"]):
        for _ in range(d["L"] // d["G"]):
            for i in range(d["I"]):
                p = f"model/group_{g}_inner_layer_{i}/"
                a = p + "_self_attention_layer/"
                q = torch.einsum("btd,dnh->btnh", x, var(a + "query_dense/vars/0")) + var(a + "query_dense/vars/1")
                kk = torch.einsum("btd,dnh->btnh", x, var(a + "key_dense/vars/0")) + var(a + "key_dense/vars/1")
                v = torch.einsum("btd,dnh->btnh", x, var(a + "value_dense/vars/0")) + var(a + "value_dense/vars/1")
                q = q / math.sqrt(q.shape[-1])
                scores = torch.einsum("bsnh,btnh->bnts", kk, q)
                scores = scores.masked_fill(~key_mask, -1e9)
                ctx = torch.einsum("bnts,bsnh->btnh", torch.softmax(scores, -1), v)
                attn = torch.einsum("btnh,nhd->btd", ctx, var(a + "output_dense/vars/0")) + var(a + "output_dense/vars/1")
                x = _layer_norm(x + attn, var(p + "_self_attention_layer_norm/vars/0"),
                                var(p + "_self_attention_layer_norm/vars/1"), BACKBONE_EPS)
                h = _gelu_approximate(x @ var(p + "_feedforward_intermediate_dense/vars/0")
                                      + var(p + "_feedforward_intermediate_dense/vars/1"))
                h = h @ var(p + "_feedforward_output_dense/vars/0") + var(p + "_feedforward_output_dense/vars/1")
                x = _layer_norm(x + h, var(p + "_feedforward_layer_norm/vars/0"),
                                var(p + "_feedforward_layer_norm/vars/1"), BACKBONE_EPS)
                yield Activation(f"layer.{k}", x, mask=valid)
                k += 1

    pooled = torch.tanh(x[:, 0] @ var("model/pooled_dense/vars/0") + var("model/pooled_dense/vars/1"))
    yield Activation("pooled_output", pooled)
    if kind == "mlm":
        h = _gelu_approximate(x @ var("task/mlm_head/_intermediate_dense/vars/0")
                              + var("task/mlm_head/_intermediate_dense/vars/1"))
        h = _layer_norm(h, var("task/mlm_head/_intermediate_layer_norm/vars/0"),
                        var("task/mlm_head/_intermediate_layer_norm/vars/1"), MLM_HEAD_EPS)
        logits = h @ var("model/token_embedding/vars/0").t() + var("task/mlm_head/vars/0")
        yield Activation("mlm_logits", logits, "logits", valid)
    elif kind == "cls":
        yield Activation("class_logits", pooled @ var("task/logits/vars/0") + var("task/logits/vars/1"), "logits")
