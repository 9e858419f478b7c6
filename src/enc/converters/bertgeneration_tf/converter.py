"""BertGeneration TF-Hub modules (google/bertseq2seq: bert24_en_de, roberta24_bbc, ...) -> transformers'
EncoderDecoderModel (BertGenerationEncoder + BertGenerationDecoder), or one half with ``part``.

Input: the module directory (``tfhub_module.pb``, ``saved_model.pb``, ``variables/variables.*``,
``assets/*.model``). The variables are read with enc's own TF bundle reader: no TensorFlow.
A hub module carries no JSON config, so the geometry comes from the tensor shapes; what shapes
cannot tell (attention heads, the GELU form) has an option and a warning.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from enc.converters.base import Activation, Converter, Plan, Probe
from enc.converters.bertgeneration_tf.reference import TF_ACT, tf_decoder, tf_encoder
from enc.converters.bertgeneration_tf.tables import CROSS, DROP, EMBEDDINGS, HALVES, LAYER, LM_BIAS
from enc.errors import ConfigError, EncError, FormatError, MappingError, MissingFile, UsageError
from enc.io.generated import zeros
from enc.io.lazy import LazyTensor
from enc.io.tf_checkpoint import TFCheckpoint

WORD = "embeddings/word_embeddings"
_SELF_Q = re.compile(r"^(encoder|decoder)/layer_(\d+)/attention/self/query/kernel$")
_SELF_ANY = re.compile(r"(^|/)(encoder|decoder)/layer_\d+/attention/self/query/kernel$")
_CROSS_Q = re.compile(r"^decoder/layer_(\d+)/attention/encdec/query/kernel$")
_FOREIGN = ("albert_config.json", "bert_config.json")
# names of other BERT-family checkpoints (ALBERT groups, MobileBERT bottlenecks, BERT heads / token types)
_NOT_OURS = re.compile(r"transformer/group_|bottleneck|FakeLayerNorm|token_type_embeddings|(^|/)cls/|/pooler/")
PARTS = ("encoder", "decoder")
SAMPLES = ("the encoder reads the sentence", "a sequence to sequence model writes another one",
           "the cat sat on the mat")


@dataclass
class Seq2SeqProbe(Probe):
    decoder_input_ids: torch.Tensor | None = None


def _is_module_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "tfhub_module.pb").is_file() or (path / "variables").is_dir())


def _foreign_config(path: Path) -> bool:
    return any((d / n).is_file() for d in (path, path / "assets") for n in _FOREIGN)


class BertGenerationTFConverter(Converter):
    name = "bertgeneration_tf"
    description = "BertGeneration (bert2bert / roberta2roberta) TF-Hub module of google/bertseq2seq"
    accepts = {"tokenizer": "the sentencepiece model to use instead of the module's assets",
               "num_heads": "attention heads (default hidden/64, as the released modules)",
               "hidden_act": "gelu_new (TF's tanh GELU, default) or gelu (erf)",
               "part": "encoder or decoder: one half alone",
               "decoder_start_token_id": "the decoder's start token id (default: <s>)"}

    # ------------------------------------------------------------------ detection / opening
    @classmethod
    def detect(cls, path: Path) -> bool:
        path = Path(path)
        if not _is_module_dir(path) or _foreign_config(path):
            return False
        if not (path / "variables" / "variables.index").is_file():
            return (path / "tfhub_module.pb").is_file()  # a hub module missing its variables: say so on open
        try:
            keys = TFCheckpoint(path / "variables" / "variables").keys()
        except EncError:
            return (path / "tfhub_module.pb").is_file()
        return any(_SELF_ANY.search(k) for k in keys) and any(k.endswith(WORD) for k in keys) and \
            not any(_NOT_OURS.search(k) for k in keys)

    def __init__(self, path, options=None):
        super().__init__(path, options)
        root = self.path
        if not root.is_dir():
            raise FormatError(root, "a BertGeneration TF-Hub module is a directory (tfhub_module.pb, variables/, assets/)")
        if not (root / "variables" / "variables.index").is_file():
            raise MissingFile(root / "variables", "TF-Hub module without variables/variables.index")
        self.root = root
        self.ckpt = TFCheckpoint(root / "variables" / "variables")
        self.warnings: list[str] = []
        ov = self.options.overrides
        self.part = ov.get("part")
        if self.part is not None and self.part not in PARTS:
            raise UsageError(None, f"--part must be encoder or decoder, got {self.part!r}")
        self._source: dict[str, LazyTensor] | None = None
        keys = self.ckpt.keys()
        words = [k for k in keys if k.endswith(WORD) and (k == WORD or k.endswith("/" + WORD))]
        if len(words) != 1:
            raise FormatError(self.ckpt.index_path, "not a bertseq2seq module: no single .../embeddings/word_embeddings "
                                                    f"variable (found {len(words)})")
        self.prefix = words[0][: -len(WORD)]
        self.rel = {k[len(self.prefix):]: k for k in keys if k.startswith(self.prefix) and DROP.reason(k) is None}
        self._layout()
        self.spm_path = self._find_spm()
        self.dims = self._dims()
        self.act = self._activation()

    def _layout(self) -> None:
        stacks: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
        cross: set[int] = set()
        for k in self.rel:
            m = _SELF_Q.match(k)
            if m:
                stacks[m.group(1)].add(int(m.group(2)))
            m = _CROSS_Q.match(k)
            if m:
                cross.add(int(m.group(1)))
        path = self.ckpt.index_path
        if stacks["encoder"] and stacks["decoder"]:
            self.layout, self.stack = "separate", "encoder"
        elif stacks["encoder"] or stacks["decoder"]:
            self.layout, self.stack = "shared", ("encoder" if stacks["encoder"] else "decoder")
        else:
            raise FormatError(path, "not a bertseq2seq module: no encoder/ or decoder/ layer_N/attention/self variables")
        n = len(stacks[self.stack])
        if stacks[self.stack] != set(range(n)):
            raise FormatError(path, f"{self.stack}/ layers are not numbered 0..{n - 1}: {sorted(stacks[self.stack])}")
        if self.layout == "separate" and stacks["decoder"] != stacks["encoder"]:
            raise FormatError(path, f"the encoder has {n} layers, the decoder {len(stacks['decoder'])}")
        self.n_layers = n
        needs_decoder = self.part != "encoder"
        if needs_decoder and cross != set(range(n)):
            if not cross:
                raise FormatError(path, "the module has no decoder (no decoder/layer_N/attention/encdec variables); "
                                        "convert it with --part encoder")
            raise FormatError(path, f"cross-attention (encdec) found for layers {sorted(cross)}, expected 0..{n - 1}")

    def _find_spm(self) -> Path:
        override = self.options.overrides.get("tokenizer")
        if override:
            p = Path(override)
            if not p.is_file():
                raise MissingFile(p, "tokenizer file not found")
            return p
        for d in (self.root / "assets", self.root):
            models = sorted(d.glob("*.model")) if d.is_dir() else []
            if len(models) == 1:
                return models[0]
            if len(models) > 1:
                raise FormatError(d, f"several sentencepiece models ({', '.join(m.name for m in models)}); "
                                     "pick one with --tokenizer")
        raise MissingFile(self.root / "assets", "no sentencepiece model (*.model) in assets/; pass --tokenizer FILE")

    def _shape(self, rel: str) -> tuple[int, ...]:
        if rel not in self.rel:
            raise FormatError(self.ckpt.index_path, f"variable {self.prefix}{rel} missing")
        return self.ckpt.shape(self.rel[rel])

    def _dims(self) -> dict:
        V, H = self._shape(WORD)
        P, H2 = self._shape("embeddings/position_embeddings")
        _, I = self._shape(f"{self.stack}/layer_0/intermediate/dense/kernel")  # noqa: E741
        if H2 != H:
            raise FormatError(self.ckpt.index_path, f"position embeddings are {H2} wide, word embeddings {H}")
        heads = self.options.overrides.get("num_heads")
        if heads is None:
            if H % 64:  # reported when a config is needed (convert, parity), not by inspect
                return {"V": V, "H": H, "P": P, "I": I, "L": self.n_layers, "N": None}
            heads = H // 64
            self.warnings.append(f"attention heads are not recorded in a hub module: using hidden/64 = {heads} "
                                 "(the bertseq2seq models' head size); pass --num-heads if this module differs")
        heads = int(heads)
        if heads <= 0 or H % heads:
            raise ConfigError(None, f"--num-heads {heads} does not divide the hidden size {H}")
        return {"V": V, "H": H, "P": P, "I": I, "L": self.n_layers, "N": heads}

    def _activation(self) -> str:
        act = self.options.overrides.get("hidden_act")
        if act is None:
            self.warnings.append("the GELU form is not recorded in a hub module: using TF BERT's tanh approximation "
                                 "(gelu_new); pass --hidden-act gelu for the erf form")
            return "gelu_new"
        if act not in TF_ACT:
            raise UsageError(None, f"--hidden-act must be one of {', '.join(TF_ACT)}, got {act!r}")
        return act

    # ------------------------------------------------------------------ config
    def special_ids(self) -> dict[str, int]:
        from enc.tokenization import load_sentencepiece

        sp = load_sentencepiece(self.spm_path)
        out, defaults = {}, {"<pad>": 0, "</s>": 1, "<s>": 2}
        for piece, default in defaults.items():
            i = sp.PieceToId(piece)
            if sp.IdToPiece(i) != piece:
                self.warnings.append(f"the sentencepiece model has no {piece}: using id {default}")
                i = default
            out[piece] = i
        if sp.GetPieceSize() > self.dims["V"]:
            raise ConfigError(self.spm_path, f"the sentencepiece model has {sp.GetPieceSize()} pieces, the embeddings "
                                             f"only {self.dims['V']} rows")
        return {"pad": out["<pad>"], "eos": out["</s>"], "bos": out["<s>"]}

    def _need_heads(self) -> None:
        if self.dims["N"] is None:
            raise ConfigError(None, f"hidden size {self.dims['H']} is not a multiple of 64: the module does not record "
                                    "its attention heads; pass --num-heads")

    def _half_config(self, decoder: bool) -> dict:
        self._need_heads()
        d, ids = self.dims, self.special_ids()
        return {
            "architectures": ["BertGenerationDecoder" if decoder else "BertGenerationEncoder"],
            "model_type": "bert-generation",
            "vocab_size": d["V"], "hidden_size": d["H"], "num_hidden_layers": d["L"], "num_attention_heads": d["N"],
            "intermediate_size": d["I"], "hidden_act": self.act, "max_position_embeddings": d["P"],
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
            "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "use_cache": True,
            "pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "is_decoder": decoder, "add_cross_attention": decoder, "tie_word_embeddings": True,
        }

    def decoder_start_id(self) -> int:
        start = self.options.overrides.get("decoder_start_token_id")
        return int(start) if start is not None else self.special_ids()["bos"]

    def hf_config(self) -> dict:
        if self.part == "encoder":
            return self._half_config(False)
        if self.part == "decoder":
            return self._half_config(True)
        ids = self.special_ids()
        return {
            "architectures": ["EncoderDecoderModel"], "model_type": "encoder-decoder", "is_encoder_decoder": True,
            "encoder": self._half_config(False), "decoder": self._half_config(True),
            "decoder_start_token_id": self.decoder_start_id(), "pad_token_id": ids["pad"],
            "tie_encoder_decoder": self.layout == "shared",
        }

    # ------------------------------------------------------------------ tensors
    def source_tensors(self) -> dict[str, LazyTensor]:
        if self._source is None:
            self._source = self.ckpt.lazy_tensors()
        return self._source

    def source_files(self) -> list[Path]:
        return [*self.ckpt.files, self.spm_path]

    def expected_keys(self) -> set[str]:
        from enc.models.bert_generation_keys import expected_shapes, tied  # torch-free, tested equal

        cfg = self.hf_config()
        return set(expected_shapes(cfg)) - tied(cfg)

    def _halves(self) -> list[tuple[str, list[tuple[str, object]]]]:
        out = []
        for half in ([self.part] if self.part else PARTS):
            prefix, sources = HALVES[self.layout][half]
            if self.part:
                prefix = "" if half == "encoder" else "bert."
            out.append((prefix, [(scope.format(stack=self.stack), table) for scope, table in sources]))
        return out

    def plan(self) -> Plan:
        src = self.source_tensors()
        tensors: dict[str, LazyTensor] = {}
        used: set[str] = set()
        for prefix, sources in self._halves():
            for scope, table in sources:
                for rel, key in self.rel.items():
                    if not rel.startswith(scope):
                        continue
                    hit = table.lookup(rel[len(scope):])
                    if hit is None:
                        continue
                    hf, tr = hit
                    tensors[prefix + hf] = tr(src[key])
                    used.add(rel)
        unknown = sorted(self.prefix + r for r in self.rel if r not in used and not self._other_half(r))
        unknown += sorted(k for k in src if not k.startswith(self.prefix) and DROP.reason(k) is None)
        if unknown:
            raise MappingError(self.ckpt.index_path, f"{len(unknown)} unknown variable(s) no rule maps: "
                                                     f"{', '.join(unknown[:6])}" + (" ..." if len(unknown) > 6 else ""))
        dropped = {k: DROP.reason(k) for k in src if DROP.reason(k) is not None}
        for r in self.rel:
            if r not in used:
                dropped[self.prefix + r] = f"the {'decoder' if self.part == 'encoder' else 'encoder'} (--part {self.part})"
        if self.part != "encoder":
            word = tensors[("decoder.bert." if not self.part else "bert.") + "embeddings.word_embeddings.weight"]
            V = self.dims["V"]
            # torch.zeros on the torch path, numpy's zero bytes on the byte path (enc.io.generated)
            pre = f"{word.recipe}|" if word.recipe else ""
            tensors[("decoder." if not self.part else "") + LM_BIAS] = zeros((V,), word.dtype,
                                                                             pre + "zeros (the module has no LM bias)")
        expected = self._expected_shapes()
        for k, t in tensors.items():
            if k in expected and tuple(t.shape) != expected[k]:
                raise FormatError(self.ckpt.index_path, f"{', '.join(t.sources) or k} has shape {list(t.shape)}, "
                                                        f"expected {list(expected[k])}")
        return Plan(tensors, dropped)

    def _other_half(self, rel: str) -> bool:
        """A variable of the half ``part`` leaves out (dropped, not unknown)."""
        if self.part is None:
            return False
        for scope, table in HALVES[self.layout]["decoder" if self.part == "encoder" else "encoder"][1]:
            scope = scope.format(stack=self.stack)
            if rel.startswith(scope) and table.lookup(rel[len(scope):]) is not None:
                return True
        return False

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        from enc.models.bert_generation_keys import expected_shapes  # torch-free, tested equal

        return expected_shapes(self.hf_config())

    def summary(self) -> dict:
        return {"layout": self.layout, "stack": self.stack, "variable_prefix": self.prefix, "dims": self.dims,
                "hidden_act": self.act, "part": self.part or "encoder+decoder", "checkpoint": str(self.ckpt.prefix),
                "vocabulary": str(self.spm_path), "warnings": self.warnings}

    # ------------------------------------------------------------------ tokenizer / generation files
    def write_extra_files(self, out_dir: Path) -> list[str]:
        shutil.copyfile(self.spm_path, out_dir / "spiece.model")
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                    "sep_token": "<::::>"}
        tok_cfg = {"tokenizer_class": "BertGenerationTokenizer", "model_max_length": self.dims["P"], **specials}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        if self.part != "encoder":
            ids = self.special_ids()
            gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
            if self.part is None:
                gen = {"decoder_start_token_id": self.decoder_start_id(), **gen}
            (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        return list(dict.fromkeys(self.warnings))

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[Seq2SeqProbe]:
        from enc.tokenization import load_sentencepiece

        self._need_heads()
        sp = load_sentencepiece(self.spm_path)
        d, ids = self.dims, self.special_ids()
        g = torch.Generator().manual_seed(0)
        texts = [sp.encode(t)[: d["P"] - 1] + [ids["eos"]] for t in SAMPLES]
        texts.append(torch.randint(0, d["V"], (min(12, d["P"]),), generator=g).tolist())
        S = max(len(t) for t in texts)
        enc = torch.full((len(texts), S), ids["pad"], dtype=torch.long)
        mask = torch.zeros((len(texts), S), dtype=torch.long)
        for r, t in enumerate(texts):
            enc[r, :len(t)] = torch.tensor(t)
            mask[r, :len(t)] = 1
        T = min(7, d["P"])
        dec = torch.randint(0, d["V"], (len(texts), T), generator=g)
        dec[:, 0] = self.decoder_start_id()
        return [Seq2SeqProbe(enc, mask, name="seq2seq", decoder_input_ids=dec)]

    def _memory(self, probe: Seq2SeqProbe) -> torch.Tensor:
        return stand_in_memory(probe, self.dims["H"])

    def reference_activations(self, probes: Sequence[Seq2SeqProbe]) -> Iterator[Activation]:
        src, cache = self.source_tensors(), {}

        def var(rel: str) -> torch.Tensor:
            if rel not in cache:
                cache[rel] = src[self.prefix + rel].load().float()
            return cache[rel]

        for p in probes:
            memory = [self._memory(p)] if self.part == "decoder" else []
            if self.part != "decoder":
                yield from tf_encoder(var, self.dims, self.act, self.stack, p.input_ids, p.attention_mask, memory)
            if self.part != "encoder":
                dec_stack = "decoder" if self.layout == "separate" else self.stack
                yield from tf_decoder(var, self.dims, self.act, dec_stack, p.decoder_input_ids, memory[-1],
                                      p.attention_mask)

    def verify_context(self) -> dict:
        """What :meth:`output_activations` needs besides the output directory (kept in the golden record)."""
        return {"part": self.part, "hidden": self.dims["H"]}

    def converted_activations(self, out_dir: Path, probes: Sequence[Seq2SeqProbe]) -> Iterator[Activation]:
        return self.output_activations(Path(out_dir), probes, self.verify_context())

    @classmethod
    def output_activations(cls, out_dir: Path, probes: Sequence[Seq2SeqProbe], context: dict,
                           device: str = "cpu") -> Iterator[Activation]:
        """enc's model on the converted directory (parity and ``enc verify``), the reference's names."""
        from enc.models.bert_generation import EncoderDecoderModel, from_pretrained

        part = context.get("part")
        model = from_pretrained(out_dir, device=device)
        dtype = next(model.parameters()).dtype
        if isinstance(model, EncoderDecoderModel):
            enc, dec = model.encoder, model.decoder
        else:
            enc, dec = (model, None) if part == "encoder" else (None, model)
        for p in probes:
            valid = p.attention_mask.bool()
            if enc is not None:
                out = enc(p.input_ids, p.attention_mask, output_hidden_states=True)
                hs = out["hidden_states"]
                yield Activation("encoder.embeddings", hs[0].float(), mask=valid)
                for i, h in enumerate(hs[1:]):
                    yield Activation(f"encoder.layer.{i}", h.float(), mask=valid)
                memory = out["last_hidden_state"]
            else:
                memory = stand_in_memory(p, int(context["hidden"])).to(device, dtype)
            if dec is not None:
                out = dec(p.decoder_input_ids, output_hidden_states=True, memory=memory, memory_mask=p.attention_mask)
                hs = out["hidden_states"]
                yield Activation("decoder.embeddings", hs[0].float())
                for i, h in enumerate(hs[1:]):
                    yield Activation(f"decoder.layer.{i}", h.float())
                yield Activation("logits", out["logits"].float(), "logits")

    @classmethod
    def transformers_activations(cls, out_dir: Path, probes: Sequence[Seq2SeqProbe], context: dict,
                                 device: str = "cpu") -> Iterator[Activation]:
        """The same names from transformers (EncoderDecoderModel, or BertGenerationEncoder/Decoder for --part)."""
        from enc.verify import load_transformers_model

        part = context.get("part")
        auto = {"encoder": "BertGenerationEncoder", "decoder": "BertGenerationDecoder"}.get(part, "EncoderDecoderModel")
        model = load_transformers_model(out_dir, auto, device)
        dtype = next(model.parameters()).dtype
        for p in probes:
            valid = p.attention_mask.bool()
            if part is None:
                out = model(input_ids=p.input_ids, attention_mask=p.attention_mask,
                            decoder_input_ids=p.decoder_input_ids, output_hidden_states=True)
                enc_hs, dec_hs = out.encoder_hidden_states, out.decoder_hidden_states
            elif part == "encoder":
                out = model(input_ids=p.input_ids, attention_mask=p.attention_mask, output_hidden_states=True)
                enc_hs, dec_hs = out.hidden_states, None
            else:
                memory = stand_in_memory(p, int(context["hidden"])).to(device, dtype)
                out = model(input_ids=p.decoder_input_ids, encoder_hidden_states=memory,
                            encoder_attention_mask=p.attention_mask, output_hidden_states=True)
                enc_hs, dec_hs = None, out.hidden_states
            if enc_hs is not None:
                yield Activation("encoder.embeddings", enc_hs[0].float(), mask=valid)
                for i, h in enumerate(enc_hs[1:]):
                    yield Activation(f"encoder.layer.{i}", h.float(), mask=valid)
            if dec_hs is not None:
                yield Activation("decoder.embeddings", dec_hs[0].float())
                for i, h in enumerate(dec_hs[1:]):
                    yield Activation(f"decoder.layer.{i}", h.float())
                yield Activation("logits", out.logits.float(), "logits")


def stand_in_memory(probe: Seq2SeqProbe, hidden: int) -> torch.Tensor:
    """A fixed stand-in encoder output for --part decoder (the decoder alone is checked over it)."""
    g = torch.Generator().manual_seed(1)
    B, S = probe.input_ids.shape
    return torch.randn(B, S, hidden, generator=g)


__all__ = ["BertGenerationTFConverter", "CROSS", "EMBEDDINGS", "LAYER"]
