"""Predict and evaluate: over a loader, on a task's splits, from a saved model; GLUE test-set submissions;
predictions written for the user's rows (a run's --test-file, or any raw file with `kdlora predict --input-file`)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from kdlora.config import DataArgs, arg
from kdlora.data import Example, TokenizedDataset, eval_loader, iter_raw_rows, load_splits
from kdlora.env import default_device
from kdlora.errors import KdloraError
from kdlora.io import atomic_file, atomic_write_text
from kdlora.kinds import Kind, kind_of, kind_of_model
from kdlora.metrics import combine_splits
from kdlora.models import load_saved
from kdlora.rundir import refuse_own_inputs
from kdlora.tasks import Task


@dataclass
class EvaluateArgs:
    """`kdlora evaluate` (with the data flags of config.DataArgs beside these)."""

    model_dir: str = arg(MISSING, "a run directory (uses its merged/) or a model directory")
    batch_size: int = arg(64, "examples per evaluation batch")
    output: str | None = arg(None, "also write the metrics to this JSON file")


@dataclass
class PredictArgs:
    """`kdlora predict`: a raw file's rows (--input-file, --output-file) or GLUE test-set submissions (--task,
    --output-dir)."""

    model_dir: str = arg(MISSING, "a run directory (uses its merged/) or a model directory")
    input_file: str | None = arg(None, "rows to label: .csv, .tsv, .jsonl, .json, .parquet or .txt")
    output_file: str | None = arg(None, "where the predictions go: .csv or .jsonl")
    text_columns: list[str] | None = arg(None, "the input's text column(s) (default: the run's, or guessed)")
    id_column: str | None = arg(None, "an input column copied to the output as id (default: the row number)")
    task: str | None = arg(None, "GLUE task of the submission mode")
    data_dir: str | None = arg(None, "GLUE TSV directory of the submission mode")
    dataset: str = arg("nyu-mll/glue", "the submission mode's dataset without --data-dir")
    output_dir: str | None = arg(None, "directory for the submission TSV(s)")
    max_length: int = arg(128, "truncate inputs to this many tokens")
    batch_size: int = arg(64, "rows per batch")
    max_new_tokens: int = arg(32, "a language model: the most tokens a greedy completion adds")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise KdloraError("--max-new-tokens must be at least 1")
        if self.batch_size <= 0 or self.max_length < 8:
            raise KdloraError("--batch-size must be > 0 and --max-length at least 8")


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, accelerator: Any, kind: Kind) -> dict[str, torch.Tensor]:
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
    result["preds"] = kind.predictions(result["logits"])
    if labels:
        result["labels"] = torch.cat(labels)
    return result


def evaluate(
    model: torch.nn.Module, loaders: dict[str, DataLoader], task: Task, accelerator: Any
) -> tuple[dict[str, Any], list[str]]:
    """Task metrics on every evaluation split, flattened, with the 0-100 `score`; and the splits on which every
    prediction was the same (a collapsed model, the collapse guard's first sign)."""
    per_split, constant = {}, []
    for split, loader in loaders.items():
        out = predict(model, loader, accelerator, kind_of(task))
        per_split[split] = kind_of(task).metrics(task, out["preds"].numpy(), out["labels"].numpy())
        if kind_of(task).constant(out["preds"], out["labels"]):
            constant.append(split)
    return combine_splits(task, per_split), constant


def constant_notice(splits: list[str], task: Task, epoch: int | None = None) -> str:
    # What a learning rate too high for the model looks like: the loss flat at the labels' entropy. After a run's
    # first epochs it is often only too few steps yet, so during training the notice states what it saw, no verdict
    seen = f"every {splits[0]} prediction is the same {kind_of(task).one}"
    if epoch is not None:
        return f"epoch {epoch}: {seen} (common early in a run; the collapse guard acts if it lasts)"
    return f"{seen}: the model has collapsed to a constant; a lower --lr usually avoids that"


def split_loaders(task: Task, tokenizer: Any, data: DataArgs, splits: tuple[str, ...], batch_size: int) -> dict:
    """Evaluation loaders for the named splits of `data`."""
    examples = load_splits(data, splits)
    return {
        s: eval_loader(TokenizedDataset(ex, tokenizer, data.max_length), tokenizer, batch_size, kind_of(task))
        for s, ex in examples.items()
    }


def write_submission(task: Task, split: str, out: dict[str, torch.Tensor], path: Path) -> int:
    """A GLUE leaderboard file for one test split, rows in example-id order. Returns the number of rows."""
    rows = sorted(zip(out["ids"].tolist(), out["preds"].tolist(), strict=True))
    lines = [f"{i}\t{kind_of(task).submission(task, p)}" for i, p in rows]
    atomic_write_text(path, "index\tprediction\n" + "\n".join(lines) + "\n")
    return len(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Predictions for the user's rows


class PredictionWriter:
    """Rows of predictions to a .csv (id, label, prob_<label>...; or id, prediction) or .jsonl file, written beside
    it under a temporary name and renamed into place only when complete."""

    def __init__(self, path: str | Path, label_names: Sequence[str], kind: Kind) -> None:
        self.path, self.names, self.kind = Path(path), list(label_names), kind
        if self.path.suffix.lower() not in (".csv", ".jsonl"):
            raise KdloraError(f"{self.path}: write predictions to a .csv or .jsonl file")
        self.rows = 0

    def __enter__(self) -> PredictionWriter:
        self.opened = atomic_file(self.path, "w", newline="")
        self.file = self.opened.__enter__()
        if self.path.suffix.lower() == ".csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(self.kind.columns(self.names))
        return self

    def write(self, keys: Sequence[str], logits: torch.Tensor) -> None:
        """One row per key: the predicted label and the class probabilities (or the predicted value)."""
        rows = self.kind.rows(keys, logits, self.names)
        for row in rows:
            if self.path.suffix.lower() == ".csv":
                self.csv.writerow(row)
            else:
                self.file.write(json.dumps(self.kind.record(row, self.names)) + "\n")
        self.rows += len(rows)

    def __exit__(self, *exc: Any) -> None:
        self.opened.__exit__(*exc)


def write_test_predictions(
    path: Path, model: Any, tokenizer: Any, examples: list[Example], task: Task, max_length: int, batch_size: int,
    accelerator: Any,
) -> int:  # fmt: skip
    """A run's --test-file rows, predicted by the trained model, in the file's order. Returns the number of rows."""
    dataset = TokenizedDataset(examples, tokenizer, max_length)
    loader = accelerator.prepare(eval_loader(dataset, tokenizer, batch_size, kind_of(task)))
    out = predict(model, loader, accelerator, kind_of(task))
    by_id = dict(zip(out["ids"].tolist(), out["logits"], strict=True))
    if not accelerator.is_main_process:
        return len(examples)
    with PredictionWriter(path, task.label_names, kind_of(task)) as writer:
        keys = [e.key if e.key is not None else str(e.id) for e in examples]
        writer.write(keys, torch.stack([by_id[e.id] for e in examples]))
    return writer.rows


@torch.inference_mode()
def predict_file(
    model_path: str | Path,
    input_file: str | Path,
    output_file: str | Path,
    text_columns: Sequence[str] | None = None,
    id_column: str | None = None,
    batch_size: int = 64,
    max_length: int = 128,
) -> int:
    """Predict every row of a raw file (CSV, TSV, JSONL, JSON, Parquet or one text a line) with a saved classifier, in
    input order, a batch at a time: memory stays flat in the file's size. Returns the number of rows written."""
    refuse_own_inputs(output_file, [("--input-file", input_file), ("--model-dir", model_path)], "--output-file")
    model, tokenizer = load_saved(model_path)
    device = default_device()
    model.to(device).eval()
    n = model.config.num_labels
    names = [str(model.config.id2label.get(i, i)) for i in range(n)]
    rows = iter_raw_rows(input_file, text_columns, id_column)
    with PredictionWriter(output_file, names, kind_of_model(model.config)) as writer:
        for chunk in chunks(rows, batch_size):
            keys, texts_a, texts_b = zip(*chunk, strict=True)
            pair = list(texts_b) if texts_b[0] is not None else None
            limit = min(max_length, tokenizer.model_max_length or max_length)
            enc = tokenizer(list(texts_a), pair, truncation=True, max_length=limit, padding=True, return_tensors="pt")
            writer.write(list(keys), model(**enc.to(device)).logits.cpu())
    return writer.rows


def chunks(rows: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """`rows` in lists of `size` (the last may be shorter): raw files are predicted a batch at a time, never whole."""
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
