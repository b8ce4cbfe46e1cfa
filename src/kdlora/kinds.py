"""Task kinds: what differs between classification and regression (and how a completion is written), asked of one
object per kind instead of tested for in every module. A kind knows the model's problem type, how a label is read and
checked, how labels are batched, its task loss and distillation divergence, predictions from the model's output, the
metrics, the strata of a label draw, the loss of a model that has learnt nothing, and how a prediction is written.

`kind_of(task)` gives a task's kind; `kind_of_model(config)` a saved model's, from its config.json."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from kdlora.errors import KdloraError
from kdlora.losses import IGNORE, kd_loss, regression_kd_loss, task_loss
from kdlora.metrics import classification_metrics, regression_metrics
from kdlora.tasks import Task

Label = int | float
CONSTANT_SPREAD = 1e-3  # a regressor whose predictions spread less than this share of the labels' predicts one value


class Kind(Protocol):
    name: str  # Task.kind
    problem_type: str  # transformers' config.problem_type
    one: str  # what one prediction is, in messages: "class" or "value"

    def label(self, value: Any, task: Task, where: str) -> Label: ...
    def labels_tensor(self, labels: Sequence[Label | None]) -> torch.Tensor: ...
    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def kd_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                weights: torch.Tensor | None = None) -> torch.Tensor: ...  # fmt: skip
    def predictions(self, logits: torch.Tensor) -> torch.Tensor: ...
    def constant(self, predictions: torch.Tensor, labels: torch.Tensor) -> bool: ...
    def metrics(self, task: Task, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]: ...
    def strata(self, labels: Sequence[Label]) -> list[list[int]]: ...
    def prior_loss(self, labels: Sequence[Label]) -> float: ...
    def label_counts(self, labels: Sequence[Label], task: Task) -> dict[str, int]: ...
    def describe(self, task: Task) -> str: ...
    def submission(self, task: Task, prediction: float) -> str: ...
    def columns(self, names: Sequence[str]) -> list[str]: ...
    def rows(self, keys: Sequence[str], logits: torch.Tensor, names: Sequence[str]) -> list[list[Any]]: ...
    def record(self, row: list[Any], names: Sequence[str]) -> dict[str, Any]: ...


class Classification:
    """One class of `task.labels` per example: cross-entropy, the temperature-scaled KL to the teacher, argmax."""

    name, problem_type, one = "classification", "single_label_classification", "class"

    def label(self, value: Any, task: Task, where: str) -> int:
        """A class id from a label as written (a string of task.labels; any cell of the user's own data, matched as
        the string id2label saves: label_key), or from a class id already (a GLUE `datasets` ClassLabel's int)."""
        if task.custom:
            value = label_key(value)
        if isinstance(value, str):
            if value not in task.labels and task.custom:
                raise KdloraError(f"{where}: label {value!r} is not among the labels of the training split or "
                                  f"--labels ({', '.join(task.labels)})")  # fmt: skip
            if value not in task.labels:
                raise KdloraError(
                    f"{where}: unknown label {value!r} for {task.name}; expected one of {', '.join(task.labels)}"
                )
            return task.labels.index(value)
        if not 0 <= int(value) < task.num_labels:
            raise KdloraError(f"{where}: label {value} is outside 0..{task.num_labels - 1}")
        return int(value)

    def labels_tensor(self, labels: Sequence[Label | None]) -> torch.Tensor:
        return torch.tensor([IGNORE if y is None else y for y in labels], dtype=torch.long)  # None: a transfer row

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, regression=False)

    def kd_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return kd_loss(student, teacher, temperature, weights)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def constant(self, predictions: torch.Tensor, labels: torch.Tensor) -> bool:
        """Every prediction the same class."""
        return len(predictions) > 1 and bool((predictions == predictions[0]).all())

    def metrics(self, task: Task, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
        return classification_metrics(task, predictions, labels)

    def strata(self, labels: Sequence[Label]) -> list[list[int]]:
        """The examples of each class, in class order."""
        by_class: dict[Any, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        return [by_class[c] for c in sorted(by_class)]

    def prior_loss(self, labels: Sequence[Label]) -> float:
        """The labels' entropy in nats: the cross-entropy of a model that predicts their prior."""
        if not labels:
            return math.nan
        counts: dict[Any, int] = {}
        for y in labels:
            counts[y] = counts.get(y, 0) + 1
        return -sum(c / len(labels) * math.log(c / len(labels)) for c in counts.values())

    def label_counts(self, labels: Sequence[Label], task: Task) -> dict[str, int]:
        names = task.label_names or tuple(map(str, range(task.num_labels)))
        return {names[c]: sum(y == c for y in labels) for c in range(task.num_labels)}

    def describe(self, task: Task) -> str:
        return ", ".join(task.label_names)

    def submission(self, task: Task, prediction: float) -> str:
        return task.labels[int(prediction)]

    def columns(self, names: Sequence[str]) -> list[str]:
        return ["id", "label", *(f"prob_{n}" for n in names)]

    def rows(self, keys: Sequence[str], logits: torch.Tensor, names: Sequence[str]) -> list[list[Any]]:
        """Per key: the predicted label and the class probabilities."""
        probs = logits.float().softmax(-1).tolist()
        return [[k, names[max(range(len(p)), key=p.__getitem__)], *(round(x, 6) for x in p)]
                for k, p in zip(keys, probs, strict=True)]  # fmt: skip

    def record(self, row: list[Any], names: Sequence[str]) -> dict[str, Any]:
        return {"id": row[0], "label": row[1], "probabilities": dict(zip(names, row[2:], strict=True))}


class Regression:
    """One real value per example (a [B, 1] output): MSE to the label and to the teacher's prediction."""

    name, problem_type, one = "regression", "regression", "value"

    def label(self, value: Any, task: Task, where: str) -> float:
        try:
            target = float(value)
        except (TypeError, ValueError):
            target = math.nan
        if not math.isfinite(target):
            raise KdloraError(f"{where}: label {value!r} is not a finite number; {task.name} is a regression task")
        return target

    def labels_tensor(self, labels: Sequence[Label | None]) -> torch.Tensor:
        return torch.tensor([math.nan if y is None else y for y in labels], dtype=torch.float32)  # NaN: a transfer row

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, regression=True)

    def kd_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return regression_kd_loss(student, teacher, weights)  # a real value has no temperature

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1)

    def constant(self, predictions: torch.Tensor, labels: torch.Tensor) -> bool:
        """Every prediction the same value up to CONSTANT_SPREAD of the labels' spread: a collapsed regressor still
        varies with its input in the last digits (MiniLM-L6 layers 0,2,4 on STS-B at 5.7e-3: std 1.4e-5 against the
        labels' 1.68), so exact equality never sees it."""
        if len(predictions) < 2:
            return False
        spread = float(labels.float().std()) if len(labels) > 1 else 0.0
        if spread == 0.0:
            return bool((predictions == predictions[0]).all())
        return float(predictions.float().std()) <= CONSTANT_SPREAD * spread

    def metrics(self, task: Task, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
        return regression_metrics(task, predictions, labels)

    def strata(self, labels: Sequence[Label]) -> list[list[int]]:
        """The examples of each quintile of the scores."""
        order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
        return [order[k * len(order) // 5 : (k + 1) * len(order) // 5] for k in range(5)]

    def prior_loss(self, labels: Sequence[Label]) -> float:
        """The labels' variance: the MSE of a model that predicts their mean."""
        if not labels:
            return math.nan
        mean = sum(labels) / len(labels)
        return sum((y - mean) ** 2 for y in labels) / len(labels)

    def label_counts(self, labels: Sequence[Label], task: Task) -> dict[str, int]:
        return {"all": len(labels)}

    def describe(self, task: Task) -> str:
        return f"a real value ({task.tsv_label})"

    def submission(self, task: Task, prediction: float) -> str:
        return f"{min(max(prediction, 0.0), 5.0):.3f}"  # GLUE's one regression task, STS-B, scores in [0, 5]

    def columns(self, names: Sequence[str]) -> list[str]:
        return ["id", "prediction"]

    def rows(self, keys: Sequence[str], logits: torch.Tensor, names: Sequence[str]) -> list[list[Any]]:
        return [[k, round(v, 6)] for k, v in zip(keys, logits.float().squeeze(-1).tolist(), strict=True)]

    def record(self, row: list[Any], names: Sequence[str]) -> dict[str, Any]:
        return {"id": row[0], "prediction": row[1]}


class Generation:
    """A causal LM's completions: the kind of lm.py's pipeline, which brings its own batches, step and evaluation
    (a causal LM's loss and metrics are per token, not per example), so this kind says only what the rest asks of it:
    how a completion is written by `kdlora predict`."""

    name, problem_type, one = "generation", "causal_lm", "completion"

    def columns(self, names: Sequence[str]) -> list[str]:
        return ["id", "generated"]

    def rows(self, keys: Sequence[str], generated: Sequence[str], names: Sequence[str]) -> list[list[Any]]:
        return [[k, g] for k, g in zip(keys, generated, strict=True)]

    def record(self, row: list[Any], names: Sequence[str]) -> dict[str, Any]:
        return {"id": row[0], "generated": row[1]}


def label_key(value: Any) -> str:
    """A label value as the string it is matched and saved by (id2label): 'pos', '3', 'true'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


CLASSIFICATION, REGRESSION, GENERATION = Classification(), Regression(), Generation()
KINDS: dict[str, Any] = {k.name: k for k in (CLASSIFICATION, REGRESSION, GENERATION)}


def kind_of(task: Task) -> Kind:
    return KINDS[task.kind]


def kind_of_model(config: Any) -> Kind:
    """A saved model's kind from its config (a transformers config or config.json's dict): one output or a
    regression problem type is a regressor."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    n = get("num_labels") or len(get("id2label") or {}) or 2
    return REGRESSION if get("problem_type") == "regression" or n == 1 else CLASSIFICATION
