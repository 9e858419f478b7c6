"""enc inspect PATH"""

from __future__ import annotations

from pathlib import Path

import typer

from enc.cli.common import JSON, command, err, finish, format_choice, human_bytes, plain, q, status
from enc.cli.options import FROM, Format


@command("inspect")
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="An original checkpoint or a converted HF directory."),
    from_: Format = FROM,
    tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="List every tensor."),
    json_: bool = JSON,
) -> int:
    """Show the format, config, parameter count and tensors (name, shape, dtype) of PATH."""
    from math import prod

    from enc.errors import MissingFile

    if not path.exists():
        raise MissingFile(path, "no such file or directory")
    if path.is_dir() and (path / "config.json").is_file() and not _looks_original(path):
        info = _inspect_hf(path)
    else:
        info = _inspect_original(path, format_choice(from_))
    info["n_tensors"] = len(info["tensors"])
    counted = [t for t in info["tensors"] if not t.get("dropped")]
    info["params"] = sum(prod(t["shape"]) for t in counted)  # the model's parameters only
    info["other_values"] = sum(prod(t["shape"]) for t in info["tensors"] if t.get("dropped"))
    info["bytes"] = sum(prod(t["shape"]) * _itemsize(t["dtype"]) for t in info["tensors"])
    if not json_:
        _render(info, tensors)
    return finish(info)


def _inspect_original(path: Path, forced: str | None) -> dict:
    from enc.convert import open_converter
    from enc.converters.base import ConvertOptions
    from enc.errors import EncError

    with status(f"reading {path}"), open_converter(path, forced, ConvertOptions()) as conv:
        src = conv.source_tensors()
        try:
            dropped = conv.plan().dropped  # optimizer slots, RNG state, step counters: not model parameters
            plan_note = None
        except EncError as e:
            dropped, plan_note = {}, f"no conversion plan ({e.one_line()}): every tensor counted"
        files = list(conv.source_files())
        info = {
            "kind": "original", "format": conv.name, "path": str(path), "summary": conv.summary(),
            "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                         **({"dropped": dropped[k]} if k in dropped else {})} for k, v in src.items()],
        }
    # A file that is gone now was read from a temporary extraction of PATH (a tarball): name it inside PATH.
    info["files"] = [str(p) if p.exists() else f"{path}:{p.name}" for p in files]
    info["summary"] = _untemp(info["summary"], path)
    if plan_note:
        info["notes"] = [plan_note]
    return info


def _untemp(value, path: Path):
    """Summary values naming files of a deleted temporary extraction, as ``ARCHIVE:member``."""
    import tempfile

    if isinstance(value, dict):
        return {k: _untemp(v, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_untemp(v, path) for v in value]
    if isinstance(value, str) and value.startswith(tempfile.gettempdir()) and not Path(value).exists():
        parts = Path(value).relative_to(tempfile.gettempdir()).parts
        return f"{path}:{'/'.join(parts[1:])}"  # drop the temporary directory's own name
    return value


def _looks_original(path: Path) -> bool:
    # A Mistral release dir has params.json; an HF dir has config.json with model_type.
    import json

    try:
        return "model_type" not in json.loads((path / "config.json").read_text())
    except (ValueError, OSError):
        return True


def _itemsize(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize if hasattr(torch, dtype) else 0


def _inspect_hf(path: Path) -> dict:
    import json

    from enc.models.loading import lazy_weights, read_config

    cfg = read_config(path)
    weights = lazy_weights(path)
    prov = path / "enc_provenance.json"
    try:
        provenance = json.loads(prov.read_text()) if prov.is_file() else None
    except (ValueError, OSError):
        provenance = None
    return {
        "kind": "huggingface", "format": "huggingface", "model_type": cfg.get("model_type"), "path": str(path),
        "architectures": cfg.get("architectures"),
        "config": {k: cfg[k] for k in sorted(cfg)},
        "files": sorted(p.name for p in path.iterdir() if p.is_file()),
        "provenance": provenance,
        "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in sorted(weights.items())],
    }


def _value(v) -> str:
    import json

    return json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)


def _flat(d: dict, prefix: str = ""):
    """Nested config values as dotted keys (``dims.hidden``), so none is dropped or crammed on one line."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _render(info: dict, show_tensors: bool) -> None:
    from rich.table import Table

    what = info["format"] if info["kind"] == "original" else f"Hugging Face ({info['model_type']})"
    err.print(f"[bold]{q(info['path'])}[/bold]: {info['kind']} checkpoint, format [cyan]{q(what)}[/cyan]")
    other = f" (+ {info['other_values']:,} values of optimizer/training state)" if info["other_values"] else ""
    err.print(f"{info['n_tensors']} tensors, {info['params']:,} model parameters{other}, {human_bytes(info['bytes'])}")
    if info.get("architectures"):
        err.print(f"architectures: {q(', '.join(info['architectures']))}")
    prov = info.get("provenance") or {}
    if prov.get("parity"):
        p = prov["parity"]
        err.print(f"converted by enc {q(prov.get('enc_version'))} from {q(prov.get('source', {}).get('format'))}; "
                  f"parity: {q(p.get('verdict_text', p.get('verdict')))} ({q(p.get('dtype'))})")
    for n in info.get("notes", []):
        err.print(f"note: {q(n)}")
    facts = info.get("config") or info.get("summary")
    if facts:
        t = Table(title="config" if "config" in info else info["format"], show_header=False)
        t.add_column("key", no_wrap=True)
        t.add_column("value", overflow="fold")
        for k, v in _flat(facts):
            t.add_row(plain(k), plain(_value(v)))
        err.print(t)
    if show_tensors:
        t = Table(title="tensors")
        for col in ("name", "shape", "dtype", ""):
            t.add_column(col, no_wrap=col != "")
        for row in info["tensors"]:
            t.add_row(plain(row["name"]), "x".join(map(str, row["shape"])) or "scalar", row["dtype"],
                      plain(f"not a model parameter: {row['dropped']}" if row.get("dropped") else ""))
        err.print(t)
