"""MEGA originals -> transformers 4.x MEGA layout (``MegaForMaskedLM`` / ``MegaForCausalLM``), run by enc.models.mega.

Inputs (auto-detected, ``--from mega``):
- a fairseq ``model.pt`` of ``facebookresearch/mega``'s ``mega_lm`` (or a directory holding it and ``dict.txt``):
  -> ``MegaForCausalLM`` plus the parts transformers never had, written as config keys enc's runtime reads:
  ``embed_scale`` (sqrt(d) unless --no-scale-embedding) and ``final_norm`` (``mega.final_norm.*``, with
  --normalize-before); the bias-free output projection gets a zero ``lm_head.bias``;
- the Colab wrapper directory HF's own conversion script read (``model_args.pkl``, ``encoder_weights.pt``,
  ``mlm_head_weights.pt``, optionally a HF tokenizer) -> ``MegaForMaskedLM``.
Adaptive input / softmax (the WikiText-103 models), embedding norms and input projections are refused.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from enc.converters.base import Activation, Converter, Plan, Probe, apply_table
from enc.converters.mega import checkpoint as ck
from enc.converters.mega.reference import forward as reference_forward
from enc.converters.mega.tables import DROP, LM_TABLE, WRAPPER_TABLE
from enc.errors import ConfigError, FormatError, MissingFile
from enc.io.lazy import LazyTensor

NORMS = ("layernorm", "scalenorm", "rmsnorm")


def _pos_int(args: dict, key: str, path: Path, default=None) -> int:
    v = args.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(path, f"args.{key} must be a positive integer, got {v!r}")
    return v


class MegaConverter(Converter):
    name = "mega"
    accepts: dict[str, str] = {}  # no overrides: fairseq's args say everything
    description = "MEGA: fairseq mega_lm model.pt (facebookresearch/mega) or the HF conversion's wrapper trio"

    @classmethod
    def detect(cls, path: Path) -> bool:
        path = Path(path)
        if ck.is_wrapper(path):
            return True
        pt = ck.find_fairseq_checkpoint(path)
        return pt is not None and pt.name != "model_optim_rng.pt" and ck.peek_fairseq(pt) is not None

    def __init__(self, path, options=None):
        super().__init__(path, options)
        if ck.is_wrapper(self.path):
            self.src = ck.read_wrapper(self.path)
        else:
            pt = ck.find_fairseq_checkpoint(self.path)
            if pt is None:
                raise MissingFile(self.path, "no fairseq model.pt (or the wrapper's model_args.pkl, encoder_weights.pt, "
                                             "mlm_head_weights.pt) found")
            self.src = ck.read_fairseq(pt)
        self.label = self.src.files[0]
        self.warnings: list[str] = []
        self.arch = self._arch()

    # ------------------------------------------------------------------ config
    def _arch(self) -> dict:
        a, path, t = self.src.args, self.label, self.src.tensors
        lm = self.src.kind == "fairseq_lm"
        side = "decoder" if lm else "encoder"
        if lm:
            if a.get("adaptive_input") or a.get("adaptive_softmax_cutoff"):
                raise FormatError(path, "adaptive input / adaptive softmax (the WikiText-103 MEGA models) has no "
                                        "transformers layout and is not supported")
            if a.get("normalize_embedding"):
                raise FormatError(path, "--normalize-embedding (an embedding norm) is not supported")
            if a.get("decoder_input_dim", a.get("decoder_embed_dim")) != a.get("decoder_embed_dim"):
                raise FormatError(path, "decoder_input_dim != decoder_embed_dim (an input projection) is not supported")
            if a.get("no_affine_final_norm") and a.get("normalize_before"):
                raise FormatError(path, "--no-affine-final-norm is not supported")
        emb = t.get("decoder.embed_tokens.weight" if lm else "embedding_layer.weight")
        if emb is None or len(emb.shape) != 2:
            raise FormatError(path, "no token embedding in the checkpoint")
        d = _pos_int(a, f"{side}_embed_dim", path)
        if emb.shape[1] != d:
            raise ConfigError(path, f"args.{side}_embed_dim is {d}, the embedding has width {emb.shape[1]}")
        norm = a.get("normalization_type", "layernorm")
        if norm not in NORMS:
            raise ConfigError(path, f"normalization_type {norm!r} is not supported ({', '.join(NORMS)})")
        rel = a.get("rel_pos_bias", "simple")
        if rel not in ("simple", "rotary"):
            raise ConfigError(path, f"rel_pos_bias {rel!r} is not simple or rotary")
        act = a.get("activation_fn", "silu")
        att = a.get("attention_activation_fn", "softmax")
        if att not in ("softmax", "relu2", "laplace"):
            raise ConfigError(path, f"attention_activation_fn {att!r} is not softmax, relu2 or laplace")
        trunc = a.get("truncation_length")
        chunk = a.get(f"{side}_chunk_size", -1)
        out = {
            "vocab": emb.shape[0], "d": d, "layers": _pos_int(a, "decoder_layers" if lm else "depth", path),
            "z": _pos_int(a, f"{side}_z_dim", path), "h": _pos_int(a, f"{side}_hidden_dim", path),
            "n": _pos_int(a, f"{side}_n_dim", path), "ffn": int(a.get(f"{side}_ffn_embed_dim", 0) or 0),
            "chunk": int(chunk if isinstance(chunk, int) else -1),
            "truncation": trunc if isinstance(trunc, int) and trunc > 0 else None,
            "norm": norm, "rel_pos_bias": rel, "activation": act, "attention_activation": att,
            "prenorm": bool(a.get("normalize_before", False)), "bidirectional": not lm and bool(a.get("bidirectional", True)),
            "max_positions": _pos_int(a, "max_target_positions" if lm else "max_source_positions", path, 1024),
            "embed_scale": 1.0 if (not lm or a.get("no_scale_embedding")) else math.sqrt(d),
            "final_norm": lm and bool(a.get("normalize_before", False)),
            "tied": False,
        }
        if lm:
            out["tied"] = bool(a.get("share_decoder_input_output_embed"))
        else:
            out["vocab"] = _pos_int(a, "vocab_size", path)
            head = t.get("mlm_head.weight")
            out["tied"] = head is not None and torch.equal(head.load(), emb.load())
        if norm == "rmsnorm":
            self.warnings.append("rmsnorm: transformers 4.x's MegaRMSNorm skips its normalisation; enc writes "
                                 "rmsnorm_normalize=true so enc's runtime computes what fairseq did")
        return out

    def hf_config(self) -> dict:
        a = self.arch
        lm = self.src.kind == "fairseq_lm"
        cfg = {
            "architectures": ["MegaForCausalLM" if lm else "MegaForMaskedLM"], "model_type": "mega",
            "vocab_size": a["vocab"], "hidden_size": a["d"], "num_hidden_layers": a["layers"],
            "intermediate_size": a["h"], "ema_projection_size": a["n"], "shared_representation_size": a["z"],
            "bidirectional": a["bidirectional"], "use_chunking": a["chunk"] > 0, "chunk_size": a["chunk"],
            "truncation": a["truncation"], "normalize_before_mega": a["prenorm"], "normalize_before_ffn": a["prenorm"],
            "normalization_type": a["norm"], "norm_affine": True, "activation": a["activation"],
            "attention_activation": a["attention_activation"], "use_normalized_ffn": a["ffn"] > 0,
            "nffn_hidden_size": a["ffn"] if a["ffn"] > 0 else a["d"], "max_positions": a["max_positions"],
            "relative_positional_bias": a["rel_pos_bias"], "add_token_type_embeddings": False,
            "add_lm_hidden_dense_layer": False, "is_decoder": lm, "tie_word_embeddings": a["tied"],
            "dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "nffn_activation_dropout_prob": 0.0, "use_feature_dropout": False,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        }
        if a["norm"] == "rmsnorm":
            cfg["rmsnorm_normalize"] = True
        if lm:
            if a["embed_scale"] != 1.0:
                cfg["embed_scale"] = a["embed_scale"]
            if a["final_norm"]:
                cfg["final_norm"] = True
        return cfg

    # ------------------------------------------------------------------ tensors
    def source_tensors(self) -> dict[str, LazyTensor]:
        return self.src.tensors

    def source_files(self) -> list[Path]:
        return list(self.src.files)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        from enc.models.common import build
        from enc.models.mega import MegaConfig, MegaForCausalLM, MegaForMaskedLM

        cfg = MegaConfig.from_dict(self.hf_config())
        cls = MegaForCausalLM if cfg.is_decoder else MegaForMaskedLM
        try:
            sd = build(cls, cfg, "meta").state_dict()
        except ValueError as e:
            raise ConfigError(self.label, str(e)) from None
        tied = f"{cls.head}.weight" if cfg.tie_word_embeddings else None
        return {k: tuple(v.shape) for k, v in sd.items() if k != tied}

    def expected_keys(self) -> set[str]:
        return set(self.expected_shapes())

    def plan(self) -> Plan:
        lm = self.src.kind == "fairseq_lm"
        source = dict(self.src.tensors)
        if self.arch["tied"]:
            tied = "decoder.output_projection.weight" if lm else "mlm_head.weight"
            source.pop(tied, None)
        plan = apply_table(source, LM_TABLE if lm else WRAPPER_TABLE, DROP, self.label)
        if self.arch["tied"]:
            plan.dropped["decoder.output_projection.weight" if lm else "mlm_head.weight"] = "tied to the embedding"
        plan.dropped.update(self.src.dropped)
        if lm:
            emb = plan.tensors["mega.embedding_layer.word_embeddings.weight"]
            V = self.arch["vocab"]
            plan.tensors["lm_head.bias"] = LazyTensor((V,), emb.dtype, lambda: torch.zeros(V, dtype=emb.dtype), (),
                                                      "zeros (fairseq's output projection has no bias)")
        expected = self.expected_shapes()
        for key, lazy in plan.tensors.items():
            if key in expected and tuple(lazy.shape) != expected[key]:
                raise ConfigError(self.label, f"the checkpoint's args disagree with its tensors: "
                                              f"{', '.join(lazy.sources) or key} has shape {list(lazy.shape)}, the args "
                                              f"imply {list(expected[key])}")
        return plan

    def summary(self) -> dict:
        return {"kind": self.src.kind, "args": {k: v for k, v in self.src.args.items()
                                                 if isinstance(v, (int, float, str, bool, type(None)))}}

    # ------------------------------------------------------------------ tokenizer files
    def write_extra_files(self, out_dir: Path) -> list[str]:
        warnings = list(self.warnings)
        root = self.src.root
        if self.src.kind == "wrapper":
            copied = [f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                      if (root / f).is_file()]
            for f in copied:
                shutil.copyfile(root / f, out_dir / f)
            if "tokenizer.json" not in copied:
                warnings.append("no tokenizer.json beside the wrapper checkpoint: the output has weights and config "
                                "only (add the tokenizer the model was trained with)")
            return warnings
        dict_txt = root / "dict.txt"
        if not dict_txt.is_file():
            warnings.append(f"no dict.txt beside {self.label.name}: the output has no tokenizer")
            return warnings
        shutil.copyfile(dict_txt, out_dir / "dict.txt")
        write_fairseq_tokenizer(dict_txt, out_dir, self.arch["vocab"])
        (out_dir / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "do_sample": False}, indent=2) + "\n")
        return warnings

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[Probe]:
        from enc.parity import make_probes

        a = self.arch
        C = a["chunk"]
        lengths = (16, 12, 8) if C <= 0 else tuple(max(C, (n // C) * C) for n in (16, 12, 8))
        top = a["max_positions"] if C <= 0 else C * max(1, a["max_positions"] // C)
        return make_probes(a["vocab"], top, lengths=lengths, low=4, pad_id=1,
                           bos_id=0 if self.src.kind == "fairseq_lm" else None)

    def reference_activations(self, probes: Sequence[Probe]) -> Iterator[Activation]:
        t = self.src.tensors

        def w(name: str) -> torch.Tensor:
            return t[name].load().float()

        for probe in probes:
            yield from reference_forward(w, self.arch, probe, self.src.kind)

    def converted_activations(self, out_dir: Path, probes: Sequence[Probe]) -> Iterator[Activation]:
        from enc.models.mega import from_pretrained

        model = from_pretrained(out_dir)
        for probe in probes:
            m = probe.attention_mask.bool()
            out = model(probe.input_ids, probe.attention_mask, output_hidden_states=True)
            for i, h in enumerate(out["hidden_states"]):
                yield Activation("embeddings" if i == 0 else f"layer.{i - 1}", h.float(), mask=m)
            yield Activation("logits", out["logits"].float(), "logits", m)


def write_fairseq_tokenizer(dict_txt: Path, out_dir: Path, vocab_size: int) -> None:
    """tokenizer.json for a fairseq Dictionary: <s> <pad> </s> <unk>, then dict.txt's words in order (whitespace
    split, as fairseq-preprocess tokenized), extended with ``madeupwordNNNN`` fillers up to the embedding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<s>", "<pad>", "</s>", "<unk>"]
    try:
        lines = dict_txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(dict_txt, "not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        word = line.rstrip().rsplit(" ", 1)[0] if " " in line.strip() else line.strip()
        if word in words:
            raise ConfigError(dict_txt, f"line {n}: duplicate word {word!r}")
        words.append(word)
    if len(words) > vocab_size:
        raise ConfigError(dict_txt, f"{len(words)} entries (with the 4 specials) for an embedding of {vocab_size} rows")
    words += [f"madeupword{i:04d}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>"}, indent=2) + "\n")
