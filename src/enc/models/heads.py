"""Task heads over enc's encoder runtimes, with transformers' parameter names.

``ForSequenceClassification`` and ``ForQuestionAnswering`` wrap a backbone (``AlbertModel`` as
``albert.*``, ``MegatronBertModel`` as ``bert.*``) and add ``classifier.*`` / ``qa_outputs.*``
exactly as ``AlbertForSequenceClassification``, ``AlbertForQuestionAnswering``,
``MegatronBertFor...`` and ``BertFor...`` do: classification reads the pooled output through
dropout; QA reads every token's hidden state (transformers builds its QA models without a pooler,
so ``*.pooler.*`` may be absent on load and is never saved).

``load_task_model`` loads a directory fine-tuned by transformers (or by enc), or, with
``new_head=True``, a base/pre-training checkpoint whose head is then freshly initialised as
transformers does (normal(0, initializer_range) weights, zero biases).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enc.errors import ConfigError, UsageError


@dataclass(frozen=True)
class Arch:
    module: str
    backbone: str
    config: str
    prefix: str                    # attribute / state-dict prefix of the backbone
    seq_cls: str                   # transformers class names written to config.json "architectures"
    qa: str
    other_heads: tuple[str, ...]   # pre-training heads dropped when a base checkpoint is loaded

    def load_classes(self) -> tuple[type, Any]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.backbone), getattr(mod, self.config)


ARCHS: dict[str, Arch] = {
    "albert": Arch("enc.models.albert", "AlbertModel", "AlbertConfig", "albert", "AlbertForSequenceClassification",
                   "AlbertForQuestionAnswering", ("predictions.", "sop_classifier.")),
    "megatron-bert": Arch("enc.models.megatron_bert", "MegatronBertModel", "MegatronBertConfig", "bert",
                          "MegatronBertForSequenceClassification", "MegatronBertForQuestionAnswering", ("cls.",)),
    "bert": Arch("enc.models.megatron_bert", "MegatronBertModel", "MegatronBertConfig", "bert",
                 "BertForSequenceClassification", "BertForQuestionAnswering", ("cls.",)),
    "mobilebert": Arch("enc.models.mobilebert", "MobileBertModel", "MobileBertConfig", "mobilebert",
                       "MobileBertForSequenceClassification", "MobileBertForQuestionAnswering", ("cls.",)),
}

KINDS = ("sequence-classification", "question-answering")


def _dropout_p(cfg: dict, model_type: str) -> float:
    if model_type == "albert":
        p = cfg.get("classifier_dropout_prob", 0.1)
    else:
        p = cfg.get("classifier_dropout")
        if p is None:
            p = cfg.get("hidden_dropout_prob", 0.1)
    return float(p or 0.0)


class _TaskModel(nn.Module):
    """A backbone registered under its transformers prefix (``albert`` / ``bert``)."""

    arch: Arch
    hf_config: dict

    def _init(self, arch: Arch, hf_config: dict, backbone: nn.Module) -> None:
        self.arch, self.hf_config = arch, hf_config
        self.add_module(arch.prefix, backbone)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.arch.prefix)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None) -> dict:
        return self.backbone(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class ForSequenceClassification(_TaskModel):
    kind = "sequence-classification"

    def __init__(self, arch: Arch, hf_config: dict, backbone: nn.Module, num_labels: int):
        super().__init__()
        self._init(arch, hf_config, backbone)
        self.num_labels = num_labels
        self.dropout = nn.Dropout(_dropout_p(hf_config, hf_config.get("model_type", "")))
        self.classifier = nn.Linear(hf_config["hidden_size"], num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        pooled = self.encode(input_ids, attention_mask, token_type_ids)["pooler_output"]
        return self.classifier(self.dropout(pooled))

    @property
    def head_keys(self) -> tuple[str, ...]:
        return ("classifier.",)


class ForQuestionAnswering(_TaskModel):
    kind = "question-answering"

    def __init__(self, arch: Arch, hf_config: dict, backbone: nn.Module):
        super().__init__()
        self._init(arch, hf_config, backbone)
        self.qa_outputs = nn.Linear(hf_config["hidden_size"], 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encode(input_ids, attention_mask, token_type_ids)["last_hidden_state"]
        start, end = self.qa_outputs(h).split(1, dim=-1)
        return start.squeeze(-1), end.squeeze(-1)

    @property
    def head_keys(self) -> tuple[str, ...]:
        return ("qa_outputs.",)


def _arch_for(cfg: dict, path: Path) -> Arch:
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise ConfigError(path / "config.json", f"model_type {mt!r} has no GLUE/SQuAD heads in enc "
                                                f"(supported: {', '.join(ARCHS)})")
    return ARCHS[mt]


def _init_linear(m: nn.Linear, std: float) -> None:
    with torch.no_grad():
        m.weight.normal_(0.0, std)
        m.bias.zero_()


def has_head(sd_keys: set[str], kind: str) -> bool:
    return ("classifier.weight" if kind == "sequence-classification" else "qa_outputs.weight") in sd_keys


def load_task_model(model_dir: str | Path, kind: str, num_labels: int | None = None, new_head: bool = False,
                    id2label: dict[int, str] | None = None, seed: int | None = None) -> _TaskModel:
    """Load ``model_dir`` with a ``kind`` head (see module docstring). Raises UsageError if the
    checkpoint has no such head and ``new_head`` is False."""
    from enc.models.common import ConfigDict
    from enc.models.loading import load_into, load_state_dict, read_config, strip_prefix

    path = Path(model_dir)
    cfg = read_config(path)
    arch = _arch_for(cfg, path)
    sd = load_state_dict(path)
    keys = set(sd)
    present = has_head(keys, kind)
    if not present and not new_head:
        what = "classification" if kind == "sequence-classification" else "question-answering"
        key = "classifier.*" if kind == "sequence-classification" else "qa_outputs.*"
        raise UsageError(path, f"model has no {what} head ({key} weights); pass --finetune to train one")
    backbone_cls, config_cls = arch.load_classes()
    if present and kind == "sequence-classification":
        n = int(sd["classifier.weight"].shape[0])
        if num_labels is not None and n != num_labels:
            if not new_head:
                raise UsageError(path, f"the classifier has {n} output(s), the task needs {num_labels}")
            present = False  # fine-tuning replaces a head of the wrong size
        else:
            num_labels = n
    cfg, path_of_cfg = ConfigDict(cfg), getattr(cfg, "path", None)
    cfg.path = path_of_cfg  # errors about it still name config.json
    if kind == "sequence-classification":
        num_labels = num_labels or int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
        if id2label is not None and not present:
            cfg["id2label"] = {str(i): v for i, v in id2label.items()}
            cfg["label2id"] = {v: i for i, v in id2label.items()}
    if seed is not None:
        torch.manual_seed(seed)
    # Built on the CPU (not meta): runtimes may hold non-persistent buffers that loading won't fill.
    kw = {}
    if kind == "question-answering" and "add_pooling_layer" in inspect.signature(backbone_cls).parameters:
        kw["add_pooling_layer"] = False  # as transformers builds its QA models
    backbone = backbone_cls(config_cls.from_dict(cfg), **kw)
    model: _TaskModel = (ForSequenceClassification(arch, cfg, backbone, num_labels or 2)
                         if kind == "sequence-classification" else ForQuestionAnswering(arch, cfg, backbone))
    std = float(cfg.get("initializer_range", 0.02))
    head = model.classifier if isinstance(model, ForSequenceClassification) else model.qa_outputs
    _init_linear(head, std)
    pooler = f"{arch.prefix}.pooler."
    for name, m in model.named_modules():  # a QA checkpoint has no pooler: give it defined values
        if f"{name}.".startswith(pooler) and isinstance(m, nn.Linear):
            _init_linear(m, std)
    wanted = set(model.state_dict())
    sd = strip_prefix(sd, f"{arch.prefix}.", wanted)
    if not present:  # a head of the wrong size (or none) is replaced by the fresh one
        sd = {k: v for k, v in sd.items() if not k.startswith(model.head_keys)}
    other = tuple(h for h in ("classifier.", "qa_outputs.") if h not in model.head_keys)
    optional = (pooler, *(() if present else model.head_keys))
    load_into(model, sd, path, optional_missing=optional, ignore_unexpected=(*arch.other_heads, *other))
    return model.eval()


def save_task_model(model: _TaskModel, out_dir: str | Path, source_dir: str | Path | None = None,
                    extra_config: dict | None = None) -> Path:
    """Write an HF directory transformers loads as ``<Arch>For<Task>``: config.json, model.safetensors,
    and the tokenizer files copied from ``source_dir``."""
    from enc.io.publish import atomic_dir, sweep_stale

    final = Path(out_dir)
    sweep_stale(final.absolute().parent)  # what a killed earlier --save left beside it
    if final.exists() and not final.is_dir():
        from enc.errors import OutputExists

        raise OutputExists(final, "--save target exists and is not a directory")
    # Built in a temp dir beside the target and published with the umask's modes (safetensors writes 0600).
    staging = final.parent / f".{final.name}.enc-tmp-{os.getpid()}-staging" if final.is_dir() else final
    with atomic_dir(staging) as out:
        _write_task_model(model, out, source_dir, extra_config)
    if staging != final:  # an existing --save directory: the files move in, replacing same-named ones
        for f in staging.iterdir():
            os.replace(f, final / f.name)
        staging.rmdir()
    return final


def check_save_target(save: str | Path | None, model_dir: str | Path) -> None:
    """``eval --save`` must not write over the model it evaluates (or a directory holding it): refused
    before any fine-tuning starts."""
    if save is None:
        return
    from enc.errors import OutputExists

    s, m = Path(save).resolve(), Path(model_dir).resolve()
    if s == m or s in m.parents:
        raise OutputExists(save, f"--save would overwrite the model being evaluated ({model_dir}); choose another "
                                 "directory")
    if s.exists() and not s.is_dir():
        raise OutputExists(save, "--save target exists and is not a directory")


def _write_task_model(model: _TaskModel, out: Path, source_dir: str | Path | None, extra_config: dict | None) -> None:
    from safetensors.torch import save_file

    cfg = {k: v for k, v in model.hf_config.items() if k not in ("architectures", "_name_or_path")}
    cfg["architectures"] = [model.arch.seq_cls if isinstance(model, ForSequenceClassification) else model.arch.qa]
    cfg.update(extra_config or {})
    pooler = f"{model.arch.prefix}.pooler."
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
          if not (isinstance(model, ForQuestionAnswering) and k.startswith(pooler))}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if source_dir is not None:
        for f in Path(source_dir).iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix in (".model", ".txt")
                                or f.name == "spiece.model"):
                shutil.copyfile(f, out / f.name)
