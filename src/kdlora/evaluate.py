"""Predict and evaluate: over a loader, on a task's splits, from a saved model; GLUE test-set submissions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from kdlora.config import DataArgs
from kdlora.data import TokenizedDataset, eval_loader, load_splits
from kdlora.errors import KdloraError
from kdlora.io import atomic_write_text
from kdlora.metrics import combine_splits, compute_metrics
from kdlora.models import load_tokenizer
from kdlora.rundir import model_dir
from kdlora.tasks import Task, get_task


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, accelerator: Any, regression: bool) -> dict[str, torch.Tensor]:
    """Predictions over a loader: example ids, logits, predicted class (or value), and labels where present."""
    model.eval()
    ids, logits, labels = [], [], []
    for batch in loader:
        out = model(**batch.inputs).logits.float()
        ids.append(accelerator.gather_for_metrics(batch.ids).cpu())
        logits.append(accelerator.gather_for_metrics(out).cpu())
        if batch.labels is not None:
            labels.append(accelerator.gather_for_metrics(batch.labels).cpu())
    result = {"ids": torch.cat(ids), "logits": torch.cat(logits)}
    result["preds"] = result["logits"].squeeze(-1) if regression else result["logits"].argmax(-1)
    if labels:
        result["labels"] = torch.cat(labels)
    return result


def evaluate(model: torch.nn.Module, loaders: dict[str, DataLoader], task: Task, accelerator: Any) -> dict[str, Any]:
    """Task metrics on every evaluation split, flattened, with the 0-100 `score`."""
    per_split = {}
    for split, loader in loaders.items():
        out = predict(model, loader, accelerator, task.is_regression)
        per_split[split] = compute_metrics(task, out["preds"].numpy(), out["labels"].numpy())
    return combine_splits(task, per_split)


def load_saved(path: str | Path, task_name: str) -> tuple[Task, torch.nn.Module, Any]:
    """A saved classifier (a finished run's merged model, or a model directory) checked against the task, and its
    tokenizer."""
    from transformers import AutoModelForSequenceClassification

    task, path = get_task(task_name), model_dir(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if model.config.num_labels != task.num_labels:
        raise KdloraError(f"{path} has {model.config.num_labels} labels; {task.name} has {task.num_labels}")
    return task, model, load_tokenizer(str(path))


def split_loaders(task: Task, tokenizer: Any, data: DataArgs, splits: tuple[str, ...], batch_size: int) -> dict:
    """Evaluation loaders for the named splits of `data`."""
    examples = load_splits(data, splits)
    return {
        s: eval_loader(TokenizedDataset(ex, tokenizer, data.max_length), tokenizer, batch_size, task.is_regression)
        for s, ex in examples.items()
    }


def write_submission(task: Task, split: str, out: dict[str, torch.Tensor], path: Path) -> int:
    """A GLUE leaderboard file for one test split, rows in example-id order. Returns the number of rows."""
    rows = sorted(zip(out["ids"].tolist(), out["preds"].tolist(), strict=True))
    if task.is_regression:  # STS-B scores live in [0, 5]
        lines = [f"{i}\t{min(max(p, 0.0), 5.0):.3f}" for i, p in rows]
    else:
        lines = [f"{i}\t{task.labels[int(p)]}" for i, p in rows]
    atomic_write_text(path, "index\tprediction\n" + "\n".join(lines) + "\n")
    return len(lines)
