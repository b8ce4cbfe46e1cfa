"""Task metrics on the paper's 0-100 scale, computed with scikit-learn and scipy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdlora.tasks import Task


def regression_metrics(task: Task, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Named metrics of one evaluation split of real-valued predictions, plus `score`: the task's metric on a 0-100
    scale (higher is better). A GLUE task reports Pearson and Spearman; the user's own task the MSE beside them."""
    preds, golds = np.asarray(predictions), np.asarray(labels)
    # A constant prediction has no correlation; scipy returns nan, which we report as 0.
    pearson = float(np.nan_to_num(pearsonr(preds, golds)[0])) if np.std(preds) > 0 else 0.0
    spearman = float(np.nan_to_num(spearmanr(preds, golds)[0])) if np.std(preds) > 0 else 0.0
    named = {"pearson": pearson, "spearman": spearman}
    if task.custom:
        named["mse"] = float(np.mean((preds - golds) ** 2))
    score = {"pearson": pearson, "spearman": spearman}.get(task.metric, (pearson + spearman) / 2)
    return {**named, "score": 100 * score}


def classification_metrics(task: Task, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Named metrics of one evaluation split of class ids, plus `score`: the task's metric on a 0-100 scale. A GLUE
    task reports its own metrics; the user's own task accuracy and macro-F1 beside its chosen metric."""
    preds, golds = np.asarray(predictions), np.asarray(labels)
    values = {
        "accuracy": lambda: float(accuracy_score(golds, preds)),
        "f1": lambda: float(f1_score(golds, preds, zero_division=0)),
        "macro_f1": lambda: float(
            f1_score(golds, preds, average="macro", labels=range(task.num_labels), zero_division=0)
        ),
        "matthews_correlation": lambda: float(matthews_corrcoef(golds, preds)),
    }
    shown = {
        "matthews": ["matthews_correlation"],
        "accuracy_f1": ["accuracy", "f1"],
        "accuracy": ["accuracy"],
        "f1": ["f1"],
        "macro_f1": ["macro_f1"],
    }[task.metric]
    named = {k: values[k]() for k in (["accuracy", "macro_f1"] if task.custom else []) + shown}
    return {**named, "score": 100 * float(np.mean([named[k] for k in shown]))}


def combine_splits(task: Task, per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten per-split metrics (MNLI's m/mm get suffixes) and average the splits' scores into `score`."""
    flat: dict[str, float] = {}
    for split, metrics in per_split.items():
        tag = task.split_tag(split)
        for name, value in metrics.items():
            if name != "score":
                flat[f"{name}_{tag}" if tag else name] = value
    flat["score"] = float(np.mean([m["score"] for m in per_split.values()]))
    return flat


def glue_score(task_scores: Mapping[str, float]) -> float:
    """The GLUE score: the unweighted mean of the task scores."""
    return float(np.mean(list(task_scores.values())))
