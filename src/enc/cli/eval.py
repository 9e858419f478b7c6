"""enc eval glue | squad: fine-tune (optionally), then score; or score a predictions file (SQuAD)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from enc.cli.common import JSON, Device, EncCommand, chatty, command, err, finish, plain, q, warn

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                  help="GLUE and SQuAD evaluation (fine-tune, then score).")


class Precision(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    fp32 = "fp32"
    bf16 = "bf16"


SquadVersion = Enum("SquadVersion", {"v1_1": "1.1", "v2_0": "2.0"}, type=str)


def _precision(p: Precision | str) -> str:
    """The runtime's names: auto, fp32, bf16."""
    v = p.value if isinstance(p, Enum) else str(p)
    return {"float32": "fp32", "bfloat16": "bf16"}.get(v, v)


# shared options ------------------------------------------------------------------------------
_FINETUNE = typer.Option(False, "--finetune", help="Fine-tune a fresh head on the task's train split, then score.")
_EPOCHS = typer.Option(3.0, "--epochs", help="Fine-tuning epochs (fractions allowed).")
_LR = typer.Option(2e-5, "--lr", help="Peak learning rate (AdamW).")
_BATCH = typer.Option(32, "--batch-size", min=1, help="Sequences per batch (training and scoring).")
_ACCUM = typer.Option(1, "--grad-accum", min=1, help="Gradient accumulation steps.")
_WARMUP = typer.Option(0.1, "--warmup-ratio", help="Linear warmup over this fraction of the updates, then linear decay.")
_WD = typer.Option(0.01, "--weight-decay", help="AdamW weight decay (not on biases and LayerNorm).")
_SEED = typer.Option(0, "--seed", help="Seed for head init, shuffling and dropout.")
_DEVICE = typer.Option(Device.auto, "--device", help="auto: cuda when available, else cpu.")
_PRECISION = typer.Option(Precision.auto, "--dtype", "--precision",
                          help="Compute dtype: auto (bf16 autocast on GPU, float32 on CPU), float32 or bfloat16.")
_SAVE = typer.Option(None, "--save", help="Save the fine-tuned model as an HF directory here.")
_LIMIT = typer.Option(None, "--limit", min=1, help="Use only the first N examples (train and eval) for quick runs.")
_MAXTOK = typer.Option(None, "--max-tokens", min=1, help="Cap a scoring batch at N tokens (rows x padded length).")
_JSON = JSON
_OUTPUT = typer.Option(None, "--output", "-o", help="Also write the JSON result to this file.")


def _finetune_cfg(finetune: bool, **kw: Any):
    if not finetune:
        return None
    from enc.evals.finetune import FinetuneConfig

    cfg = FinetuneConfig(**kw)
    cfg.check()
    return cfg


def _fmt(key: str, v: Any, percent: bool) -> str:
    if isinstance(v, float) and not key.endswith("_thresh"):
        return f"{v:.2f}" if percent else f"{v:.4f}"
    return str(v)


def _render(result: dict[str, Any], percent: bool) -> None:  # noqa: C901 - one table per result
    """One small table per task/split on stderr, then its notes."""
    from rich.table import Table

    for r in result["results"]:
        title = f"{r['task']} / {r['split']}: {r['examples']} examples"
        if r.get("examples_per_s"):
            title += f", {r['examples_per_s']} examples/s"
        err.print(f"[bold]{q(title)}[/bold]", soft_wrap=True)
        table = Table(show_header=False, min_width=36)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in r["metrics"].items():
            table.add_row(plain(k), _fmt(k, v, percent))
        if not r["metrics"]:
            table.add_row("(no labels)", "-")
        err.print(table)
        notes = [f"model: {r['model']}" if r.get("model") else "", f"data: {r['source']}",
                 f"labels: {r['label_mapping']}" if r.get("label_mapping") else "", *r.get("notes", [])]
        if "finetune" in r:
            f = r["finetune"]
            notes.append(f"fine-tuned on {f['examples']} examples: {f['steps']} steps, loss {f['first_loss']:.4f} -> "
                         f"{f['final_loss']:.4f}" + (f"; saved to {f['saved_to']}" if "saved_to" in f else ""))
        notes += [f"wrote {x}" for x in r.get("files", [])]
        if "predictions_file" in r:
            notes.append(f"wrote {r['predictions_file']}")
        for n in notes:
            if n:
                err.print(plain(f"  {n}"), soft_wrap=True)


def _finish(result: dict[str, Any], json_: bool, output: Path | None, percent: bool) -> int:
    for r in result["results"]:
        for w in r.pop("warnings", []):
            warn(w)
    if not json_:
        _render(result, percent)
    return finish(result, also_to=output)


@app.command("glue", cls=EncCommand)
@command("eval glue")
def glue(
    model: Path = typer.Option(..., "--model", "-m", help="HF-layout model dir (fine-tuned, or base with --finetune). "
                                                           "With several tasks, MODEL/<task>/ is used where present."),
    task: str = typer.Option(..., "--task", "-t", help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, ax, "
                                                       "a comma list, or all."),
    data: Path = typer.Option(None, "--data", help="Original GLUE folder, a task folder, or a tsv/csv/jsonl/parquet "
                                                   "file with the HF columns. Default: nyu-mll/glue from the Hub."),
    split: list[str] = typer.Option(None, "--split", help="Split(s) to score (default: validation; MNLI: both)."),
    train_file: Path = typer.Option(None, "--train", help="Training file for --finetune (default: the train split "
                                                          "next to --data, or the Hub)."),
    max_length: int = typer.Option(128, "--max-length", min=8, help="Max tokens per pair (longest-first truncation); "
                                                                     "cut to the model's positions."),
    finetune: bool = _FINETUNE, epochs: float = _EPOCHS, lr: float = _LR, batch_size: int = _BATCH,
    grad_accum: int = _ACCUM, warmup_ratio: float = _WARMUP, weight_decay: float = _WD, seed: int = _SEED,
    device: Device = _DEVICE, precision: Precision = _PRECISION, save: Path = _SAVE, limit: int = _LIMIT,
    max_tokens: int = _MAXTOK,
    predict_dir: Path = typer.Option(None, "--predict-dir", help="Write GLUE submission files (e.g. SST-2.tsv) here."),
    json_: bool = _JSON, output: Path = _OUTPUT,
) -> int:
    """Score a sequence classifier on GLUE (accuracy, F1, Matthews, Pearson/Spearman as GLUE defines them)."""
    from enc.evals.glue import GlueOptions, run

    device, precision = device.value if isinstance(device, Enum) else device, _precision(precision)
    ft = _finetune_cfg(finetune, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                       warmup_ratio=warmup_ratio, weight_decay=weight_decay, seed=seed, precision=precision)
    opts = GlueOptions(model=model, tasks=task, data=data, splits=split or None, max_length=max_length,
                       batch_size=batch_size, max_tokens=max_tokens, limit=limit, device=device, precision=precision,
                       finetune=ft, save=save, train_data=train_file, predict_dir=predict_dir,
                       progress=chatty())
    return _finish(run(opts), json_, output, percent=False)


@app.command("squad", cls=EncCommand)
@command("eval squad")
def squad(
    model: Path = typer.Option(None, "--model", "-m", help="HF-layout model dir with a QA head (or base + --finetune)."),
    version: SquadVersion = typer.Option(None, "--version", help="SQuAD version (default: from the data file)."),
    data: Path = typer.Option(None, "--data", help="Official SQuAD JSON (dev-v2.0.json) or jsonl/parquet with the HF "
                                                   "columns. Default: rajpurkar/squad(_v2) from the Hub."),
    predictions: Path = typer.Option(None, "--predictions", help="Scoring only: a predictions.json {id: answer}."),
    na_probs: Path = typer.Option(None, "--na-probs", help="Scoring only (v2): {id: no-answer probability or odds}."),
    na_prob_thresh: float = typer.Option(1.0, "--na-prob-thresh", help="Scoring only (v2): as the official script's."),
    train_file: Path = typer.Option(None, "--train", help="Training JSON for --finetune (default: the Hub's train)."),
    out_dir: Path = typer.Option(Path("squad-predictions"), "--out-dir", help="Where predictions.json, "
                                                                            "nbest_predictions.json, null_odds.json go."),
    max_length: int = typer.Option(384, "--max-length", min=16, help="Max tokens per window (question + context); "
                                                                     "cut to the model's positions."),
    doc_stride: int = typer.Option(128, "--doc-stride", min=0, help="Overlap between context windows, in tokens."),
    max_query_length: int = typer.Option(64, "--max-query-length", min=1, help="Question tokens kept."),
    n_best: int = typer.Option(20, "--n-best", min=1, help="Start/end candidates considered per window."),
    max_answer_length: int = typer.Option(30, "--max-answer-length", min=1, help="Longest answer, in tokens."),
    null_threshold: float = typer.Option(0.0, "--null-threshold", help="v2: answer '' when null - best > this."),
    finetune: bool = _FINETUNE, epochs: float = _EPOCHS, lr: float = typer.Option(3e-5, "--lr", help="Peak LR."),
    batch_size: int = _BATCH, grad_accum: int = _ACCUM, warmup_ratio: float = _WARMUP, weight_decay: float = _WD,
    seed: int = _SEED, device: Device = _DEVICE, precision: Precision = _PRECISION, save: Path = _SAVE,
    limit: int = _LIMIT,
    max_tokens: int = _MAXTOK, json_: bool = _JSON, output: Path = _OUTPUT,
) -> int:
    """Score extractive QA on SQuAD v1.1/v2.0 exactly as the official scripts do; or score a predictions file."""
    from enc.errors import UsageError

    device, precision = device.value if isinstance(device, Enum) else device, _precision(precision)
    version = version.value if isinstance(version, Enum) else version
    if predictions is not None:
        if model is not None or finetune:
            raise UsageError(None, "--predictions scores a file; drop --model/--finetune")
        if data is None:
            raise UsageError(None, "--predictions needs --data (the SQuAD JSON the predictions are for)")
        from enc.evals.glue import versions
        from enc.evals.squad import score_files

        scores, v, sd = score_files(data, predictions, na_probs, version, na_prob_thresh)
        result = {"model": None, "predictions": str(predictions), "na_probs": str(na_probs) if na_probs else None,
                  "version": v, "seed": None, "versions": versions(),
                  "results": [{"task": "squad_v2" if v == "2.0" else "squad", "split": data.name, "metrics": scores,
                               "examples": len(sd.examples), "source": sd.source, "notes": []}]}
        return _finish(result, json_, output, percent=True)
    if model is None:
        raise UsageError(None, "pass --model DIR (or --predictions FILE --data FILE to score a file)")
    if na_probs is not None:
        raise UsageError(None, "--na-probs is for scoring a --predictions file")
    from enc.evals.squad import SquadOptions, run

    ft = _finetune_cfg(finetune, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                       warmup_ratio=warmup_ratio, weight_decay=weight_decay, seed=seed, precision=precision)
    opts = SquadOptions(model=model, version=version, data=data, train_data=train_file, out_dir=out_dir,
                        max_length=max_length, doc_stride=doc_stride, max_query_length=max_query_length, n_best=n_best,
                        max_answer_length=max_answer_length, null_threshold=null_threshold, batch_size=batch_size,
                        max_tokens=max_tokens, limit=limit, device=device, precision=precision, finetune=ft, save=save,
                        progress=chatty())
    return _finish(run(opts), json_, output, percent=True)
