"""Torch runtimes for the HF layouts enc runs. One flat file per architecture.

Each module defines a dataclass config with ``from_dict`` (unknown keys ignored), ``nn.Module``
classes whose parameter names are exactly the HF state-dict keys, and
``from_pretrained(model_dir, dtype=None, device="cpu", **kw)``.
``load_model`` picks the module from config.json's ``model_type``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from enc.errors import ConfigError

# model_type (config.json) -> module under enc.models
MODEL_TYPES: dict[str, str] = {
    "albert": "enc.models.albert",
    "megatron-bert": "enc.models.megatron_bert",
    "bert": "enc.models.megatron_bert",
    "bert-generation": "enc.models.bert_generation",
    "encoder-decoder": "enc.models.bert_generation",  # BertGeneration encoder + decoder (checked on load)
    "gpt2": "enc.models.gpt2",
    "mistral": "enc.models.mistral",
    "mobilebert": "enc.models.mobilebert",
    "mixtral": "enc.models.mistral",
    "mega": "enc.models.mega",
    "luke": "enc.models.luke",
}


def model_module(model_dir: str | Path):
    from enc.models.loading import read_config

    cfg = read_config(model_dir)
    mt = cfg.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(Path(model_dir) / "config.json",
                          f"model_type {mt!r} is not supported (enc runs: {', '.join(sorted(MODEL_TYPES))})")
    return importlib.import_module(MODEL_TYPES[mt])


def load_model(model_dir: str | Path, dtype=None, device: str = "cpu", **kw):
    return model_module(model_dir).from_pretrained(model_dir, dtype=dtype, device=device, **kw)
