"""``enc eval glue``: (optionally fine-tune, then) score a sequence classifier on GLUE tasks.

Predictions go through the model's ``id2label`` to the dataset's label names, never raw ids: an
MNLI model trained with another label order scores right, and a model whose names do not match
the task's is refused. Generic names (``LABEL_0``, ``"0"``) mean "dataset order", as in
transformers' ``run_glue.py``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enc.errors import UsageError
from enc.evals import metrics
from enc.evals.data import GlueTask, Split, default_splits, glue_split, parse_tasks
from enc.evals.finetune import FinetuneConfig, classification_loss, train
from enc.evals.runtime import clamp_length, encode_pair, predict, progress_bar, resolve_device

# GLUE submission file names (gluebenchmark.com) per task/split
SUBMISSION = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "qnli": "QNLI",
              "rte": "RTE", "wnli": "WNLI", "ax": "AX", ("mnli", "test_matched"): "MNLI-m",
              ("mnli", "test_mismatched"): "MNLI-mm", ("mnli", "validation_matched"): "MNLI-m",
              ("mnli", "validation_mismatched"): "MNLI-mm"}
TEXT_LABEL_TASKS = ("mnli", "qnli", "rte", "ax")


@dataclass
class GlueOptions:
    model: Path
    tasks: str
    data: Path | None = None
    splits: list[str] | None = None
    max_length: int = 128
    batch_size: int = 32
    max_tokens: int | None = None
    limit: int | None = None
    device: str = "auto"
    precision: str = "auto"
    finetune: FinetuneConfig | None = None
    save: Path | None = None
    train_data: Path | None = None
    predict_dir: Path | None = None
    progress: bool = True


_GENERIC = re.compile(r"^(label_)?\d+$")


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def label_mapping(id2label: dict[int, str] | None, num_outputs: int, task: GlueTask, config_path: Path
                  ) -> tuple[list[int], str]:
    """Model output id -> dataset label index, and a note saying how it was decided."""
    if task.is_regression:
        if num_outputs != 1:
            raise UsageError(config_path, f"{task.name} is a regression task and needs a 1-output head; "
                                          f"this model has {num_outputs} labels")
        return [0], "regression"
    assert task.label_names is not None
    names = list(task.label_names)
    if num_outputs != len(names):
        raise UsageError(config_path, f"the model has {num_outputs} label(s), {task.name} has {len(names)} "
                                      f"({', '.join(names)})")
    labels = [str((id2label or {}).get(i, f"LABEL_{i}")) for i in range(num_outputs)]
    if all(_GENERIC.match(_norm(lab)) and int(_norm(lab).split("_")[-1]) == i for i, lab in enumerate(labels)):
        return list(range(num_outputs)), f"model labels are generic; assumed dataset order ({', '.join(names)})"
    want = {_norm(n): i for i, n in enumerate(names)}
    if sorted(_norm(lab) for lab in labels) != sorted(want):
        raise UsageError(config_path, f"the model's labels ({', '.join(labels)}) do not match {task.name}'s "
                                      f"({', '.join(names)})")
    mapping = [want[_norm(lab)] for lab in labels]
    note = "by name" + ("" if mapping == list(range(num_outputs)) else
                        f" (model order {', '.join(labels)} differs from the dataset's)")
    return mapping, note


def _task_model_dir(model: Path, task: GlueTask, several: bool) -> Path:
    """With several tasks, ``model/<task>`` (or the GLUE folder name) holds each task's model, if present."""
    if several:
        for name in (task.name, task.folder, task.folder.lower()):
            if (model / name / "config.json").is_file():
                return model / name
    return model


def _limit(split: Split, n: int | None) -> Split:
    if n is not None and n < len(split.rows):
        split.rows = split.rows[:n]
    return split


def _encode(tok, task: GlueTask, rows: list[dict[str, Any]], max_length: int):
    b = task.columns[1] if len(task.columns) > 1 else None
    return [encode_pair(tok, r[task.columns[0]], r[b] if b else None, max_length) for r in rows]


def _write_submission(out_dir: Path, task: GlueTask, split: str, preds: list) -> Path:
    name = SUBMISSION.get((task.name, split)) or SUBMISSION[task.name]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.tsv"
    lines = ["index\tprediction"]
    for i, p in enumerate(preds):
        if task.is_regression:
            lines.append(f"{i}\t{p:.3f}")
        else:
            assert task.label_names is not None
            lines.append(f"{i}\t{task.label_names[p] if task.name in TEXT_LABEL_TASKS else p}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_task(task: GlueTask, opts: GlueOptions, several: bool) -> list[dict[str, Any]]:
    from enc.evals.data import get_task
    from enc.models.heads import load_task_model
    from enc.tokenization import load_tokenizer

    model_dir = _task_model_dir(opts.model, task, several)
    device = resolve_device(opts.device)
    ft = opts.finetune
    id2label = None if task.is_regression else dict(enumerate(task.label_names or ()))
    model = load_task_model(model_dir, "sequence-classification", num_labels=task.num_labels if ft else None,
                            new_head=ft is not None, id2label=id2label, seed=ft.seed if ft else None)
    tok = load_tokenizer(model_dir)
    pad = tok.pad_id if tok.pad_id is not None else 0
    max_length, warnings = clamp_length(model, opts.max_length)
    cfg_path = model_dir / "config.json"
    raw_id2label = model.hf_config.get("id2label")
    model_labels = {int(k): v for k, v in raw_id2label.items()} if isinstance(raw_id2label, dict) else None
    mapping, mapping_note = label_mapping(model_labels, model.num_labels, task, cfg_path)
    # read (and check) the evaluation data before spending time on training
    splits = [_limit(glue_split(task, opts.data, name), opts.limit)
              for name in (opts.splits or default_splits(task, opts.data))]
    train_info = None
    if ft is not None:
        train_task = get_task("mnli") if task.name == "ax" else task
        if opts.train_data is None and opts.data is not None and Path(opts.data).is_file():
            raise UsageError(opts.data, "--finetune with a single --data file needs --train FILE for the training data")
        tr = _limit(glue_split(train_task, opts.train_data or opts.data, "train"), opts.limit)
        rows = [r for r in tr.rows if r["label"] != -1]
        inverse = {d: m for m, d in enumerate(mapping)}
        targets = [r["label"] if task.is_regression else inverse[r["label"]] for r in rows]
        ft.device = device
        train_info = train(model, _encode(tok, task, rows, max_length), targets,
                           classification_loss(task.is_regression), pad, ft, opts.progress,
                           f"fine-tuning {task.name}")
        train_info.update(examples=len(rows), source=tr.source, **ft.as_dict())
        if opts.save is not None:
            from enc.models.heads import save_task_model

            dest = opts.save / task.name if several else opts.save
            extra = {"problem_type": "regression" if task.is_regression else "single_label_classification"}
            if not task.is_regression:
                extra |= {"id2label": {str(m): task.label_names[d] for m, d in enumerate(mapping)},  # type: ignore[index]
                          "label2id": {task.label_names[d]: m for m, d in enumerate(mapping)}}  # type: ignore[index]
            else:
                extra |= {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
            train_info["saved_to"] = str(save_task_model(model, dest, model_dir, extra))
    model.to(device)
    results = []
    for split in splits:
        items = _encode(tok, task, split.rows, max_length)
        with progress_bar(len(items), f"{task.name} {split.name}", opts.progress) as advance:
            t0 = time.perf_counter()
            outs = predict(model, items, pad, device, opts.batch_size, opts.max_tokens, opts.precision, advance)
            secs = time.perf_counter() - t0
        if task.is_regression:
            preds: list = [float(o[0]) for o in outs]
        else:
            preds = [mapping[int(np.argmax(o))] for o in outs]
        labelled = [(p, r["label"]) for p, r in zip(preds, split.rows) if r["label"] != -1]
        scores: dict[str, float] = {}
        if labelled and len(labelled) == len(preds):
            scores = metrics.glue_metric(task.name, [p for p, _ in labelled], [y for _, y in labelled])
        notes = list(split.notes)
        if not labelled:
            notes.append("split has no labels: predictions only")
        elif len(labelled) != len(preds):
            raise UsageError(split.source, f"{len(preds) - len(labelled)} of {len(preds)} rows have no label")
        res: dict[str, Any] = {
            "task": task.name, "split": split.name, "metrics": scores, "examples": len(split.rows),
            "source": split.source, "model": str(model_dir), "label_mapping": mapping_note,
            "seconds": round(secs, 4), "examples_per_s": round(len(items) / secs, 2) if secs > 0 else None,
            "notes": notes, "warnings": warnings,
        }
        if train_info is not None:
            res["finetune"] = train_info
        if opts.predict_dir is not None:
            res["predictions_file"] = str(_write_submission(opts.predict_dir, task, split.name, preds))
        results.append(res)
    return results


def versions() -> dict[str, str | None]:
    import torch

    import enc

    try:
        from importlib.metadata import version

        ds: str | None = version("datasets")
    except Exception:  # not installed
        ds = None
    return {"enc": enc.__version__, "torch": torch.__version__, "datasets": ds}


def run(opts: GlueOptions) -> dict[str, Any]:
    tasks = parse_tasks(opts.tasks)
    if not tasks:
        raise UsageError(None, "no task given (--task sst2, --task mnli,rte or --task all)")
    several = len(tasks) > 1
    from enc.models.heads import check_save_target

    check_save_target(opts.save, opts.model)
    results: list[dict[str, Any]] = []
    for task in tasks:
        results += run_task(task, opts, several)
    return {"model": str(opts.model), "tasks": [t.name for t in tasks],
            "seed": opts.finetune.seed if opts.finetune else None, "limit": opts.limit,
            "max_length": opts.max_length, "versions": versions(), "results": results}
