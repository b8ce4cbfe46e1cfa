"""The GLUE task registry: columns, labels, metric, splits and file names of each task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdlora.errors import KdloraError

Metric = Literal["matthews", "pearson_spearman", "accuracy_f1", "accuracy"]


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

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

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


def get_task(name: str) -> Task:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise KdloraError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
    return TASKS[key]
