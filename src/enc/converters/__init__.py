"""Registry of source formats. Each entry: name -> "module:Class" (imported on demand)."""

from __future__ import annotations

import importlib
from pathlib import Path

from enc.errors import FormatError, MissingFile

REGISTRY: dict[str, str] = {
    "albert_tf": "enc.converters.albert_tf:AlbertTFConverter",
    "megatron": "enc.converters.megatron:MegatronConverter",
    "mistral": "enc.converters.mistral:MistralConverter",
    "keras_hub_albert": "enc.converters.keras_hub_albert:KerasHubAlbertConverter",
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
