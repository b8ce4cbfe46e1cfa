"""GLUE metrics on the paper's 0-100 scale, computed with scikit-learn and scipy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdlora.tasks import Task


def compute_metrics(task: Task, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Named metrics of one evaluation split, plus `score`: the task's single figure on a 0-100 scale.

    predictions are class ids for classification tasks and real values for STS-B.
    """
    preds, golds = np.asarray(predictions), np.asarray(labels)
    if task.metric == "matthews":
        mcc = float(matthews_corrcoef(golds, preds))
        return {"matthews_correlation": mcc, "score": 100 * mcc}
    if task.metric == "pearson_spearman":
        # A constant prediction has no correlation; scipy returns nan, which we report as 0.
        pearson = float(np.nan_to_num(pearsonr(preds, golds)[0])) if np.std(preds) > 0 else 0.0
        spearman = float(np.nan_to_num(spearmanr(preds, golds)[0])) if np.std(preds) > 0 else 0.0
        return {"pearson": pearson, "spearman": spearman, "score": 100 * (pearson + spearman) / 2}
    accuracy = float(accuracy_score(golds, preds))
    if task.metric == "accuracy_f1":
        f1 = float(f1_score(golds, preds))
        return {"accuracy": accuracy, "f1": f1, "score": 100 * (accuracy + f1) / 2}
    return {"accuracy": accuracy, "score": 100 * accuracy}


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
