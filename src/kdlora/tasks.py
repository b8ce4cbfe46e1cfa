"""Tasks: the GLUE registry (columns, labels, metric, splits and file names of each task) and tasks built from the
user's own data (its columns, its labels, a metric chosen by name)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from kdlora.errors import KdloraError

Metric = Literal["matthews", "pearson_spearman", "accuracy_f1", "accuracy", "f1", "macro_f1", "pearson", "spearman"]
METRICS: tuple[str, ...] = typing.get_args(Metric)
REGRESSION_METRICS = ("pearson_spearman", "pearson", "spearman")
METRIC_ALIASES = {"mcc": "matthews", "matthews_correlation": "matthews", "acc": "accuracy", "f1_macro": "macro_f1"}


@dataclass(frozen=True)
class Task:
    name: str  # short name used on the command line, e.g. "cola"
    glue_dir: str  # sub-directory in the GLUE distribution, e.g. "CoLA"
    tsv_text: tuple[str, ...]  # text column(s) in the GLUE TSV files: one sentence or a pair
    tsv_label: str  # label column in the GLUE TSV files
    hf_text: tuple[str, ...]  # the same columns in the Hugging Face `nyu-mll/glue` dataset
    labels: tuple[str, ...]  # raw label values as written in the TSVs, in class-id order; () for regression
    label_names: tuple[str, ...]  # readable class names (id2label); the Hugging Face ClassLabel order
    metric: Metric
    eval_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    submission: tuple[str, ...] = ()  # GLUE leaderboard file name per test split
    # Column names for files that have no header row (CoLA's train and dev); test files always have one.
    tsv_columns: tuple[str, ...] | None = None
    split_files: dict[str, str] = field(
        default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
    )
    custom: bool = False  # built from the user's data: tsv_text/tsv_label are then its text and label columns
    generative: bool = False  # a causal language model's data: tsv_text are its columns, no labels

    @property
    def text_columns(self) -> tuple[str, ...]:
        return self.tsv_text

    @property
    def kind(self) -> str:
        """The task kind's name (kinds.KINDS): a regression has no class labels, a generation no labels at all."""
        if self.generative:
            return "generation"
        return "classification" if self.labels else "regression"

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    def split_tag(self, split: str) -> str:
        """Suffix that tells eval splits apart in metric names: '' for one split, 'm'/'mm' for MNLI."""
        return {"validation_matched": "m", "validation_mismatched": "mm"}.get(split, "")


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_MNLI_FILES = {
    "train": "train.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("sentence",),
            ("0", "1"),
            ("unacceptable", "acceptable"),
            "matthews",
            submission=("CoLA.tsv",),
            tsv_columns=("source", "label", "original_label", "sentence"),
        ),
        Task(
            "sst2",
            "SST-2",
            ("sentence",),
            "label",
            ("sentence",),
            ("0", "1"),
            ("negative", "positive"),
            "accuracy",
            submission=("SST-2.tsv",),
        ),
        Task(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("sentence1", "sentence2"),
            ("0", "1"),
            ("not_equivalent", "equivalent"),
            "accuracy_f1",
            submission=("MRPC.tsv",),
        ),
        Task(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            ("sentence1", "sentence2"),
            (),
            ("score",),
            "pearson_spearman",
            submission=("STS-B.tsv",),
        ),
        Task(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("question1", "question2"),
            ("0", "1"),
            ("not_duplicate", "duplicate"),
            "accuracy_f1",
            submission=("QQP.tsv",),
        ),
        Task(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("premise", "hypothesis"),
            _NLI3,
            _NLI3,
            "accuracy",
            eval_splits=("validation_matched", "validation_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
            submission=("MNLI-m.tsv", "MNLI-mm.tsv"),
            split_files=_MNLI_FILES,
        ),
        Task(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            "label",
            ("question", "sentence"),
            _NLI2,
            _NLI2,
            "accuracy",
            submission=("QNLI.tsv",),
        ),
        Task(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
            _NLI2,
            _NLI2,
            "accuracy",
            submission=("RTE.tsv",),
        ),
        Task(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
            ("0", "1"),
            ("not_entailment", "entailment"),
            "accuracy",
            submission=("WNLI.tsv",),
        ),
    ]
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def glue_name(name: str) -> str | None:
    """The registry name of a GLUE task (aliases and case allowed), or None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in TASKS else None


def get_task(name: str) -> Task:
    key = glue_name(name)
    if key is None:
        raise KdloraError(
            f"unknown task '{name}': choose one of {', '.join(TASKS)}, or bring your own data with --train-file"
        )
    return TASKS[key]


def metric_name(name: str) -> Metric:
    """A metric's canonical name ('mcc' -> 'matthews'), or a one-line error listing them."""
    key = name.strip().lower().replace("-", "_")
    key = METRIC_ALIASES.get(key, key)
    if key not in METRICS:
        raise KdloraError(f"unknown metric '{name}': choose one of {', '.join(METRICS)} (or mcc)")
    return key  # type: ignore[return-value]


def custom_task(
    name: str,
    text_columns: tuple[str, ...],
    label_column: str,
    labels: tuple[str, ...],
    metric: str | None,
) -> Task:
    """A task over the user's own data. `labels` are the class values in class-id order, () for regression. The
    default metric is accuracy (macro-F1 is reported beside it) or, for regression, the Pearson/Spearman mean."""
    regression = not labels
    chosen = metric_name(metric) if metric else ("pearson_spearman" if regression else "accuracy")
    if regression != (chosen in REGRESSION_METRICS):
        kind = "regression" if regression else "classification"
        raise KdloraError(f"metric {chosen} does not fit a {kind} task; use {_fitting(regression)}")
    if chosen in ("f1", "accuracy_f1") and len(labels) != 2:
        raise KdloraError(f"metric {chosen} is the binary F1 and this task has {len(labels)} classes: use macro_f1")
    return Task(
        name=name,
        glue_dir="",
        tsv_text=tuple(text_columns),
        tsv_label=label_column,
        hf_text=tuple(text_columns),
        labels=tuple(labels),
        label_names=tuple(labels) if labels else (label_column,),
        metric=chosen,
        custom=True,
    )


def _fitting(regression: bool) -> str:
    return ", ".join(m for m in METRICS if (m in REGRESSION_METRICS) == regression)


def task_of_model(name: str, config: dict) -> Task:
    """The task a saved classifier was trained for, as its config.json tells: a GLUE task by name, else one built
    from its label map (id2label, problem_type)."""
    if glue_name(name):
        return get_task(name)
    id2label = config.get("id2label") or {}
    n = config.get("num_labels") or len(id2label)
    if config.get("problem_type") == "regression" or n == 1:
        return custom_task(name, ("text",), "label", (), None)
    return custom_task(name, ("text",), "label", tuple(str(id2label.get(str(i), i)) for i in range(n)), None)
