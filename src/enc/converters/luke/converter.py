"""studio-ousia LUKE / mLUKE checkpoints -> Hugging Face ``LukeForMaskedLM`` (with the entity prediction head).

Inputs: a LUKE release (``pytorch_model.bin`` + ``metadata.json`` + ``entity_vocab.tsv``, as a directory
or the .tar.gz) or an mLUKE / new-style pretraining run (DeepSpeed ``mp_rank_00_model_states.pt``,
weights under ``["module"]``, + ``metadata.json`` + ``entity_vocab.jsonl``); see :mod:`.checkpoint`.

Recipe (transformers' convert_luke / convert_mluke scripts and studio-ousia's
``convert_luke_to_huggingface_model.py``, read, not run):

- the table in :mod:`.tables`; the encoder under ``luke.``; tied copies dropped by name;
- word rows for ``<ent>``/``<ent2>`` appended to the word embeddings, the LM decoder and its bias, as
  copies of the rows of "@" and "#" (found with the word tokenizer; without one, no rows are added and
  a warning says so);
- entity-aware attention on (``use_entity_aware_attention: true``), its three extra query matrices
  copies of ``query`` unless the checkpoint has its own (``--set entity_aware_attention=false`` writes
  plain attention, for a checkpoint without them);
- ``[MASK2]``: the ``[MASK]`` row of the entity table and of the entity bias, in place when the
  vocabulary has ``[MASK2]`` (LUKE's TSV), appended otherwise (mLUKE);
- ``entity_vocab.json`` in transformers' form (mLUKE: ``lang:title`` keys sharing ids);
- ``--no-entity-embeddings`` (``--set no_entity_embeddings=true``): the "lite" variant, entity
  vocabulary reduced to [MASK], [UNK], [PAD], [MASK2] (studio-ousia's remove_entity_embeddings).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from enc.converters.base import Activation, Converter, KeyTable, Plan, Transform, apply_table, copy
from enc.converters.luke import tables as T
from enc.converters.luke.checkpoint import LukeFiles, looks_like_luke, rows_appended
from enc.converters.luke.reference import LukeProbe, RefSpec, luke_forward
from enc.errors import ConfigError, FormatError, MappingError, UsageError
from enc.io.lazy import LazyTensor

SET_KEYS = {
    "no_entity_embeddings": "write the lite variant: only the [MASK] [UNK] [PAD] [MASK2] entities",
    "entity_aware_attention": "true (default) or false: use_entity_aware_attention in config.json",
    "metadata": "path of metadata.json, when it is not beside the checkpoint",
    "entity_vocab": "path of entity_vocab.tsv / entity_vocab.jsonl, when it is not beside the checkpoint",
    "max_mention_length": "tokenizer_config max_mention_length (default: metadata.json's, else 30)",
}
FLAG_KEYS = {"vocab", "merges", "tokenizer"}
LITE_ENTITIES = ("[MASK]", "[UNK]", "[PAD]", "[MASK2]")
T_ENT = ("<ent>", "<ent2>")


def _pattern(hf_key: str) -> str:
    """A layer key's table pattern: the first ".N." becomes ".{}."."""
    return re.sub(r"\.\d+\.", ".{}.", hf_key, count=1)


def _truthy(v) -> bool:
    return v is True or str(v).lower() in ("1", "true", "yes", "on")


class LukeConverter(Converter):
    name = "luke"
    accepts = {"vocab": "RoBERTa vocab.json (LUKE)", "merges": "RoBERTa merges.txt (LUKE)",
               "tokenizer": "XLM-R sentencepiece.bpe.model (mLUKE)", **SET_KEYS}
    description = "studio-ousia LUKE / mLUKE (pytorch_model.bin or DeepSpeed mp_rank_00_model_states.pt + metadata.json + entity vocab)"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return looks_like_luke(Path(path))

    def __init__(self, path, options=None):
        super().__init__(path, options)
        ov = self.options.overrides
        unknown = sorted(set(ov) - FLAG_KEYS - set(SET_KEYS))
        if unknown:
            raise UsageError(None, f"{', '.join(unknown)} does not apply to LUKE checkpoints "
                                   f"(--set keys: {', '.join(SET_KEYS)})")
        self.files = LukeFiles(self.path, ov.get("metadata"), ov.get("entity_vocab"))
        try:
            self._setup()
        except BaseException:
            self.files.close()
            raise

    def close(self) -> None:
        self.files.close()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        ov = self.options.overrides
        self.warnings: list[str] = []
        self.cfg = c = self.files.model_config
        self.stored = self.files.tensors()
        where = self.files.metadata_path
        name = str(c.get("bert_model_name") or "")
        if any(k.startswith(T.BERT_HEADS) for k in self.stored) or "roberta" not in name:
            raise FormatError(self.files.checkpoint, f"a BERT-based LUKE (bert_model_name {name!r}); transformers' "
                              "LUKE has RoBERTa embeddings and heads, so enc converts RoBERTa / XLM-R based models only")
        self.multilingual = "xlm-roberta" in name
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                    "entity_vocab_size", "max_position_embeddings"):
            if not isinstance(c.get(key), int) or c[key] <= 0:
                raise ConfigError(where, f"model_config.{key} is missing or not a positive integer")
        self.hidden, self.vocab = c["hidden_size"], c["vocab_size"]
        self.emb = int(c.get("entity_emb_size") or self.hidden)
        if self.hidden % c["num_attention_heads"]:
            raise ConfigError(where, f"hidden_size {self.hidden} is not a multiple of num_attention_heads")
        self._check_shape("embeddings.word_embeddings.weight", (self.vocab, self.hidden))
        self._check_shape("entity_embeddings.entity_embeddings.weight", (c["entity_vocab_size"], self.emb))
        ev = self.files.entity_vocab
        rows = self.stored["entity_embeddings.entity_embeddings.weight"].shape[0]
        if ev.size != rows:
            raise ConfigError(ev.path, f"the entity vocabulary has {ev.size} entities but the checkpoint's entity "
                                       f"embeddings have {rows} rows: wrong entity vocabulary for this model")
        layers = {int(k.split(".")[2]) for k in self.stored if k.startswith("encoder.layer.")}
        if layers != set(range(c["num_hidden_layers"])):
            raise ConfigError(where, f"model_config says {c['num_hidden_layers']} layers, the checkpoint has "
                                     f"{len(layers)}")
        self.own_aware = any(".w2e_query." in k for k in self.stored)
        self.aware = _truthy(ov.get("entity_aware_attention", True))
        if self.own_aware and not self.aware:
            raise UsageError(None, "this checkpoint was trained with entity-aware attention (it has w2e/e2w/e2e "
                                   "queries): entity_aware_attention=false would drop them")
        self.lite = _truthy(ov.get("no_entity_embeddings", False))
        self._read_word_tokenizer()
        self._entity_plan()

    def _check_shape(self, key: str, shape: tuple[int, ...]) -> None:
        if key not in self.stored:
            raise MappingError(self.files.checkpoint, f"the checkpoint has no {key}")
        got = tuple(self.stored[key].shape)
        if got != shape:
            raise ConfigError(self.files.metadata_path, f"model_config implies {key} of shape {list(shape)}, the "
                                                        f"checkpoint has {list(got)}")

    def _read_word_tokenizer(self) -> None:
        from enc.tokenization_luke import word_tokenizer

        ov = self.options.overrides
        self.vocab_file = self.merges_file = self.spm_file = None
        if self.multilingual:
            if ov.get("vocab") or ov.get("merges"):
                raise UsageError(None, "mLUKE uses XLM-R's sentencepiece model: pass it with --tokenizer, not --vocab")
            self.spm_file = Path(ov["tokenizer"]) if ov.get("tokenizer") else self.files.find("sentencepiece.bpe.model")
        else:
            if ov.get("tokenizer"):
                raise UsageError(None, "LUKE uses RoBERTa's BPE: pass --vocab vocab.json --merges merges.txt")
            self.vocab_file = Path(ov["vocab"]) if ov.get("vocab") else self.files.find("vocab.json")
            self.merges_file = Path(ov["merges"]) if ov.get("merges") else self.files.find("merges.txt")
            if (self.vocab_file is None) != (self.merges_file is None):
                raise UsageError(None, "RoBERTa's BPE needs both vocab.json and merges.txt")
        self.words = None
        self.ent_init: list[int] = []
        if self.spm_file is None and self.vocab_file is None:
            need = "sentencepiece.bpe.model (--tokenizer)" if self.multilingual else \
                "vocab.json and merges.txt (--vocab/--merges)"
            self.warnings.append(f"no word tokenizer ({need}): weights converted without one, and without the "
                                 "<ent>/<ent2> word rows (initialised from '@' and '#', which need it)")
            return
        self.words = word_tokenizer(self.vocab_file, self.merges_file, self.spm_file)
        src = self.spm_file or self.vocab_file
        if self.words.size != self.vocab:
            raise ConfigError(src, f"the word tokenizer has {self.words.size} tokens but the checkpoint's word "
                                   f"embeddings have {self.vocab} rows: wrong tokenizer for this model")
        for ch in ("@", "#"):
            i = self.words.token_to_id(ch)
            if i is None or i >= self.vocab:
                raise ConfigError(src, f"the word vocabulary has no {ch!r} token (the <ent>/<ent2> rows copy it)")
            self.ent_init.append(i)

    def _entity_plan(self) -> None:
        """Output entity vocabulary and which original row each output row copies."""
        ev = self.files.entity_vocab
        specials = dict(ev.specials)
        mask = specials["[MASK]"]
        rows = torch.arange(ev.size)  # output row -> original row
        if "[MASK2]" in specials:
            self.mask2_mode = "in place"
            rows[specials["[MASK2]"]] = mask
        else:
            self.mask2_mode = "appended"
            specials["[MASK2]"] = ev.size
            rows = torch.cat([rows, torch.tensor([mask])])
        if self.lite:
            rows = rows[[specials[t] for t in LITE_ENTITIES]]
            specials = {t: i for i, t in enumerate(LITE_ENTITIES)}
        self.entity_specials = specials
        self.entity_rows = rows

    @property
    def entity_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Entity-logit columns that must agree: (output ids, original ids), every entity but [MASK2]."""
        new = torch.arange(len(self.entity_rows))
        keep = new != self.entity_specials["[MASK2]"]
        return new[keep], self.entity_rows[keep]

    def entity_blocks(self) -> Iterator[list[tuple[str, int]]]:
        """The output entity_vocab.json as blocks of (key, id), streamed from the source file."""
        if self.lite:
            yield list(self.entity_specials.items())
            return
        yield from self.files.entity_vocab.blocks()
        if self.mask2_mode == "appended":
            yield [("[MASK2]", self.entity_specials["[MASK2]"])]

    # ------------------------------------------------------------------ config
    def hf_config(self) -> dict:
        c = self.cfg
        return {
            "architectures": ["LukeForMaskedLM"], "model_type": "luke",
            "vocab_size": self.vocab + len(self.ent_init), "entity_vocab_size": len(self.entity_rows),
            "hidden_size": self.hidden, "entity_emb_size": self.emb, "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": c["num_attention_heads"], "intermediate_size": c["intermediate_size"],
            "hidden_act": c.get("hidden_act", "gelu"), "hidden_dropout_prob": c.get("hidden_dropout_prob", 0.1),
            "attention_probs_dropout_prob": c.get("attention_probs_dropout_prob", 0.1),
            "max_position_embeddings": c["max_position_embeddings"], "type_vocab_size": c.get("type_vocab_size", 2),
            "initializer_range": c.get("initializer_range", 0.02), "layer_norm_eps": c.get("layer_norm_eps", 1e-12),
            "use_entity_aware_attention": self.aware, "classifier_dropout": None,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "tie_word_embeddings": True,
        }

    def expected_keys(self) -> set[str]:
        from enc.models.luke import LukeConfig, expected_keys

        return expected_keys(LukeConfig.from_dict(self.hf_config()))

    # ------------------------------------------------------------------ tensors
    def source_tensors(self) -> dict[str, LazyTensor]:
        out = {k: st.lazy(k) for k, st in self.stored.items()}
        out.update({k: st.lazy(k) for k, st in self.files.training_tensors().items()})
        return out

    def source_files(self) -> list[Path]:
        return self.files.files() + [p for p in (self.vocab_file, self.merges_file, self.spm_file) if p]

    def _transforms(self) -> dict[str, dict[str, Transform]]:
        """Per source key: the bound transform for the table's "words" / "entities" names."""
        out: dict[str, dict[str, Transform]] = {}
        if self.ent_init:
            extra = self.ent_init
            out["words"] = {"": Transform(f"append rows of '@','#' ({extra[0]},{extra[1]}) as <ent>,<ent2>",
                                          lambda t: torch.cat([t, t[extra]]),
                                          lambda s: (s[0] + len(extra), *s[1:]))}
        rows = self.entity_rows
        if self.lite:
            name = "keep entity rows [MASK],[UNK],[PAD],[MASK2]=[MASK] (lite)"
        elif self.mask2_mode == "in place":
            name = "[MASK2] row = [MASK] row"
        else:
            name = "append [MASK2] row = [MASK] row"
        if self.mask2_mode == "in place" and not self.lite:
            m2 = self.entity_specials["[MASK2]"]
            m = int(rows[m2])

            def in_place(t: torch.Tensor) -> torch.Tensor:
                t = t.clone() if not t.is_contiguous() else t
                t[m2] = t[m]
                return t

            out["entities"] = {"": Transform(name, in_place)}
        else:
            out["entities"] = {"": Transform(name, lambda t: t[rows].contiguous(),
                                             lambda s: (len(rows), *s[1:]))}
        return out

    def _bound(self, kind: str, key: str, lazy: LazyTensor) -> LazyTensor:
        if kind == "copy":
            return lazy
        if kind == "words" and not self.ent_init:
            return lazy
        st = self.stored.get(key)
        big = st is not None  # a stored tensor: read straight into the enlarged buffer, one copy in memory
        if kind == "words" and big:
            return rows_appended(st, key, self.ent_init, self._transforms()["words"][""].name)
        if kind == "entities" and self.mask2_mode == "appended" and not self.lite and big:
            return rows_appended(st, key, [int(self.entity_rows[-1])], "append [MASK2] row = [MASK] row")
        return self._transforms()[kind][""](lazy)

    def plan(self) -> Plan:
        source = {k: st.lazy(k) for k, st in self.stored.items()}
        kinds = {hf: kind for hf, kind in T.TABLE.values()}
        table = KeyTable({src: (hf, copy) for src, (hf, _kind) in T.TABLE.items()})
        base = apply_table(source, table, T.DROP, self.files.checkpoint)
        tensors: dict[str, LazyTensor] = {}
        for hf, lazy in base.tensors.items():
            kind = kinds.get(hf) or kinds.get(_pattern(hf), "copy")
            tensors[hf] = self._bound(kind, lazy.sources[0], lazy)
        if "lm_head.decoder.weight" not in tensors and "embeddings.word_embeddings.weight" in source:
            tensors["lm_head.decoder.weight"] = self._bound("words", "embeddings.word_embeddings.weight",
                                                            source["embeddings.word_embeddings.weight"])
        if self.aware and not self.own_aware:
            for i in range(self.cfg["num_hidden_layers"]):
                for hf_pat, src_pat in T.QUERY_COPIES.items():
                    for part in ("weight", "bias"):
                        src = src_pat.format(i, part)
                        tensors[hf_pat.format(i, part)] = source[src].apply(lambda t: t, name="copy of query "
                                                                            "(entity-aware attention init)")
        dropped = dict(base.dropped)
        dropped.update({k: T.TRAINING_STATE for k in self.files.training_tensors()})
        notes = [f"{'mLUKE' if self.multilingual else 'LUKE'} ({'DeepSpeed' if self.files.deepspeed else 'plain'} "
                 f"checkpoint), [MASK2] {self.mask2_mode}, entity-aware attention "
                 f"{'own' if self.own_aware else 'copied from query' if self.aware else 'off'}"
                 + (", lite" if self.lite else "")]
        return Plan(tensors, dropped, notes)

    def summary(self) -> dict:
        return {"model": "mLUKE" if self.multilingual else "LUKE", "checkpoint": str(self.files.checkpoint),
                "deepspeed": self.files.deepspeed, "metadata": str(self.files.metadata_path),
                "entity_vocab": str(self.files.entity_vocab.path), "entities": self.files.entity_vocab.size,
                "model_config": self.cfg, "warnings": self.warnings}

    # ------------------------------------------------------------------ extra files
    def write_extra_files(self, out_dir: Path) -> list[str]:
        with open(out_dir / "entity_vocab.json", "w", encoding="utf-8") as f:  # streamed, a block at a time
            f.write("{")
            sep = ""
            for block in self.entity_blocks():
                if block:
                    f.write(sep + json.dumps(dict(block), ensure_ascii=False)[1:-1])
                    sep = ", "
            f.write("}\n")
        if self.words is None:
            return list(self.warnings)
        meta = self.files.metadata
        mention = int(self.options.overrides.get("max_mention_length", meta.get("max_mention_length", 30)))
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                    "pad_token": "<pad>", "cls_token": "<s>",
                    "mask_token": {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True},
                    "additional_special_tokens": list(T_ENT)}
        tok_cfg = {
            **specials,
            "tokenizer_class": "MLukeTokenizer" if self.multilingual else "LukeTokenizer",
            "model_max_length": self.cfg["max_position_embeddings"] - 2,
            "task": None, "max_entity_length": 32, "max_mention_length": mention,
            "entity_token_1": "<ent>", "entity_token_2": "<ent2>", "entity_unk_token": "[UNK]",
            "entity_pad_token": "[PAD]", "entity_mask_token": "[MASK]", "entity_mask2_token": "[MASK2]",
        }
        if self.multilingual:
            shutil.copyfile(self.spm_file, out_dir / "sentencepiece.bpe.model")
        else:
            tok_cfg.update({"add_prefix_space": False, "errors": "replace"})
            shutil.copyfile(self.vocab_file, out_dir / "vocab.json")
            shutil.copyfile(self.merges_file, out_dir / "merges.txt")
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        return list(self.warnings)

    # ------------------------------------------------------------------ parity
    def probes(self) -> list[LukeProbe]:
        g = torch.Generator().manual_seed(0)
        lengths = [min(n, self.cfg["max_position_embeddings"] - 2) for n in (24, 11, 6)]
        T_ = max(lengths)
        B = len(lengths)
        ids = torch.full((B, T_), 1, dtype=torch.long)
        mask = torch.zeros((B, T_), dtype=torch.long)
        for r, n in enumerate(lengths):
            row = torch.randint(3, self.vocab, (n,), generator=g)
            row[row == 1] = 4
            row[0], row[-1] = 0, 2
            ids[r, :n], mask[r, :n] = row, 1
        new_ids, orig_ids = self.entity_cols
        n_ent = [3, 2, 1]
        N, M = max(n_ent), 4
        eid = torch.zeros((B, N), dtype=torch.long)
        eid_new = torch.zeros((B, N), dtype=torch.long)
        epos = torch.full((B, N, M), -1, dtype=torch.long)
        emask = torch.zeros((B, N), dtype=torch.long)
        for r, (n, k) in enumerate(zip(lengths, n_ent)):
            for j in range(k):
                k = int(torch.randint(len(new_ids), (1,), generator=g))
                new, orig = int(new_ids[k]), int(orig_ids[k])
                eid[r, j], eid_new[r, j], emask[r, j] = orig, new, 1
                start = int(torch.randint(1, max(2, n - 1), (1,), generator=g))
                span = min(1 + j, M, max(1, n - 1 - start))
                epos[r, j, :span] = torch.arange(start, start + span)
        return [LukeProbe(ids, mask, None, name=f"batch{B}x{T_}+entities", entity_ids=eid,
                          converted_entity_ids=eid_new, entity_position_ids=epos, entity_attention_mask=emask)]

    def reference_activations(self, probes: Sequence[LukeProbe]) -> Iterator[Activation]:
        cache: dict[str, torch.Tensor] = {}

        def get(key: str) -> torch.Tensor:
            if key not in cache:
                cache[key] = self.stored[key].read().float()
            return cache[key]

        c = self.cfg
        spec = RefSpec(layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                       eps=float(c.get("layer_norm_eps", 1e-12)), act=str(c.get("hidden_act", "gelu")), pad_id=1,
                       entity_aware=self.own_aware, dense=self.emb != self.hidden)
        orig_cols = self.entity_cols[1]
        for probe in probes:
            for act in luke_forward(get, spec, probe):
                if act.name == "entity_logits":
                    act = Activation(act.name, act.tensor[..., orig_cols], act.kind, act.mask)
                yield act

    def converted_activations(self, out_dir: Path, probes: Sequence[LukeProbe]) -> Iterator[Activation]:
        from enc.models import load_model

        model = load_model(out_dir, head="mlm")
        n_ent = model.config.entity_vocab_size
        if n_ent != len(self.entity_rows):
            hint = " (a lite model: pass --no-entity-embeddings, as to convert)" if n_ent == len(LITE_ENTITIES) else ""
            raise ConfigError(out_dir / "config.json", f"the converted model has {n_ent} entities, this checkpoint "
                                                       f"converts to {len(self.entity_rows)}{hint}")
        if model.config.vocab_size < self.vocab:
            raise ConfigError(out_dir / "config.json", f"the converted model has {model.config.vocab_size} words, "
                                                       f"the checkpoint {self.vocab}")
        new_cols = self.entity_cols[0]
        for p in probes:
            luke = model.luke
            wm, em = p.attention_mask.bool(), p.entity_attention_mask.bool()
            T_ = p.input_ids.shape[1]
            w = luke.embeddings(p.input_ids, p.token_type_ids)
            yield Activation("embeddings", w.float(), mask=wm)
            e = luke.entity_embeddings(p.converted_entity_ids, p.entity_position_ids)
            yield Activation("entity_embeddings", e.float(), mask=em)
            x, bias, _ = luke.embed(p.input_ids, p.attention_mask, p.token_type_ids, p.converted_entity_ids,
                                    p.entity_position_ids, p.entity_attention_mask)
            for i, layer in enumerate(luke.encoder.layer):
                x = layer(x, bias, T_)
                yield Activation(f"layer.{i}", x[:, :T_].float(), mask=wm)
                yield Activation(f"entity_layer.{i}", x[:, T_:].float(), mask=em)
            yield Activation("mlm_logits", model.lm_head(x[:, :T_]).float()[..., : self.vocab], "logits", wm)
            yield Activation("entity_logits", model.entity_predictions(x[:, T_:]).float()[..., new_cols], "logits", em)
