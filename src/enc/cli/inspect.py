"""enc inspect PATH"""

from __future__ import annotations

from pathlib import Path

import typer

from enc.cli.common import emit_json, human_bytes, out


def inspect(
    path: Path = typer.Argument(..., help="An original checkpoint or a converted HF directory."),
    from_: str = typer.Option(None, "--from", help="Force the source format."),
    tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="List every tensor."),
    json_: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
) -> int:
    """Show the format, tensors (name, shape, dtype), parameter count and config of PATH."""
    from math import prod

    from enc.errors import MissingFile

    if not path.exists():
        raise MissingFile(path, "no such file or directory")
    if path.is_dir() and (path / "config.json").is_file() and not _looks_original(path):
        info = _inspect_hf(path)
    else:
        from enc.convert import open_converter
        from enc.converters.base import ConvertOptions

        with open_converter(path, from_, ConvertOptions()) as conv:
            src = conv.source_tensors()
            info = {
                "kind": "original", "format": conv.name, "path": str(path),
                "summary": conv.summary(),
                "files": [str(p) for p in conv.source_files()],
                "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                            for k, v in src.items()],
            }
    info["n_tensors"] = len(info["tensors"])
    info["params"] = sum(prod(t["shape"]) for t in info["tensors"] if t.get("counted", True))
    info["bytes"] = sum(prod(t["shape"]) * _itemsize(t["dtype"]) for t in info["tensors"])
    if json_:
        emit_json(info)
        return 0
    _render(info, tensors)
    return 0


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
    return {
        "kind": "huggingface", "format": cfg.get("model_type"), "path": str(path),
        "architectures": cfg.get("architectures"),
        "summary": {k: cfg[k] for k in sorted(cfg) if isinstance(cfg[k], (int, float, str, bool)) and k != "model_type"},
        "files": sorted(p.name for p in path.iterdir() if p.is_file()),
        "provenance": json.loads(prov.read_text()) if prov.is_file() else None,
        "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in sorted(weights.items())],
    }


def _render(info: dict, show_tensors: bool) -> None:
    from rich.table import Table

    out.print(f"[bold]{info['path']}[/bold]: {info['kind']} checkpoint, format [cyan]{info['format']}[/cyan]")
    out.print(f"{info['n_tensors']} tensors, {info['params']:,} parameters, {human_bytes(info['bytes'])}")
    if info.get("architectures"):
        out.print(f"architectures: {', '.join(info['architectures'])}")
    if info.get("provenance") and info["provenance"].get("parity"):
        p = info["provenance"]["parity"]
        out.print(f"converted by enc {info['provenance']['enc_version']} from {info['provenance']['source']['format']}; "
                  f"parity: {p['verdict']} ({p['dtype']})")
    if info.get("summary"):
        t = Table(title="config", show_header=False)
        for k, v in info["summary"].items():
            if not isinstance(v, (dict, list)):
                t.add_row(k, str(v))
        out.print(t)
    if show_tensors:
        t = Table(title="tensors")
        for col in ("name", "shape", "dtype"):
            t.add_column(col)
        for row in info["tensors"]:
            t.add_row(row["name"], "x".join(map(str, row["shape"])) or "scalar", row["dtype"])
        out.print(t)
