"""MobileBERT TensorFlow checkpoints (google-research/mobilebert) -> HF MobileBertForPreTraining.

Inputs: the release directory (``mobilebert.ckpt.{index,data-*}``, ``vocab.txt``, with or without a TF
``checkpoint`` state file), a checkpoint prefix or ``.index`` file, or the release ``.tar.gz``
(extracted safely into a temp dir). The JSON config is any ``*.json`` beside the checkpoint that has
MobileBERT's fields (``bert_config.json``, the repo's ``uncased_L-24_H-128_B-512_A-4_F-4_OPT.json`` ...)
or ``--config FILE``; the vocabulary ``vocab.txt`` beside it or ``--vocab FILE``.

Absent config fields take the ORIGINAL code's defaults (google-research ``BertConfig``: layer_norm,
no bottleneck, one FFN, no trigram, classifier_activation true), not transformers' (which are the OPT
model's). The weight recipe is :mod:`.tables`; the original-layout forward is :mod:`.reference`.

Parity probes are unpadded: the original masks padding with ``scores * mask - 6 * (1 - mask)`` (e^-6,
not zero), transformers with the dtype minimum, so the two agree exactly only where nothing is padded.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from enc.converters.base import Activation, Converter, Plan, Probe, apply_table
from enc.converters.mobilebert_tf.reference import RefSpec, mobilebert_forward
from enc.converters.mobilebert_tf.tables import DROP, SIGNATURE, TABLE, rename
from enc.errors import ConfigError, EncError, MissingFile, UsageError
from enc.io.dtypes import DType
from enc.io.generated import identity, zeros
from enc.io.lazy import LazyTensor
from enc.io.tf_checkpoint import TFCheckpoint

# Fields only a MobileBERT config has (ALBERT's albert_config.json shares embedding_size, not these).
MOBILEBERT_FIELDS = ("intra_bottleneck_size", "num_feedforward_networks", "use_bottleneck", "trigram_input",
                     "normalization_type", "key_query_shared_bottleneck", "use_bottleneck_attention",
                     "classifier_activation")
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# TF activation names -> transformers' (TF "gelu" is the tanh approximation: HF "gelu_new").
ACT_TF_TO_HF = {"gelu": "gelu_new", "relu": "relu", "relu6": "relu6", "tanh": "tanh", "linear": "linear"}
SET_KEYS = {"lower_case": "WordPiece lower-casing (default: the config's do_lower_case, else inferred from "
                          "the vocabulary: no upper-case letters -> lower-case)"}
MAX_CONFIG_BYTES = 1 << 20
LAYER_NORM_EPS_NOTE = ("normalization_type layer_norm: transformers' MobileBERT builds embeddings.LayerNorm and each "
                       "output.LayerNorm with eps 1e-5 whatever layer_norm_eps says (TF: 1e-12); the converted weights "
                       "are exact, and parity measures what that eps changes")


def _load_json(raw: bytes) -> dict | None:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def is_mobilebert_config(obj: dict | None) -> bool:
    """An original (not transformers) config with at least one MobileBERT-only field."""
    return (isinstance(obj, dict) and "model_type" not in obj and "hidden_size" in obj
            and any(k in obj for k in MOBILEBERT_FIELDS))


def find_configs(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            if p.is_file() and p.stat().st_size <= MAX_CONFIG_BYTES and is_mobilebert_config(_load_json(p.read_bytes())):
                out.append(p)
        except OSError:
            continue
    return out


def _has_signature(prefix_or_dir: Path) -> bool:
    try:
        keys = TFCheckpoint(TFCheckpoint.resolve(prefix_or_dir)).keys()
    except (EncError, OSError, ValueError):
        return False
    rx = [re.compile(r) for r in SIGNATURE]
    return any(r.search(k) for k in keys for r in rx)


def _tar_looks_mobilebert(path: Path) -> bool:
    from enc.io.archives import tar_members

    try:
        members = tar_members(path)
    except EncError:
        return False
    names = [Path(m.name).name for m in members if m.isfile()]
    if not any(n.endswith(".index") for n in names):
        return False
    if any(n.startswith("mobilebert") and n.endswith(".index") for n in names):
        return True
    try:
        with tarfile.open(path) as tf:
            for m in members:
                if m.isfile() and m.name.endswith(".json") and m.size <= MAX_CONFIG_BYTES:
                    f = tf.extractfile(m)
                    if f is not None and is_mobilebert_config(_load_json(f.read())):
                        return True
    except (tarfile.TarError, EOFError, OSError):
        return False
    return False


class MobileBertTFConverter(Converter):
    name = "mobilebert_tf"
    description = "MobileBERT TensorFlow checkpoint (google-research/mobilebert release: dir, prefix or tarball)"
    accepts = {"config": "the original config JSON, where none is beside the checkpoint",
               "vocab": "the WordPiece vocab.txt, where none is beside the checkpoint",
               "tokenizer": "the WordPiece vocab.txt (same as --vocab)", **SET_KEYS}

    # ------------------------------------------------------------------ detection / opening
    @classmethod
    def detect(cls, path: Path) -> bool:
        from enc.io.archives import is_tarball

        path = Path(path)
        if is_tarball(path):
            return _tar_looks_mobilebert(path)
        if path.is_dir():
            has_ckpt = any(path.glob("*.index")) or (path / "checkpoint").is_file()
            return has_ckpt and (bool(find_configs(path)) or _has_signature(path))
        is_ckpt = path.name.endswith(".index") or Path(f"{path}.index").is_file()
        return is_ckpt and (bool(find_configs(path.parent)) or _has_signature(path))

    def __init__(self, path, options=None):
        super().__init__(path, options)
        self._tmp = None
        self._source: dict[str, LazyTensor] | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        root, prefix_hint = self._locate(self.path)
        self.root = root
        self.config_path = self._config_path(root)
        self.tf_config = self._read_config(self.config_path)
        self.ckpt = TFCheckpoint(TFCheckpoint.resolve(prefix_hint or root))
        self.vocab_path = self._find_vocab(root)
        self._check_vocab()

    def _locate(self, path: Path) -> tuple[Path, Path | None]:
        from enc.io.archives import TempDir, extract_tar, is_tarball

        if is_tarball(path):
            self._tmp = TempDir("enc-mobilebert-")
            extract_tar(path, self._tmp.path)
            hits = sorted(self._tmp.path.rglob("*.index"), key=lambda p: len(p.parts))
            if not hits:
                raise MissingFile(path, "the archive has no TensorFlow checkpoint (*.index)")
            return hits[0].parent, None
        if path.is_dir():
            return path, None
        prefix = path.with_name(path.name[: -len(".index")]) if path.name.endswith(".index") else path
        return path.parent, prefix

    def _config_path(self, root: Path) -> Path:
        override = self.options.overrides.get("config")
        if override:
            p = Path(override)
            if not p.is_file():
                raise MissingFile(p, "config file not found")
            return p
        found = find_configs(root)
        if not found:
            raise MissingFile(root, "no MobileBERT config JSON found beside the checkpoint (the release's is in "
                                    "google-research/mobilebert/config/, e.g. uncased_L-24_H-128_B-512_A-4_F-4_OPT."
                                    "json): pass --config FILE")
        if len(found) > 1:
            preferred = [p for p in found if p.name == "bert_config.json"]
            if len(preferred) == 1:
                return preferred[0]
            raise UsageError(root, f"several MobileBERT configs found ({', '.join(p.name for p in found)}): "
                                   "pass --config FILE")
        return found[0]

    def _read_config(self, path: Path) -> dict:
        from enc.io.jsonfile import read_json_object

        raw = read_json_object(path)
        for key in REQUIRED:
            if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] <= 0:
                raise ConfigError(path, f"{key} must be a positive integer, got {raw.get(key)!r}")
        c = dict(raw)
        # google-research BertConfig defaults (from_dict fills embedding/bottleneck sizes from hidden_size)
        c.setdefault("embedding_size", c["hidden_size"])
        c.setdefault("intra_bottleneck_size", c["hidden_size"])
        if c["embedding_size"] is None:
            c["embedding_size"] = c["hidden_size"]
        if c["intra_bottleneck_size"] is None:
            c["intra_bottleneck_size"] = c["hidden_size"]
        for key, default in (("trigram_input", False), ("use_bottleneck", False), ("use_bottleneck_attention", False),
                             ("key_query_shared_bottleneck", False), ("classifier_activation", True)):
            c.setdefault(key, default)
            if not isinstance(c[key], bool):
                raise ConfigError(path, f"{key} must be true or false, got {c[key]!r}")
        c.setdefault("num_feedforward_networks", 1)
        c.setdefault("normalization_type", "layer_norm")
        c.setdefault("hidden_act", "gelu")
        c.setdefault("max_position_embeddings", 512)
        c.setdefault("type_vocab_size", 16)
        for key in ("embedding_size", "intra_bottleneck_size", "num_feedforward_networks", "max_position_embeddings",
                    "type_vocab_size"):
            if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] <= 0:
                raise ConfigError(path, f"{key} must be a positive integer, got {c[key]!r}")
        if c["normalization_type"] not in ("no_norm", "layer_norm"):
            raise ConfigError(path, f"normalization_type {c['normalization_type']!r} is not supported "
                                    "(no_norm or layer_norm; transformers has no other)")
        if str(c["hidden_act"]).lower() not in ACT_TF_TO_HF:
            raise ConfigError(path, f"hidden_act {c['hidden_act']!r} is not a MobileBERT activation "
                                    f"({', '.join(ACT_TF_TO_HF)})")
        c["hidden_act"] = str(c["hidden_act"]).lower()
        width = c["intra_bottleneck_size"] if c["use_bottleneck"] else c["hidden_size"]
        if width % c["num_attention_heads"]:
            raise ConfigError(path, f"attention width {width} is not divisible by num_attention_heads "
                                    f"{c['num_attention_heads']}")
        if c["use_bottleneck"] and not (c["use_bottleneck_attention"] or c["key_query_shared_bottleneck"]) \
                and c["intra_bottleneck_size"] != c["hidden_size"]:
            raise ConfigError(path, "use_bottleneck without key_query_shared_bottleneck or use_bottleneck_attention "
                                    "(queries and keys read the full hidden state) has no transformers equivalent")
        if c["embedding_size"] > c["hidden_size"]:
            raise ConfigError(path, f"embedding_size {c['embedding_size']} is larger than hidden_size "
                                    f"{c['hidden_size']}")
        return c

    def _find_vocab(self, root: Path) -> Path:
        override = self.options.overrides.get("vocab") or self.options.overrides.get("tokenizer")
        if override:
            p = Path(override)
            if not p.is_file():
                raise MissingFile(p, "vocabulary file not found")
            return p
        if (root / "vocab.txt").is_file():
            return root / "vocab.txt"
        raise MissingFile(root / "vocab.txt", "WordPiece vocabulary not found (pass --vocab FILE)")

    def _check_vocab(self) -> None:
        from enc.tokenization import read_wordpiece_vocab

        words = read_wordpiece_vocab(self.vocab_path)
        n = max(words.values()) + 1
        for tok in ("[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            if tok not in words:
                raise ConfigError(self.vocab_path, f"WordPiece vocabulary has no {tok} token")
        if n > self.tf_config["vocab_size"]:
            raise ConfigError(self.vocab_path, f"the vocabulary has {n} tokens but the config's vocab_size is "
                                               f"{self.tf_config['vocab_size']}: wrong vocabulary for this model")
        self.token_ids = {t: words[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in words}
        self._words = words

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None

    # ------------------------------------------------------------------ config
    def _lower_case(self) -> bool:
        ov = self.options.overrides
        if "lower_case" in ov:
            return str(ov["lower_case"]).lower() in ("1", "true", "yes")
        if isinstance(self.tf_config.get("do_lower_case"), bool):
            return self.tf_config["do_lower_case"]
        return not any(ch.isupper() for w in self._words if not (w.startswith("[") and w.endswith("]")) for ch in w)

    def hf_config(self) -> dict:
        c = self.tf_config
        return {
            "architectures": ["MobileBertForPreTraining"], "model_type": "mobilebert",
            "vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"],
            "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": c["num_attention_heads"],
            "intermediate_size": c["intermediate_size"], "hidden_act": ACT_TF_TO_HF[c["hidden_act"]],
            "hidden_dropout_prob": c.get("hidden_dropout_prob", 0.0),
            "attention_probs_dropout_prob": c.get("attention_probs_dropout_prob", 0.1),
            "max_position_embeddings": c["max_position_embeddings"], "type_vocab_size": c["type_vocab_size"],
            "initializer_range": c.get("initializer_range", 0.02), "layer_norm_eps": 1e-12,
            "pad_token_id": self.token_ids.get("[PAD]", 0),
            "embedding_size": c["embedding_size"], "trigram_input": c["trigram_input"],
            "use_bottleneck": c["use_bottleneck"], "intra_bottleneck_size": c["intra_bottleneck_size"],
            "use_bottleneck_attention": c["use_bottleneck_attention"],
            "key_query_shared_bottleneck": c["key_query_shared_bottleneck"],
            "num_feedforward_networks": c["num_feedforward_networks"],
            "normalization_type": c["normalization_type"], "classifier_activation": c["classifier_activation"],
            "classifier_dropout": None, "tie_word_embeddings": True,
        }

    def ref_spec(self) -> RefSpec:
        c = self.tf_config
        return RefSpec(
            hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
            embedding=c["embedding_size"], bottleneck=c["intra_bottleneck_size"], trigram=c["trigram_input"],
            use_bottleneck=c["use_bottleneck"], bottleneck_attention=c["use_bottleneck_attention"],
            shared_qk=c["key_query_shared_bottleneck"] and not c["use_bottleneck_attention"],
            ffns=c["num_feedforward_networks"], no_norm=c["normalization_type"] == "no_norm", act=c["hidden_act"],
            pooler=c["classifier_activation"],
        )

    # ------------------------------------------------------------------ tensors
    def source_tensors(self) -> dict[str, LazyTensor]:
        if self._source is None:
            self._source = self.ckpt.lazy_tensors()
        return self._source

    def source_files(self) -> list[Path]:
        return (list(self.ckpt.files) + [self.config_path, self.vocab_path]) if self._tmp is None else [self.path]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        # torch-free, held equal to enc.models.mobilebert.expected_shapes by a test; _read_config has
        # checked everything MobileBertConfig.from_dict checks
        from enc.models.mobilebert_keys import expected_shapes

        return expected_shapes(self.hf_config(), "pretraining")

    def expected_keys(self) -> set[str]:
        return set(self.expected_shapes())

    def _check_norm_spelling(self) -> None:
        no_norm = self.tf_config["normalization_type"] == "no_norm"
        for key in self.source_tensors():
            if DROP.reason(key) or key.startswith("cls/"):
                continue
            fake, real = "/FakeLayerNorm/" in key, "/LayerNorm/" in key
            if (no_norm and real) or (not no_norm and fake):
                raise ConfigError(self.config_path, f"normalization_type is {self.tf_config['normalization_type']} "
                                                    f"but the checkpoint has {key}")

    def plan(self) -> Plan:
        self._check_norm_spelling()
        plan = apply_table(self.source_tensors(), TABLE, DROP, self.ckpt.index_path, rename=rename)
        c = self.tf_config
        if not c["classifier_activation"] and "mobilebert.pooler.dense.weight" in plan.tensors:
            raise ConfigError(self.config_path, "classifier_activation is false but the checkpoint has a pooler "
                                                "(bert/pooler/dense): the config does not match this checkpoint")
        H, E, V = c["hidden_size"], c["embedding_size"], c["vocab_size"]
        like = next(iter(plan.tensors.values()), None)
        dtype = like.dtype if like is not None else DType("float32")  # an enc DType or a torch dtype
        key_w, key_b = "mobilebert.embeddings.embedding_transformation.weight", "mobilebert.embeddings.embedding_transformation.bias"
        if not c["trigram_input"] and E == H and key_w not in plan.tensors:
            # TF creates no embedding_transformation when E == H without trigrams; transformers has an
            # (unused) one: write the identity.
            # (unused) one: write the identity (torch-free byte recipes: enc.io.generated, torch's bytes)
            plan.tensors[key_w] = identity(H, dtype, "identity (unused)")
            plan.tensors[key_b] = zeros((H,), dtype, "zeros (unused)")
        if H == E and "cls.predictions.dense.weight" not in plan.tensors:
            # no extra_output_weights when hidden == embedding: transformers' Linear(V, 0) is empty
            plan.tensors["cls.predictions.dense.weight"] = zeros((0, V), dtype, "empty (hidden == embedding)")
        expected = self.expected_shapes()
        for key, lazy in plan.tensors.items():
            if key in expected and tuple(lazy.shape) != expected[key]:
                src = ", ".join(lazy.sources) or key
                raise ConfigError(self.config_path, f"the config disagrees with the checkpoint: {src} has shape "
                                                    f"{list(lazy.shape)}, the config implies {list(expected[key])}")
        plan.notes.append(f"MobileBERT {c['normalization_type']}, {c['num_feedforward_networks']} FFN(s), "
                          f"bottleneck {c['use_bottleneck']}, trigram {c['trigram_input']}")
        return plan

    def summary(self) -> dict:
        return {"config": self.tf_config, "config_file": str(self.config_path), "checkpoint": str(self.ckpt.prefix),
                "vocabulary": str(self.vocab_path)}

    # ------------------------------------------------------------------ tokenizer files
    def write_extra_files(self, out_dir: Path) -> list[str]:
        from enc.tokenization import HFTokenizer

        lower = self._lower_case()
        tk = HFTokenizer.bert_wordpiece(self.vocab_path, lower)
        shutil.copyfile(self.vocab_path, out_dir / "vocab.txt")
        tk.save(str(out_dir / "tokenizer.json"))
        specials = {t.lower().strip("[]") + "_token": t for t in ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
                    if t in self.token_ids}
        tok_cfg = {"tokenizer_class": "MobileBertTokenizer", "do_lower_case": lower, "tokenize_chinese_chars": True,
                   "strip_accents": None, "model_max_length": self.tf_config["max_position_embeddings"],
                   "clean_up_tokenization_spaces": True, **specials}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        if self.tf_config["normalization_type"] == "layer_norm":
            return [LAYER_NORM_EPS_NOTE]
        return []

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[Probe]:
        """Unpadded batches of several lengths (see the module docstring for why no padding)."""
        from enc.parity import make_probes

        c, ids = self.tf_config, self.token_ids
        P, V = c["max_position_embeddings"], c["vocab_size"]
        out = []
        for seed, (n, rows) in enumerate(((48, 2), (17, 3), (6, 1))):
            out += make_probes(V, P, lengths=(min(n, P),) * rows, low=min(5, V - 1), cls_id=ids.get("[CLS]"),
                               sep_id=ids.get("[SEP]"), pad_id=ids.get("[PAD]", 0),
                               type_vocab_size=c["type_vocab_size"], seed=seed)
        return out

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        src, cache = self.source_tensors(), {}

        def var(name: str) -> torch.Tensor:  # each weight read once for all probes (MobileBERT is small)
            if name not in cache:
                cache[name] = src[name].load().float()
            return cache[name]

        spec = self.ref_spec()
        for probe in probes:
            yield from mobilebert_forward(var, spec, probe)

    def converted_activations(self, out_dir: Path, probes: Sequence[Probe]) -> Iterator[Activation]:
        from enc.models.mobilebert import from_pretrained

        model = from_pretrained(out_dir, head="pretraining")
        for probe in probes:
            yield from hf_mobilebert_activations(model, probe)


def hf_mobilebert_activations(model, probe: Probe) -> Iterator[Activation]:
    """enc's MobileBertForPreTraining on one probe, yielding the reference's names."""
    from enc.models.common import padding_mask

    mb = model.mobilebert
    m = probe.attention_mask.bool()
    x = mb.embeddings(probe.input_ids, probe.token_type_ids)
    yield Activation("embeddings", x.float(), mask=m)
    bias = padding_mask(probe.attention_mask, x.dtype)
    for i, layer in enumerate(mb.encoder.layer):
        x = layer(x, bias)
        yield Activation(f"layer.{i}", x.float(), mask=m)
    yield Activation("mlm_logits", model.mlm_logits(x).float(), "logits", m)
    yield Activation("nsp_logits", model.cls.seq_relationship(mb.pooler(x)).float(), "logits")
