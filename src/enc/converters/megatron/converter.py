"""Megatron-LM BERT and GPT-2 checkpoints -> HF MegatronBertForPreTraining / GPT2LMHeadModel.

Inputs: an NGC zip (read in place), a training directory (``latest_checkpointed_iteration.txt`` +
``release/`` or ``iter_NNNNNNN/``), an iteration directory, or one ``model_optim_rng.pt``; with any
number of ``mp_rank_XX`` (tensor-parallel) and ``mp_rank_XX_YYY`` (pipeline) ranks.

Recipe: every rank's tensors are named ``<rank dir>/<path in the pickle>``; the model's keys are
normalised to the legacy spelling with global layer numbers (pipeline stage offsets added); each key's
tensor-parallel shards are merged lazily (see :mod:`.tables`); the table gives the HF key and transform.
The vocabulary stays padded for BERT (as transformers does); GPT-2 is trimmed to the tokenizer when
one is given. Tied word embeddings are written once. Config comes from the checkpoint's ``args`` when
present, else from tensor shapes; ``--num-heads`` (and ``--set``) override what shapes cannot tell.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from enc.converters.base import Activation, Converter, Plan, Probe
from enc.converters.megatron import tables as T
from enc.converters.megatron.checkpoint import CKPT_NAME, ITER_DIR, TRACKER, MegatronFiles, parse_rank
from enc.converters.megatron.reference import RefSpec, megatron_forward
from enc.errors import ConfigError, CorruptCheckpoint, FormatError, MappingError, MissingFile, UsageError
from enc.io.archives import is_zip
from enc.io.lazy import LazyTensor, combine
from enc.io.megatron_pickle import StoredTensor, iter_tensors

# --set keys this converter understands (plus the --vocab/--merges/--tokenizer/--num-heads flags)
SET_KEYS = {
    "model": "bert or gpt2, when neither args nor keys tell",
    "lower_case": "WordPiece lower-casing (default: from args.tokenizer_type, the vocab file name, or its tokens)",
    "checkpoint_version": "QKV layout, for checkpoints that do not record it (default 0)",
    "hidden_act": "gelu (erf) or gelu_new (tanh), overriding what args imply",
    "layer_norm_eps": "LayerNorm epsilon (default: args.layernorm_epsilon, else 1e-5)",
    "vocab_size": "GPT-2: rows kept of the padded vocabulary (default: the tokenizer's size)",
}
FLAG_KEYS = {"vocab", "merges", "tokenizer", "num_heads"}

WORD = "language_model.embedding.word_embeddings.weight"
HEAD_COPY = "word_embeddings_for_head.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"
GPT2_EOS = "<|endoftext|>"


def _args_dict(args: Any) -> dict:
    if args is None:
        return {}
    if hasattr(args, "__dict__") and not hasattr(args, "qualname"):
        return dict(vars(args))
    return {}


def _zip_looks_megatron(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    for n in names:
        parts = n.replace("\\", "/").split("/")
        if parts[-1] in (CKPT_NAME, TRACKER) or any(parse_rank(p) for p in parts[:-1]):
            return True
    return False


class MegatronConverter(Converter):
    name = "megatron"
    accepts = {"vocab": "vocab.txt (BERT) or vocab.json (GPT-2)", "merges": "GPT-2 merges.txt",
               "tokenizer": "a tokenizer.json to copy", "num_heads": "attention heads, where args are missing",
               **SET_KEYS}
    description = "Megatron-LM BERT / GPT-2 (NGC zip, training directory, mp_rank_XX[_YYY]/model_optim_rng.pt)"

    # ------------------------------------------------------------------ detection
    @classmethod
    def detect(cls, path: Path) -> bool:
        path = Path(path)
        if path.is_file():
            if path.name == CKPT_NAME:
                return True
            return path.suffix.lower() == ".zip" and is_zip(path) and _zip_looks_megatron(path)
        if not path.is_dir():
            return False
        if (path / TRACKER).is_file() or (path / CKPT_NAME).is_file():
            return True
        for d in path.iterdir():
            if d.is_dir() and (parse_rank(d.name) or (ITER_DIR.match(d.name) and any(
                    parse_rank(r.name) for r in d.iterdir() if r.is_dir()))):
                return True
        return False

    # ------------------------------------------------------------------ opening
    def __init__(self, path, options=None):
        super().__init__(path, options)
        self.files = MegatronFiles(self.path)
        try:
            self._setup()
        except BaseException:
            self.files.close()
            raise

    def close(self) -> None:
        self.files.close()

    def _setup(self) -> None:
        self.warnings: list[str] = []
        self.assumed: list[str] = []  # guesses parity cannot check (see assumptions())
        self._converted_vocab: int | None = None
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._tk_lock = threading.Lock()
        self._crc_lock = threading.Lock()
        self._crc_error: list[Exception | None] = []  # the zip members' CRC verdict, once computed
        self._tk = None  # the tokenizer of --vocab, once built (prepare_extra_files)
        ov = self.options.overrides
        self.args = _args_dict(self.files.args())
        self.version = float(ov.get("checkpoint_version", self.files.checkpoint_version()))
        if not (self.version in (0.0, 1.0) or self.version >= 2.0):
            raise ConfigError(self.path, f"unknown checkpoint_version {self.version:g} (known: 0, 1.0, >= 2.0)")
        self._check_parallel_sizes()
        self._collect()
        self.kind = self._model_kind()
        self._read_tokenizer_files()
        self.dims = self._dims()

    def _check_parallel_sizes(self) -> None:
        a, f = self.args, self.files
        tp = a.get("tensor_model_parallel_size", a.get("model_parallel_size"))
        pp = a.get("pipeline_model_parallel_size")
        if isinstance(tp, int) and tp != f.tp_size:
            raise MissingFile(self.path, f"the checkpoint's args say tensor-parallel size {tp}, but {f.tp_size} "
                                         f"rank(s) were found: a tensor-parallel rank is missing")
        if isinstance(pp, int) and pp != f.pp_size:
            raise MissingFile(self.path, f"the checkpoint's args say pipeline-parallel size {pp}, but {f.pp_size} "
                                         f"stage(s) were found: a pipeline stage is missing")

    def _collect(self) -> None:
        """Name every tensor by rank; group the model's by normalised global key and tensor-parallel rank."""
        self._source: dict[str, LazyTensor] = {}
        self._dropped: dict[str, str] = {}
        self.parts: dict[str, dict[int, LazyTensor]] = {}
        stage_layers: dict[int, int] = {}
        models: dict[tuple[int, int], dict] = {}
        for (tp, pp), rf in sorted(self.files.ranks.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            tree = self.files.tree(tp, pp)
            if any(re.fullmatch(r"model\d+", str(k)) for k in tree):
                raise FormatError(rf.source.label, "interleaved (virtual) pipeline checkpoints (model0, model1 ...) "
                                                   "are not supported")
            model = tree.get("model", tree if "language_model" in tree else None)
            if not isinstance(model, dict):
                raise FormatError(rf.source.label, "no 'model' state dict in the checkpoint")
            models[(tp, pp)] = model
            for k, v in tree.items():
                if k == "model" and model is not tree:
                    continue
                if model is tree and k in model:
                    continue
                for path, st in iter_tensors(v, str(k)):
                    name = f"{rf.name}/{path}"
                    self._source[name] = st.lazy(name)
                    self._dropped[name] = T.STATE_DROP.reason(path) or "training state outside the model"
                if not isinstance(v, (dict, list, tuple, StoredTensor)):
                    self._dropped[f"{rf.name}/{k}"] = T.STATE_DROP.reason(str(k)) or "training metadata"
            if tp == 0:
                idx = [int(m.group(1)) for path, _ in iter_tensors(model)
                       if (m := T.LAYER.match(T.normalize(path)))]
                stage_layers[pp] = max(idx) + 1 if idx else 0
        offsets = {pp: sum(stage_layers[p] for p in range(pp)) for pp in stage_layers}
        for (tp, pp), model in models.items():
            rf = self.files.ranks[(tp, pp)]
            for path, st in iter_tensors(model):
                name = f"{rf.name}/model.{path}"
                lazy = st.lazy(name)
                self._source[name] = lazy
                key = T.normalize(path)
                m = T.LAYER.match(key)
                if m:
                    key = f"language_model.transformer.layers.{int(m.group(1)) + offsets[pp]}.{m.group(2)}"
                slot = self.parts.setdefault(key, {})
                if tp in slot:
                    raise MappingError(self.path, f"{key} appears twice for tensor-parallel rank {tp} "
                                                  f"(second: {name})")
                slot[tp] = lazy
        for key, slot in self.parts.items():
            missing = [r for r in range(self.files.tp_size) if r not in slot]
            if missing and not T.MODEL_DROP.reason(key):
                raise MissingFile(self.path, f"{key} is missing from tensor-parallel rank {missing[0]}")

    def _model_kind(self) -> str:
        forced = self.options.overrides.get("model")
        if forced is not None:
            if forced not in ("bert", "gpt2"):
                raise UsageError(None, f"--set model= takes bert or gpt2, not {forced!r}")
            return forced
        tok_type = str(self.args.get("tokenizer_type") or "")
        if tok_type.startswith("BertWordPiece"):
            return "bert"
        if tok_type == "GPT2BPETokenizer":
            return "gpt2"
        bert_only = ("lm_head.", "binary_head.", "language_model.pooler.", "language_model.embedding.tokentype")
        return "bert" if any(k.startswith(bert_only) for k in self.parts) else "gpt2"

    # ------------------------------------------------------------------ tokenizer files
    def _read_tokenizer_files(self) -> None:
        from enc.tokenization import read_bpe_merges, read_bpe_vocab, read_wordpiece_vocab

        ov = self.options.overrides
        vocab, merges, tok_json = ov.get("vocab"), ov.get("merges"), ov.get("tokenizer")
        self.vocab_file = Path(vocab) if vocab else None
        self.merges_file = Path(merges) if merges else None
        self.tokenizer_file = Path(tok_json) if tok_json else None
        self.tokenizer_size: int | None = None
        self.token_ids: dict[str, int] = {}
        if self.tokenizer_file is not None:
            from enc.tokenization import HFTokenizer

            tk = HFTokenizer(self.tokenizer_file)
            self.tokenizer_size = tk.vocab_size
            self.token_ids = {t: i for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", GPT2_EOS)
                              if (i := tk.token_to_id(t)) is not None}
            return
        if self.vocab_file is None:
            if self.merges_file is not None:
                raise UsageError(None, "--merges needs --vocab (the GPT-2 vocab.json) too")
            return
        is_json = self.vocab_file.suffix.lower() == ".json"
        if self.kind == "bert":
            if is_json or self.merges_file is not None:
                raise UsageError(None, f"{self.vocab_file.name}: a BERT checkpoint needs a WordPiece vocab.txt "
                                       "(and no --merges)")
            words = read_wordpiece_vocab(self.vocab_file)
            self.tokenizer_size = max(words.values()) + 1
        else:
            if not is_json:
                raise UsageError(None, f"{self.vocab_file.name}: a GPT-2 checkpoint needs the BPE vocab.json "
                                       "(with --merges merges.txt)")
            words = read_bpe_vocab(self.vocab_file)
            self.tokenizer_size = max(words.values()) + 1
            if self.merges_file is not None:
                read_bpe_merges(self.merges_file)
        self.token_ids = {t: words[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", GPT2_EOS) if t in words}

    def _lower_case(self) -> bool:
        ov = self.options.overrides
        if "lower_case" in ov:
            return str(ov["lower_case"]).lower() in ("1", "true", "yes")
        tok_type = str(self.args.get("tokenizer_type") or "")
        if tok_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
            return tok_type == "BertWordPieceLowerCase"
        name = self.vocab_file.name.lower() if self.vocab_file else ""
        if "uncased" in name:
            return True
        if "cased" in name:
            return False
        from enc.tokenization import read_wordpiece_vocab

        words = read_wordpiece_vocab(self.vocab_file) if self.vocab_file else {}
        return not any(c.isupper() for w in words if not (w.startswith("[") and w.endswith("]")) for c in w)

    # ------------------------------------------------------------------ config
    def _shapes(self, key: str) -> list[tuple[int, ...]]:
        slot = self.parts.get(key)
        if not slot:
            raise MappingError(self.path, f"the checkpoint has no {key}")
        return [slot[r].shape for r in sorted(slot)]

    def _dims(self) -> dict:
        a, ov, tp = self.args, self.options.overrides, self.files.tp_size
        for flag, what in (("swiglu", "SwiGLU MLPs"), ("group_query_attention", "grouped-query attention"),
                           ("apply_residual_connection_post_layernorm", "post-LayerNorm residuals")):
            if a.get(flag):
                raise FormatError(self.path, f"this checkpoint uses {what} ({flag}); enc converts Megatron BERT "
                                             "and GPT-2 architectures only")
        if a.get("position_embedding_type", "learned_absolute") not in ("learned_absolute", None):
            raise FormatError(self.path, f"position_embedding_type {a['position_embedding_type']!r} is not GPT-2/BERT's")
        if a.get("normalization", "LayerNorm") not in ("LayerNorm", None):
            raise FormatError(self.path, f"normalization {a['normalization']!r} is not GPT-2/BERT's LayerNorm")
        if a.get("num_experts"):
            raise FormatError(self.path, "mixture-of-experts Megatron checkpoints are not supported")

        word = self._shapes(WORD)
        hidden = word[0][1]
        rows = sum(s[0] for s in word)
        layer_ids = sorted({int(m.group(1)) for k in self.parts if (m := T.LAYER.match(k))})
        if layer_ids != list(range(len(layer_ids))):
            raise MappingError(self.path, f"layers are not numbered 0..N-1 (found {layer_ids[:8]} ...)")
        n_layers = len(layer_ids)
        if n_layers == 0:
            raise MappingError(self.path, "the checkpoint has no transformer layers")
        _l0 = "language_model.transformer.layers.0."
        ffn = sum(s[0] for s in self._shapes(_l0 + "mlp.dense_h_to_4h.weight"))
        max_pos = self._shapes("language_model.embedding.position_embeddings.weight")[0][0]
        qkv_rows = sum(s[0] for s in self._shapes(_l0 + "attention.query_key_value.weight"))
        if qkv_rows != 3 * hidden:
            raise FormatError(self.path, f"fused query_key_value has {qkv_rows} rows, not 3 x hidden ({3 * hidden}): "
                                         "grouped-query attention is not supported")

        heads = ov.get("num_heads")
        if heads is not None:
            heads = int(heads)
            if a.get("num_attention_heads") not in (None, heads):
                self.warnings.append(f"--num-heads {heads} overrides the checkpoint's args "
                                     f"(num_attention_heads={a['num_attention_heads']})")
        elif a.get("num_attention_heads"):
            heads = int(a["num_attention_heads"])
        elif hidden % 64 == 0:
            heads = hidden // 64
            self.assumed.append(f"{heads} attention heads (head size 64; the checkpoint has no args)")
            self.warnings.append(f"the checkpoint has no args: assumed {heads} attention heads (head size 64); "
                                 "pass --num-heads if that is wrong (shapes cannot tell)")
        else:
            raise ConfigError(self.path, "the checkpoint has no args and the head count cannot be read from shapes: "
                                         "pass --num-heads")
        if heads <= 0 or hidden % heads or heads % tp:
            raise ConfigError(self.path, f"{heads} heads do not divide hidden size {hidden} and tensor-parallel "
                                         f"size {tp}")
        for arg, value in (("hidden_size", hidden), ("num_layers", n_layers), ("ffn_hidden_size", ffn),
                           ("max_position_embeddings", max_pos), ("padded_vocab_size", rows)):
            if isinstance(a.get(arg), int) and a[arg] != value:
                raise ConfigError(self.path, f"the checkpoint's args say {arg}={a[arg]}, its tensors say {value}")

        eps = float(ov.get("layer_norm_eps", a.get("layernorm_epsilon", 1e-5)))
        tanh_mlp = bool(a.get("openai_gelu") or a.get("bias_gelu_fusion")) if a else self.kind == "gpt2"
        tanh_head = bool(a.get("openai_gelu")) if a else False
        if "hidden_act" in ov:
            if ov["hidden_act"] not in ("gelu", "gelu_new"):
                raise UsageError(None, "--set hidden_act= takes gelu (erf) or gelu_new (tanh)")
            tanh_mlp = tanh_head = ov["hidden_act"] == "gelu_new"
        if self.kind == "bert" and tanh_mlp != tanh_head:
            self.warnings.append("Megatron ran this BERT's MLPs with the tanh GELU (bias_gelu_fusion) and its LM head "
                                 "with the exact one; HF has one hidden_act (gelu_new): MLM logits differ slightly")

        vocab_out = rows
        if self.kind == "gpt2":
            if "vocab_size" in ov:
                vocab_out = int(ov["vocab_size"])
            elif self.tokenizer_size is not None:
                vocab_out = self.tokenizer_size
        if self.tokenizer_size is not None and self.tokenizer_size > rows:
            raise ConfigError(self.vocab_file or self.tokenizer_file,
                              f"the vocabulary has {self.tokenizer_size} tokens but the checkpoint's embedding has "
                              f"only {rows} rows: wrong vocabulary for this model")
        if not 0 < vocab_out <= rows:
            raise ConfigError(self.path, f"vocab_size {vocab_out} must be between 1 and the {rows} embedding rows")

        binary_head = "binary_head.weight" in self.parts
        untied = OUTPUT_LAYER in self.parts
        return {
            "hidden": hidden, "layers": n_layers, "heads": heads, "ffn": ffn, "max_pos": max_pos, "rows": rows,
            "vocab_out": vocab_out, "eps": eps, "tanh_mlp": tanh_mlp, "tanh_head": tanh_head,
            "type_vocab": self._shapes("language_model.embedding.tokentype_embeddings.weight")[0][0]
            if "language_model.embedding.tokentype_embeddings.weight" in self.parts else 0,
            "binary_head": binary_head, "untied": untied,
            "layer_scaling": bool(a.get("apply_query_key_layer_scaling", True)),
        }

    @property
    def architecture(self) -> str:
        if self.kind == "gpt2":
            return "GPT2LMHeadModel"
        return "MegatronBertForPreTraining" if self.dims["binary_head"] else "MegatronBertForMaskedLM"

    def hf_config(self) -> dict:
        d = self.dims
        if self.kind == "gpt2":
            eos = self._gpt2_eos()
            return {
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": d["vocab_out"], "n_positions": d["max_pos"], "n_embd": d["hidden"],
                "n_layer": d["layers"], "n_head": d["heads"], "n_inner": d["ffn"],
                "activation_function": "gelu_new" if d["tanh_mlp"] else "gelu",
                "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": d["eps"],
                "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
                "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": not d["untied"],
            }
        return {
            "architectures": [self.architecture], "model_type": "megatron-bert",
            "vocab_size": d["rows"], "hidden_size": d["hidden"], "num_hidden_layers": d["layers"],
            "num_attention_heads": d["heads"], "intermediate_size": d["ffn"],
            "hidden_act": "gelu_new" if d["tanh_mlp"] else "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": d["max_pos"], "type_vocab_size": d["type_vocab"] or 2,
            "initializer_range": 0.02, "layer_norm_eps": d["eps"], "pad_token_id": self.token_ids.get("[PAD]", 0),
            "tie_word_embeddings": True,
        }

    def _gpt2_eos(self) -> int | None:
        if GPT2_EOS in self.token_ids:
            return self.token_ids[GPT2_EOS]
        return 50256 if self.dims["vocab_out"] > 50256 else None

    def expected_keys(self) -> set[str]:
        # torch-free lists, held equal to the models' own state dicts by tests/models/test_megatron_bert_keys.py
        from enc.models.megatron_bert_keys import gpt2_keys, megatron_bert_keys

        if self.kind == "gpt2":
            return gpt2_keys(self.hf_config())
        return megatron_bert_keys(self.hf_config(), self.architecture)

    # ------------------------------------------------------------------ tensors
    def source_tensors(self) -> dict[str, LazyTensor]:
        return self._source

    def source_files(self) -> list[Path]:
        return self.files.files() + [p for p in (self.vocab_file, self.merges_file, self.tokenizer_file) if p]

    def _mismatch(self, what: str, rank: int) -> Exception:
        return CorruptCheckpoint(self.path, f"tensor-parallel ranks disagree on replicated tensor {what}: "
                                            f"rank {rank} differs from rank 0")

    def _merged(self, key: str, merge: str) -> LazyTensor:
        slot = self.parts[key]
        parts = [slot[r] for r in range(self.files.tp_size)]
        shapes = [p.shape for p in parts]
        same = (lambda s: s) if merge == T.REPLICATED else (lambda s: s[:1] if merge == T.ROW else s[1:])
        if any(same(s) != same(shapes[0]) for s in shapes) or any(p.dtype != parts[0].dtype for p in parts):
            raise CorruptCheckpoint(self.path, f"tensor-parallel ranks disagree on the shape or dtype of {key}: "
                                               f"{[list(s) for s in shapes]}")
        fn = T.merge_fn(merge, self.version, self.dims["heads"] // self.files.tp_size, key, self._mismatch)
        name = {T.REPLICATED: "replicated (rank 0, ranks checked equal)", T.COLUMN: "cat ranks dim 0",
                T.ROW: "cat ranks dim 1", T.VOCAB: "cat ranks dim 0 (vocab)",
                T.QKV: f"qkv v{self.version:g} -> [q|k|v, heads, hd] per rank, interleaved"}[merge]
        if len(parts) == 1 and merge != T.QKV:
            return parts[0]
        merged = combine(parts, fn, T.merged_shape(merge, shapes), name if len(parts) > 1 else name.split(" per")[0])
        if len(parts) == 1 and parts[0].raw is not None and parts[0].shape[0] % (3 * self.dims["heads"]) == 0:
            # one rank: the q/k/v row reorder is a rearrangement of the stored bytes (enc.io.fastcopy)
            raw = parts[0].raw.then(T.qkv_rows_to_hf_raw(self.version, self.dims["heads"]))
            merged = LazyTensor(merged.shape, merged.dtype, merged.loader, merged.sources, merged.recipe, raw=raw)
        return merged

    def _memo(self, key: str, lazy: LazyTensor) -> LazyTensor:
        """Keep the last merged tensors so q, k and v (written one after the other) merge once."""
        recent = self._recent

        def load() -> torch.Tensor:
            if key not in recent:
                recent[key] = lazy.load()
                while len(recent) > 2:
                    recent.popitem(last=False)
            return recent[key]

        return LazyTensor(lazy.shape, lazy.dtype, load, lazy.sources, lazy.recipe, raw=lazy.raw)

    def plan(self) -> Plan:
        d = self.dims
        tensors: dict[str, LazyTensor] = {}
        dropped = dict(self._dropped)
        unmapped: list[str] = []
        for key in self.parts:
            why = T.MODEL_DROP.reason(key)
            if why is None and self.kind == "bert" and not d["binary_head"] and key.startswith("language_model.pooler."):
                why = "pooler without a binary head (MegatronBertForMaskedLM has no pooler)"
            if why is not None:
                dropped.update({lazy.sources[0]: why for lazy in self.parts[key].values()})
                continue
            m = T.lookup(self.kind, key)
            if m is None:
                unmapped.append(f"{key} ({next(iter(self.parts[key].values())).sources[0]})")
                continue
            merged = self._merged(key, m.merge)
            if m.merge == T.VOCAB and merged.shape[0] > d["vocab_out"] and self.kind == "gpt2":
                merged = T.slice_rows(d["vocab_out"])(merged)
            if isinstance(m.hf, tuple):
                shared = self._memo(key, merged)
                for hf_key, tr in zip(m.hf, m.transform, strict=True):  # type: ignore[arg-type]
                    tensors[hf_key] = tr(shared)
            else:
                tensors[m.hf] = m.transform(merged)  # type: ignore[operator]
        if unmapped:
            raise MappingError(self.path, f"{len(unmapped)} Megatron tensor(s) no rule maps: {', '.join(unmapped[:4])}"
                               + (" ..." if len(unmapped) > 4 else ""))
        notes = [f"Megatron {self.kind}, checkpoint_version {self.version:g}, tensor-parallel {self.files.tp_size}, "
                 f"pipeline-parallel {self.files.pp_size}"]
        return Plan(tensors, dropped, notes)

    def assumptions(self) -> list[str]:
        return list(self.assumed)

    def summary(self) -> dict:
        a = self.args
        return {
            "model": self.kind, "architecture": self.architecture, "checkpoint_version": self.version,
            "tensor_parallel": self.files.tp_size, "pipeline_parallel": self.files.pp_size,
            "iteration_dir": self.files.iteration_dir or None,
            "iteration": self.files.tree(0, 0).get("iteration"),
            "has_args": bool(a), "dims": self.dims, "warnings": self.warnings,
            "args": {k: v for k, v in a.items() if isinstance(v, (int, float, str, bool)) or v is None},
        }

    # ------------------------------------------------------------------ tokenizer / extra files
    def _verify_members(self) -> None:
        """The whole-member CRC of legacy-format rank files in an NGC zip (MegatronFiles.verify_members),
        computed once (on the helper thread while the bytes move, or here); raises its error each time."""
        with self._crc_lock:
            if not self._crc_error:
                try:
                    self.files.verify_members()
                    self._crc_error.append(None)
                except CorruptCheckpoint as e:
                    self._crc_error.append(e)
            if self._crc_error[0] is not None:
                raise self._crc_error[0]

    def prepare_extra_files(self) -> None:
        """Build tokenizer.json's tokenizer while the weights are written (``enc convert`` runs this on a helper
        thread), and check the zip members' CRC. A failure is left for :meth:`write_extra_files`, which
        reports it (before anything is published)."""
        try:
            self._verify_members()
        except CorruptCheckpoint:
            pass  # raised again by write_extra_files
        if self.tokenizer_file is None and self.vocab_file is not None and \
                (self.kind == "bert" or self.merges_file is not None):
            try:
                self._tokenizer()
            except Exception:  # noqa: BLE001 - reported by write_extra_files
                pass

    def _tokenizer(self):
        """The WordPiece (BERT) or byte-level BPE (GPT-2) tokenizer of --vocab (--merges), built once."""
        from enc.tokenization import HFTokenizer

        with self._tk_lock:
            if self._tk is None:
                if self.kind == "bert":
                    self._tk = HFTokenizer.bert_wordpiece(self.vocab_file, self._lower_case())
                else:
                    self._tk = HFTokenizer.gpt2_bpe(self.vocab_file, self.merges_file)
            return self._tk

    def write_extra_files(self, out_dir: Path) -> list[str]:
        self._verify_members()  # the weights just written came from these members: nothing is published if bad
        warnings = list(self.warnings)
        d = self.dims
        if self.kind == "gpt2":
            eos = self._gpt2_eos()
            gen = {"_from_model_config": True, "bos_token_id": eos, "eos_token_id": eos}
            (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if self.tokenizer_file is not None:
            shutil.copyfile(self.tokenizer_file, out_dir / "tokenizer.json")
            return warnings
        if self.vocab_file is None:
            files = "--vocab bert-large-uncased-vocab.txt" if self.kind == "bert" else \
                "--vocab gpt2-vocab.json --merges gpt2-merges.txt"
            return warnings + [f"no tokenizer: weights converted without one; re-run with {files} to include it"]
        if self.kind == "bert":
            lower = self._lower_case()
            tk = self._tokenizer()
            shutil.copyfile(self.vocab_file, out_dir / "vocab.txt")
            specials = {t.lower().strip("[]") + "_token": t for t in ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
                        if t in self.token_ids or t == "[UNK]"}
            tok_cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": lower, "tokenize_chinese_chars": True,
                       "strip_accents": None, "model_max_length": d["max_pos"], "clean_up_tokenization_spaces": True,
                       **specials}
        else:
            if self.merges_file is None:
                raise UsageError(None, "GPT-2 byte-level BPE needs --merges merges.txt with --vocab vocab.json")
            tk = self._tokenizer()
            shutil.copyfile(self.vocab_file, out_dir / "vocab.json")
            shutil.copyfile(self.merges_file, out_dir / "merges.txt")
            specials = {k: GPT2_EOS for k in ("bos_token", "eos_token", "unk_token")} if GPT2_EOS in self.token_ids else {}
            tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
                       "model_max_length": d["max_pos"], **specials}
        tk.save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        return warnings

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[Probe]:
        from enc.parity import make_probes

        d = self.dims
        if self.kind == "gpt2":
            return make_probes(min(d["vocab_out"], self.tokenizer_size or d["vocab_out"]), d["max_pos"], pad_id=0)
        ids = self.token_ids
        return make_probes(self.tokenizer_size or d["rows"], d["max_pos"], cls_id=ids.get("[CLS]"),
                           sep_id=ids.get("[SEP]"), pad_id=ids.get("[PAD]", 0), type_vocab_size=d["type_vocab"])

    def ref_spec(self) -> RefSpec:
        d = self.dims
        logits_from = OUTPUT_LAYER if d["untied"] else (HEAD_COPY if HEAD_COPY in self.parts else WORD)
        return RefSpec(
            kind=self.kind, hidden=d["hidden"], heads=d["heads"], layers=d["layers"], tp=self.files.tp_size,
            version=self.version, eps=d["eps"], gelu_mlp="tanh" if d["tanh_mlp"] else "erf",
            gelu_head="tanh" if d["tanh_head"] else "erf", layer_scaling=d["layer_scaling"],
            binary_head=d["binary_head"], logits_from=logits_from,
            # the converted model's vocabulary once converted_activations has read it (compare() runs the two
            # streams in lock-step, so it has by the time logits are computed), else this conversion's
            vocab_out=lambda: self._converted_vocab or d["vocab_out"],
        )

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        def get(key: str, rank: int) -> torch.Tensor:
            return self.parts[key][rank].load().float()

        spec = self.ref_spec()
        for probe in probes:
            yield from megatron_forward(get, spec, probe)

    def converted_activations(self, out_dir: Path, probes: Sequence[Probe]) -> Iterator[Activation]:
        from enc.models import load_model

        model = load_model(out_dir)
        self._converted_vocab = model.config.vocab_size
        top = max(int(p.input_ids.max()) for p in probes)
        if top >= model.config.vocab_size:
            raise ConfigError(out_dir, f"the converted model has {model.config.vocab_size} tokens; pass the "
                                       "tokenizer's --vocab to enc parity so probes stay within it")
        for probe in probes:
            yield from (self._gpt2_layers(model, probe) if self.kind == "gpt2" else self._bert_layers(model, probe))

    @staticmethod
    def _gpt2_layers(model, probe: Probe) -> Iterator[Activation]:
        m = probe.attention_mask.bool()
        t = model.transformer
        x = t.embed(probe.input_ids)
        yield Activation("embeddings", x.float(), mask=m)
        for i, block in enumerate(t.h):
            x = block(x)
            yield Activation(f"layer.{i}", x.float(), mask=m)
        h = t.ln_f(x)
        yield Activation("final_norm", h.float(), mask=m)
        yield Activation("logits", model.logits(h).float(), "logits", m)

    @staticmethod
    def _bert_layers(model, probe: Probe) -> Iterator[Activation]:
        from enc.models.common import padding_mask

        m = probe.attention_mask.bool()
        bert = model.bert
        x = bert.embeddings(probe.input_ids, probe.token_type_ids)
        yield Activation("embeddings", x.float(), mask=m)
        bias = padding_mask(probe.attention_mask, x.dtype)
        for i, layer in enumerate(bert.encoder.layer):
            x = layer(x, bias)
            yield Activation(f"layer.{i}", x.float(), mask=m)
        h = bert.encoder.ln(x)
        yield Activation("final_norm", h.float(), mask=m)
        yield Activation("mlm_logits", model.mlm_logits(h).float(), "logits", m)
        if bert.pooler is not None and hasattr(model.cls, "seq_relationship"):
            yield Activation("nsp_logits", model.cls.seq_relationship(bert.pooler(h)).float(), "logits")
