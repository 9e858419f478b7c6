"""ALBERT TensorFlow checkpoints (google-research/albert releases, TF-Hub modules) -> HF ALBERT.

Inputs: a release directory (albert_config.json, model.ckpt-best.*, 30k-clean.model), a
checkpoint prefix or .index file beside albert_config.json, the release .tar.gz (extracted
safely into a temp dir), or a TF-Hub module directory (variables/variables.*, assets/).

The whole weight conversion is the table below: every ``kernel`` is transposed from TF's
[in, out] to torch's [out, in]; everything else is copied. ``cls/seq_relationship/output_weights``
is already [out, in]. The MLM decoder is tied to the word embeddings (written once).
"""

from __future__ import annotations

import json
import math
import shutil
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
    apply_table,
    copy,
    transpose,
)
from enc.errors import ConfigError, FormatError, MissingFile
from enc.io.jsonfile import read_json_object
from enc.io.lazy import LazyTensor
from enc.io.tf_checkpoint import TFCheckpoint

CONFIG_NAME = "albert_config.json"

_G = "bert/encoder/transformer/group_{}/inner_group_{}/"
_HF = "albert.encoder.albert_layer_groups.{}.albert_layers.{}."

TABLE = KeyTable({
    "bert/embeddings/word_embeddings": ("albert.embeddings.word_embeddings.weight", copy),
    "bert/embeddings/position_embeddings": ("albert.embeddings.position_embeddings.weight", copy),
    "bert/embeddings/token_type_embeddings": ("albert.embeddings.token_type_embeddings.weight", copy),
    "bert/embeddings/LayerNorm/gamma": ("albert.embeddings.LayerNorm.weight", copy),
    "bert/embeddings/LayerNorm/beta": ("albert.embeddings.LayerNorm.bias", copy),
    "bert/encoder/embedding_hidden_mapping_in/kernel": ("albert.encoder.embedding_hidden_mapping_in.weight", transpose),
    "bert/encoder/embedding_hidden_mapping_in/bias": ("albert.encoder.embedding_hidden_mapping_in.bias", copy),
    _G + "attention_1/self/query/kernel": (_HF + "attention.query.weight", transpose),
    _G + "attention_1/self/query/bias": (_HF + "attention.query.bias", copy),
    _G + "attention_1/self/key/kernel": (_HF + "attention.key.weight", transpose),
    _G + "attention_1/self/key/bias": (_HF + "attention.key.bias", copy),
    _G + "attention_1/self/value/kernel": (_HF + "attention.value.weight", transpose),
    _G + "attention_1/self/value/bias": (_HF + "attention.value.bias", copy),
    _G + "attention_1/output/dense/kernel": (_HF + "attention.dense.weight", transpose),
    _G + "attention_1/output/dense/bias": (_HF + "attention.dense.bias", copy),
    _G + "LayerNorm/gamma": (_HF + "attention.LayerNorm.weight", copy),
    _G + "LayerNorm/beta": (_HF + "attention.LayerNorm.bias", copy),
    _G + "ffn_1/intermediate/dense/kernel": (_HF + "ffn.weight", transpose),
    _G + "ffn_1/intermediate/dense/bias": (_HF + "ffn.bias", copy),
    _G + "ffn_1/intermediate/output/dense/kernel": (_HF + "ffn_output.weight", transpose),
    _G + "ffn_1/intermediate/output/dense/bias": (_HF + "ffn_output.bias", copy),
    _G + "LayerNorm_1/gamma": (_HF + "full_layer_layer_norm.weight", copy),
    _G + "LayerNorm_1/beta": (_HF + "full_layer_layer_norm.bias", copy),
    "bert/pooler/dense/kernel": ("albert.pooler.weight", transpose),
    "bert/pooler/dense/bias": ("albert.pooler.bias", copy),
    "cls/predictions/transform/dense/kernel": ("predictions.dense.weight", transpose),
    "cls/predictions/transform/dense/bias": ("predictions.dense.bias", copy),
    "cls/predictions/transform/LayerNorm/gamma": ("predictions.LayerNorm.weight", copy),
    "cls/predictions/transform/LayerNorm/beta": ("predictions.LayerNorm.bias", copy),
    "cls/predictions/output_bias": ("predictions.bias", copy),
    "cls/seq_relationship/output_weights": ("sop_classifier.classifier.weight", copy),  # already [out, in]
    "cls/seq_relationship/output_bias": ("sop_classifier.classifier.bias", copy),
})

DROP = DropList({
    r"(^|/)global_step$": "training step counter",
    r"/adam_[mv]$": "Adam optimizer slot",
    r"/lamb_[mv]$": "LAMB optimizer slot",
    r"^(AdamWeightDecayOptimizer|LAMB)(_\d+)?(/|$)": "optimizer state",
    r"(^|/)beta[12]_power$": "optimizer state",
    r"^_CHECKPOINTABLE_OBJECT_GRAPH$": "TF2 object-graph metadata",
    r"^good_steps$|^loss_scale$|^current_loss_scale$": "mixed-precision loss-scale state",
})

# The TF config's activation names -> HF's. TF's "gelu" is the tanh approximation (HF "gelu_new").
ACT_TF_TO_HF = {"gelu": "gelu_new", "relu": "relu", "tanh": "tanh", "linear": "linear"}

TIED = ("predictions.decoder.weight", "predictions.decoder.bias")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _strip_module(key: str) -> str:
    return key[len("module/"):] if key.startswith("module/") else key


def _find_config(root: Path) -> Path | None:
    for cand in (root / CONFIG_NAME, root / "assets" / CONFIG_NAME):
        if cand.is_file():
            return cand
    return None


class AlbertTFConverter(Converter):
    name = "albert_tf"
    accepts = {"tokenizer": "the sentencepiece model (30k-clean.model) to use"}
    description = "ALBERT TensorFlow checkpoint (google-research/albert release, tarball or TF-Hub module)"

    # ------------------------------------------------------------------ detection / opening
    @classmethod
    def detect(cls, path: Path) -> bool:
        from enc.io.archives import is_tarball, tar_members

        path = Path(path)
        if is_tarball(path):
            return any(Path(m.name).name == CONFIG_NAME for m in tar_members(path))
        if path.is_dir():
            return _find_config(path) is not None
        parent = path.parent
        is_ckpt = path.suffix == ".index" or Path(str(path) + ".index").is_file()
        return is_ckpt and (parent / CONFIG_NAME).is_file()

    def __init__(self, path, options=None):
        super().__init__(path, options)
        self._tmp = None
        self._read_warnings: list[str] = []
        root, prefix_hint = self._locate(self.path)
        self.root = root
        cfg_path = _find_config(root)
        if cfg_path is None:
            raise MissingFile(root / CONFIG_NAME, "ALBERT config not found (every release ships albert_config.json)")
        self.config_path = cfg_path
        self.tf_config = self._read_config(cfg_path)
        # Inside an archive a state file naming a checkpoint elsewhere is never followed.
        prefix = TFCheckpoint.resolve(prefix_hint or root, confine=self._tmp is not None, notes=self._read_warnings)
        self.ckpt = TFCheckpoint(prefix)
        self.spm_path = self._find_spm(root)
        self._source: dict[str, LazyTensor] | None = None

    def _locate(self, path: Path) -> tuple[Path, Path | None]:
        from enc.io.archives import TempDir, extract_tar, is_tarball

        if is_tarball(path):
            self._tmp = TempDir("enc-albert-")
            extract_tar(path, self._tmp.path)
            hits = sorted(self._tmp.path.rglob(CONFIG_NAME), key=lambda p: len(p.parts))
            if not hits:
                raise MissingFile(path, f"the archive has no {CONFIG_NAME}")
            root = hits[0].parent
            return (root.parent if root.name == "assets" else root), None
        if path.is_dir():
            return path, None
        prefix = path.with_suffix("") if path.suffix == ".index" else path
        return path.parent, prefix

    def _read_config(self, path: Path) -> dict:
        cfg = read_json_object(path)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if not _positive_int(cfg.get(key)):
                raise ConfigError(path, f"{key} must be a positive integer, got {cfg.get(key)!r}")
        for key in ("embedding_size", "max_position_embeddings", "type_vocab_size"):  # optional, with defaults
            if key in cfg and not _positive_int(cfg[key]):
                raise ConfigError(path, f"{key} must be a positive integer, got {cfg[key]!r}")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ConfigError(path, f"hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads "
                                    f"{cfg['num_attention_heads']}")
        act = cfg.get("hidden_act", "gelu")
        if act not in ACT_TF_TO_HF:
            raise ConfigError(path, f"hidden_act {act!r} is not an ALBERT TF activation ({', '.join(ACT_TF_TO_HF)})")
        for key in ("num_hidden_groups", "inner_group_num"):
            if not _positive_int(cfg.get(key, 1)):
                raise ConfigError(path, f"{key} must be a positive integer, got {cfg.get(key)!r}")
        return cfg

    def _find_spm(self, root: Path) -> Path:
        override = self.options.overrides.get("tokenizer")
        if override:
            p = Path(override)
            if not p.is_file():
                raise MissingFile(p, "tokenizer file not found")
            return p
        for d in (root, root / "assets"):
            if (d / "30k-clean.model").is_file():
                return d / "30k-clean.model"
            models = sorted(d.glob("*.model")) if d.is_dir() else []
            if len(models) == 1:
                return models[0]
        if (root / "vocab.txt").is_file():
            raise FormatError(root / "vocab.txt", "WordPiece ALBERT vocabularies (the Chinese releases) are not "
                                                  "supported yet; only sentencepiece 30k-clean.model")
        raise MissingFile(root / "30k-clean.model", "sentencepiece vocabulary not found (pass --tokenizer FILE)")

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None

    # ------------------------------------------------------------------ config
    @property
    def dims(self) -> dict:
        c = self.tf_config
        return {
            "V": c["vocab_size"], "E": c.get("embedding_size", 128), "H": c["hidden_size"],
            "L": c["num_hidden_layers"], "G": c.get("num_hidden_groups", 1), "I": c.get("inner_group_num", 1),
            "N": c["num_attention_heads"], "F": c["intermediate_size"], "P": c.get("max_position_embeddings", 512),
            "T": c.get("type_vocab_size", 2),
        }

    def hf_config(self) -> dict:
        c, d = self.tf_config, self.dims
        from enc.tokenization import load_sentencepiece

        sp = load_sentencepiece(self.spm_path)
        ids = {p: sp.PieceToId(p) for p in ("[CLS]", "[SEP]", "<pad>")}
        return {
            "architectures": ["AlbertForPreTraining"],
            "model_type": "albert",
            "vocab_size": d["V"], "embedding_size": d["E"], "hidden_size": d["H"],
            "num_hidden_layers": d["L"], "num_hidden_groups": d["G"], "inner_group_num": d["I"],
            "num_attention_heads": d["N"], "intermediate_size": d["F"],
            "hidden_act": ACT_TF_TO_HF[c.get("hidden_act", "gelu")],
            "hidden_dropout_prob": c.get("hidden_dropout_prob", 0.0),
            "attention_probs_dropout_prob": c.get("attention_probs_dropout_prob", 0.0),
            "max_position_embeddings": d["P"], "type_vocab_size": d["T"],
            "initializer_range": c.get("initializer_range", 0.02),
            "layer_norm_eps": 1e-12,
            "classifier_dropout_prob": 0.1,
            "position_embedding_type": "absolute",
            "pad_token_id": ids["<pad>"], "bos_token_id": ids["[CLS]"], "eos_token_id": ids["[SEP]"],
            "tie_word_embeddings": True,
        }

    # ------------------------------------------------------------------ tensors
    def source_tensors(self) -> dict[str, LazyTensor]:
        if self._source is None:
            self._source = self.ckpt.lazy_tensors()
        return self._source

    def source_files(self) -> list[Path]:
        files = list(self.ckpt.files) + [self.config_path, self.spm_path]
        if self._tmp is None:
            return files
        # from a tarball: the archive, and any file given from outside it (--tokenizer)
        return [self.path] + [f for f in files if self._tmp.path.resolve() not in f.resolve().parents]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        from enc.models.albert_keys import expected_shapes  # torch-free; held equal to the model's by a test

        return {k: v for k, v in expected_shapes(self.hf_config(), "pretraining").items() if k not in TIED}

    def expected_keys(self) -> set[str]:
        return set(self.expected_shapes())

    def plan(self) -> Plan:
        plan = apply_table(self.source_tensors(), TABLE, DROP, self.ckpt.index_path, rename=_strip_module)
        d = self.dims
        if d["E"] == d["H"] and "albert.encoder.embedding_hidden_mapping_in.weight" not in plan.tensors:
            # TF applies no projection when E == H; HF always has one: write the identity (torch-free
            # byte recipes: enc.io.generated, the same bytes as torch.eye / torch.zeros)
            from enc.io.generated import identity, zeros

            src = plan.tensors["albert.embeddings.LayerNorm.weight"]
            pre = f"{src.recipe}|" if src.recipe else ""
            plan.tensors["albert.encoder.embedding_hidden_mapping_in.weight"] = identity(
                d["H"], src.dtype, pre + "identity (E == H)")
            plan.tensors["albert.encoder.embedding_hidden_mapping_in.bias"] = zeros(
                (d["H"],), src.dtype, pre + "zeros (E == H)")
        expected = self.expected_shapes()
        for key, lazy in plan.tensors.items():
            if key in expected and tuple(lazy.shape) != expected[key]:
                src = ", ".join(lazy.sources) or key
                raise ConfigError(self.config_path, f"{CONFIG_NAME} disagrees with the checkpoint: {src} has shape "
                                                    f"{list(lazy.shape)}, the config implies {list(expected[key])}")
        return plan

    def summary(self) -> dict:
        return {"config": self.tf_config, "checkpoint": str(self.ckpt.prefix), "vocabulary": str(self.spm_path),
                "files": [str(p.resolve()) for p in self.source_files()], "warnings": list(self._read_warnings)}

    # ------------------------------------------------------------------ tokenizer files
    def write_extra_files(self, out_dir: Path) -> list[str]:
        write_albert_tokenizer(self.spm_path, out_dir, self.dims["P"])
        return list(self._read_warnings)

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[Probe]:
        from enc.parity import make_probes
        from enc.tokenization import AlbertSentencePiece

        tok = AlbertSentencePiece(self.spm_path)
        d = self.dims
        low = min(5, d["V"] - 1)
        return make_probes(d["V"], d["P"], low=low, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id or 0,
                           type_vocab_size=d["T"])

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        weights = {_strip_module(k): v for k, v in self.source_tensors().items()}

        def var(name: str) -> torch.Tensor:
            return weights[name].load().float()

        act = self.tf_config.get("hidden_act", "gelu")
        for probe in probes:
            yield from tf_albert_forward(var, self.dims, act, probe)

    def converted_activations(self, out_dir: Path, probes: Sequence[Probe]) -> Iterator[Activation]:
        from enc.models.albert import from_pretrained

        model = from_pretrained(out_dir)
        for probe in probes:
            yield from hf_albert_activations(model, probe)


def hf_albert_activations(model, probe: Probe) -> Iterator[Activation]:
    """The activations parity compares, from an enc.models.albert model (also used by ``enc verify``)."""
    out = model(probe.input_ids, probe.attention_mask, probe.token_type_ids, output_hidden_states=True)
    m = probe.attention_mask.bool()
    yield Activation("embeddings", out["hidden_states"][0].float(), mask=m)
    for i, h in enumerate(out["hidden_states"][1:]):
        yield Activation(f"layer.{i}", h.float(), mask=m)
    yield Activation("mlm_logits", out["logits"].float(), "logits", m)
    if "sop_logits" in out:
        yield Activation("sop_logits", out["sop_logits"].float(), "logits")



def write_albert_tokenizer(spm_path: Path, out_dir: Path, max_len: int, do_lower_case: bool = True) -> None:
    """spiece.model + tokenizer_config.json + special_tokens_map.json, as transformers' AlbertTokenizer reads them."""
    shutil.copyfile(spm_path, out_dir / "spiece.model")
    mask = {"content": "[MASK]", "lstrip": True, "rstrip": False, "normalized": False, "single_word": False,
            "special": True}
    specials = {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "<unk>", "sep_token": "[SEP]",
                "pad_token": "<pad>", "cls_token": "[CLS]", "mask_token": mask}
    tok_cfg = {"tokenizer_class": "AlbertTokenizer", "do_lower_case": do_lower_case, "remove_space": True,
               "keep_accents": False, "model_max_length": max_len, **specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")

# ---------------------------------------------------------------------- the original, in TF layout


def _tf_gelu(x: torch.Tensor) -> torch.Tensor:
    # google-research/albert modeling.gelu: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


_TF_ACT = {"gelu": _tf_gelu, "relu": lambda x: torch.relu(x), "tanh": lambda x: torch.tanh(x), "linear": lambda x: x}


def _tf_layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    # tf.contrib.layers.layer_norm over the last axis, variance_epsilon 1e-12
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-12) * gamma + beta


def tf_albert_forward(var, d: dict, act_name: str, probe: Probe) -> Iterator[Activation]:
    """ALBERT as google-research/albert modeling.py computes it, on TF-named [in, out] kernels."""
    act = _TF_ACT[act_name]
    ids, mask = probe.input_ids, probe.attention_mask
    types = probe.token_type_ids if probe.token_type_ids is not None else torch.zeros_like(ids)
    B, T = ids.shape
    N, H = d["N"], d["H"]
    D = H // N
    valid = mask.bool()

    x = var("bert/embeddings/word_embeddings")[ids]
    x = x + var("bert/embeddings/token_type_embeddings")[types]
    x = x + var("bert/embeddings/position_embeddings")[:T][None]
    x = _tf_layer_norm(x, var("bert/embeddings/LayerNorm/gamma"), var("bert/embeddings/LayerNorm/beta"))
    if d["E"] != d["H"]:
        x = x @ var("bert/encoder/embedding_hidden_mapping_in/kernel") + var("bert/encoder/embedding_hidden_mapping_in/bias")
    yield Activation("embeddings", x, mask=valid)

    adder = (1.0 - mask[:, None, None, :].float()) * -10000.0  # create_attention_mask_from_input_mask
    k = 0
    for layer in range(d["L"]):
        g = int(layer / d["L"] * d["G"])
        for inner in range(d["I"]):
            p = f"bert/encoder/transformer/group_{g}/inner_group_{inner}/"

            def dense(t: torch.Tensor, scope: str, _p: str = p) -> torch.Tensor:
                return t @ var(_p + scope + "/kernel") + var(_p + scope + "/bias")

            q = dense(x, "attention_1/self/query").view(B, T, N, D).permute(0, 2, 1, 3)
            kk = dense(x, "attention_1/self/key").view(B, T, N, D).permute(0, 2, 1, 3)
            v = dense(x, "attention_1/self/value").view(B, T, N, D).permute(0, 2, 1, 3)
            scores = q @ kk.transpose(-1, -2) / math.sqrt(D) + adder
            ctx = (torch.softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(B, T, H)
            a = _tf_layer_norm(x + dense(ctx, "attention_1/output/dense"), var(p + "LayerNorm/gamma"),
                               var(p + "LayerNorm/beta"))
            f = dense(act(dense(a, "ffn_1/intermediate/dense")), "ffn_1/intermediate/output/dense")
            x = _tf_layer_norm(f + a, var(p + "LayerNorm_1/gamma"), var(p + "LayerNorm_1/beta"))
            yield Activation(f"layer.{k}", x, mask=valid)
            k += 1

    t = act(x @ var("cls/predictions/transform/dense/kernel") + var("cls/predictions/transform/dense/bias"))
    t = _tf_layer_norm(t, var("cls/predictions/transform/LayerNorm/gamma"), var("cls/predictions/transform/LayerNorm/beta"))
    logits = t @ var("bert/embeddings/word_embeddings").t() + var("cls/predictions/output_bias")
    yield Activation("mlm_logits", logits, "logits", valid)
    pooled = torch.tanh(x[:, 0] @ var("bert/pooler/dense/kernel") + var("bert/pooler/dense/bias"))
    yield Activation("sop_logits", pooled @ var("cls/seq_relationship/output_weights").t()
                     + var("cls/seq_relationship/output_bias"), "logits")
