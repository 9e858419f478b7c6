"""Registry of source formats. Each entry: name -> "module:Class" (imported on demand)."""

from __future__ import annotations

import importlib
from pathlib import Path

from enc.errors import FormatError, MissingFile

REGISTRY: dict[str, str] = {
    "albert_tf": "enc.converters.albert_tf:AlbertTFConverter",
    "bertgeneration_tf": "enc.converters.bertgeneration_tf:BertGenerationTFConverter",
    "megatron": "enc.converters.megatron:MegatronConverter",
    "mistral": "enc.converters.mistral:MistralConverter",
    "mobilebert_tf": "enc.converters.mobilebert_tf:MobileBertTFConverter",
    "keras_hub_albert": "enc.converters.keras_hub_albert:KerasHubAlbertConverter",
    "luke": "enc.converters.luke:LukeConverter",
    "mega": "enc.converters.mega:MegaConverter",
}


def converter_class(name: str):
    if name not in REGISTRY:
        raise FormatError(None, f"unknown format {name!r} (known: {', '.join(sorted(REGISTRY))})")
    mod, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def available() -> list[str]:
    out = []
    for name in REGISTRY:
        try:
            converter_class(name)
        except (ImportError, AttributeError):  # a family whose module is absent or incomplete
            continue
        out.append(name)
    return out


def detect(path: str | Path, forced: str | None = None):
    """The converter class for ``path`` (``forced`` skips detection)."""
    p = Path(path)
    if not p.exists() and not any(p.parent.glob(p.name + ".*")):
        raise MissingFile(p, "no such file or directory")
    if forced:
        return converter_class(forced)
    hits = [converter_class(n) for n in available() if converter_class(n).detect(p)]
    if not hits:
        raise FormatError(p, "not a checkpoint enc recognises (known formats: "
                          + ", ".join(available()) + "; use --from to force one)")
    if len(hits) > 1:
        raise FormatError(p, f"ambiguous input, matches {', '.join(h.name for h in hits)}; use --from")
    return hits[0]


# Converter overrides that have their own flag (key -> flag); every other key comes from --set KEY=VALUE.
# FILE_FLAGS are about tokenizer files; CONFIG_FLAGS change the computation (parity cannot check them).
FILE_FLAGS = {"vocab": "--vocab", "merges": "--merges", "tokenizer": "--tokenizer", "chat_template": "--chat-template"}
CONFIG_FLAGS = {"num_heads": "--num-heads", "num_kv_heads": "--num-kv-heads", "rope_theta": "--rope-theta",
                "sliding_window": "--sliding-window", "hidden_act": "--hidden-act",
                "config": "--config"}
# OUTPUT_FLAGS choose what is written (not an assumption about the computation).
OUTPUT_FLAGS = {"part": "--part", "no_entity_embeddings": "--no-entity-embeddings"}
OVERRIDE_FLAGS = {**FILE_FLAGS, **CONFIG_FLAGS, **OUTPUT_FLAGS}


def override_name(key: str) -> str:
    """How the user spelled an override: ``--num-heads`` or ``--set key``."""
    return OVERRIDE_FLAGS.get(key, f"--set {key}")


def check_overrides(cls, overrides: dict) -> None:
    """Refuse overrides that do not apply to the detected format (exit 2) instead of ignoring them."""
    from enc.errors import UsageError

    if cls.accepts is None:
        return
    bad = [k for k in overrides if k not in cls.accepts]
    if bad:
        sets = sorted(k for k in cls.accepts if k not in OVERRIDE_FLAGS)
        flags = sorted(OVERRIDE_FLAGS[k] for k in cls.accepts if k in OVERRIDE_FLAGS)
        raise UsageError(None, f"{', '.join(override_name(k) for k in bad)} does not apply to {cls.name} checkpoints "
                               f"(it takes: {', '.join(flags) or 'no override flags'}; --set keys: "
                               f"{', '.join(sets) or 'none'})")


def describe_assumed(overrides: dict) -> list[str]:
    """The overrides that change what the model computes, as the user typed them."""
    return [f"{override_name(k)}{' ' if k in CONFIG_FLAGS else '='}{v}" for k, v in overrides.items()
            if k not in FILE_FLAGS and k not in OUTPUT_FLAGS]
