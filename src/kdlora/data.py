"""Data: read a split (GLUE TSV, `datasets`, save_to_disk, or the user's own CSV/TSV/JSON/JSONL/Parquet files);
tokenise; batch with dynamic padding.

Every example carries an integer `id` that is stable across runs (its row in the split), so cached teacher logits
are looked up by example and never by batch position.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdlora.config import DataArgs
from kdlora.errors import KdloraError
from kdlora.io import require_file
from kdlora.kinds import Kind, kind_of, label_key
from kdlora.tasks import Task, custom_task, get_task


@dataclass(frozen=True)
class Example:
    id: int  # row index in the split (or the file's own index column for test sets)
    text_a: str
    text_b: str | None
    label: int | float | None  # class id, regression target, or None for unlabelled test rows
    key: str | None = None  # the user's own id (--id-column), carried into predictions


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_glue_tsv(path: str | Path, task: Task, split: str) -> list[Example]:
    """Read one file of the original GLUE distribution.

    Quirks handled: CoLA's train/dev have no header; MRPC starts with a UTF-8 BOM and its sentences contain bare `"`
    characters, so fields are split on tabs with no quoting at all; RTE/QNLI/MNLI labels are strings.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KdloraError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    is_test = split.startswith("test")
    if task.tsv_columns and not is_test:
        header, body, first_line = list(task.tsv_columns), lines, 1
    else:
        if not lines:
            raise KdloraError(f"{path} is empty: expected a header row and data rows")
        header, body, first_line = lines[0].split("\t"), lines[1:], 2
    needed = list(task.tsv_text) + ([] if is_test else [task.tsv_label])
    missing = [c for c in needed if c not in header]
    if missing:
        raise KdloraError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} for {task.name}; "
            f"found {', '.join(repr(c) for c in header)}"
        )
    col = {c: header.index(c) for c in needed}
    id_col = next((header.index(c) for c in ("index", "id") if is_test and c in header), None)
    examples = []
    for row, line in enumerate(body):
        where = f"{path}:{row + first_line}"
        if not line.strip():
            raise KdloraError(f"{where}: empty row; remove it or fix the file")
        cells = line.split("\t")
        if len(cells) != len(header):
            raise KdloraError(f"{where}: row has {len(cells)} columns, the header has {len(header)} (a ragged row)")
        texts = [cells[col[c]] for c in task.tsv_text]
        if id_col is not None:
            try:
                ex_id = int(cells[id_col])
            except ValueError:
                raise KdloraError(f"{where}: index {cells[id_col]!r} is not an integer") from None
        else:
            ex_id = row
        label = None if is_test else kind_of(task).label(cells[col[task.tsv_label]], task, where)
        examples.append(Example(ex_id, texts[0], texts[1] if len(texts) > 1 else None, label))
    return examples


def _from_hf(rows: Any, task: Task, split: str, text_cols: Sequence[str], source: str) -> list[Example]:
    """Convert a `datasets.Dataset` with GLUE columns (HF or TSV names) to examples."""
    columns = set(rows.column_names)
    missing = [c for c in text_cols if c not in columns]
    if missing:
        raise KdloraError(f"{source} split '{split}' lacks column(s) {missing}; found {sorted(columns)}")
    label_col = "label" if "label" in columns else None
    is_test = split.startswith("test")
    if label_col is None and not is_test:
        raise KdloraError(f"{source} split '{split}' has no 'label' column")
    examples = []
    for row, item in enumerate(rows):
        ex_id = int(item["idx"]) if "idx" in item else row
        label = item.get(label_col) if label_col else None
        if is_test or label is None or label == -1:
            label = None
        else:  # a label as written, or a ClassLabel's class id
            label = kind_of(task).label(label, task, f"{source} split '{split}' row {row}")
        texts = [item[c] for c in text_cols]
        examples.append(Example(ex_id, texts[0], texts[1] if len(texts) > 1 else None, label))
    return examples


def _find_local_source(data_dir: Path, task: Task) -> tuple[str, Path]:
    if not data_dir.is_dir():
        raise KdloraError(f"--data-dir {data_dir} does not exist or is not a directory")
    for candidate in (data_dir / task.glue_dir, data_dir / task.name, data_dir):
        if (candidate / "dataset_dict.json").is_file():
            return "disk", candidate
        if (candidate / task.split_files["train"]).is_file():
            return "tsv", candidate
    raise KdloraError(
        f"--data-dir {data_dir} has no {task.name} data: expected {data_dir / task.glue_dir / 'train.tsv'} "
        f"(GLUE format) or a save_to_disk directory"
    )


def read_split(args: DataArgs, split: str) -> list[Example]:
    """Read one split: the user's own data, or args.task from args.data_dir (GLUE TSV or save_to_disk) or the hub."""
    if args.custom:
        task = load_task(args)
        rows, source = custom_rows(args, split)
        return _custom_examples(rows, task, args, split, source)
    task = get_task(args.task)
    if args.data_dir:
        kind, where = _find_local_source(Path(args.data_dir), task)
        if kind == "tsv":
            path = where / task.split_files[split]
            if not path.is_file():
                raise KdloraError(f"{path} does not exist: the {task.name} '{split}' split is missing")
            return read_glue_tsv(path, task, split)
        import datasets

        dd = datasets.load_from_disk(str(where))
        if split not in dd:
            raise KdloraError(f"{where} has no split '{split}'; it has {', '.join(dd.keys())}")
        text_cols = task.hf_text if all(c in dd[split].column_names for c in task.hf_text) else task.tsv_text
        return _from_hf(dd[split], task, split, text_cols, str(where))
    import datasets

    try:
        rows = datasets.load_dataset(args.dataset, task.name, split=split)
    except Exception as exc:  # offline, unknown name, ...: one line that says what to do instead
        raise KdloraError(
            f"could not load {args.dataset}/{task.name} from the Hugging Face hub ({type(exc).__name__}); "
            "pass --data-dir with GLUE TSVs or a save_to_disk directory"
        ) from exc
    return _from_hf(rows, task, split, task.hf_text, args.dataset)


# ---------------------------------------------------------------------------------------------------------------------
# Your own data: files read with `datasets`' local builders, a dataset by name, or a save_to_disk directory

FILE_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
# Column names tried, in order, when --text-columns is not given.
TEXT_GUESSES = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("text",),
    ("sentence",),
)


def load_task(args: DataArgs) -> Task:
    """The task of `args`: a GLUE task from the registry, or one built from the user's training split (its text and
    label columns; the labels, sorted, unless --labels fixes them; regression when the labels are floats)."""
    if not args.custom:
        return get_task(args.task)
    rows, source = custom_rows(args, "train")
    text_columns = tuple(args.text_columns or _guess_text_columns(rows.column_names, source))
    require_columns(rows.column_names, [*text_columns, args.label_column], source)
    values = rows[args.label_column]
    dtype = getattr(rows.features[args.label_column], "dtype", "")
    regression = args.problem == "regression" or (args.problem == "auto" and dtype.startswith("float"))
    if regression:
        return custom_task(args.task, text_columns, args.label_column, (), args.metric)
    if any(v is None for v in values):
        row = next(i for i, v in enumerate(values) if v is None)
        raise KdloraError(f"{source} row {row + 1}: the label column '{args.label_column}' is empty")
    found = sorted({label_key(v) for v in values}, key=_label_order)
    if args.labels:
        unknown = [v for v in found if v not in args.labels]
        if unknown:
            raise KdloraError(f"{source} has label(s) {', '.join(unknown[:5])} not in --labels {','.join(args.labels)}")
    if len(found) < 2:
        raise KdloraError(
            f"{source}: the training split has a single class ({', '.join(found)}): a classifier needs two or more"
        )
    return custom_task(args.task, text_columns, args.label_column, tuple(args.labels or found), args.metric)


def _label_order(key: str) -> tuple[int, float, str]:
    try:
        return (0, float(key), key)  # numbers in numeric order: 2 before 10
    except ValueError:
        return (1, 0.0, key)


def _guess_text_columns(columns: Sequence[str], source: str) -> tuple[str, ...]:
    for guess in TEXT_GUESSES:
        if all(c in columns for c in guess):
            return guess
    raise KdloraError(
        f"{source}: pass --text-columns (one column, or two for a pair); found columns {', '.join(columns)}"
    )


def require_columns(columns: Sequence[str], needed: Sequence[str], source: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise KdloraError(
            f"{source} has no column {', '.join(repr(c) for c in missing)}; found {', '.join(repr(c) for c in columns)}"
        )


def custom_rows(args: DataArgs, split: str) -> tuple[Any, str]:
    """The rows of one split of the user's data (a `datasets.Dataset`) and where they came from, for messages."""
    if args.train_file:
        path = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}[split]
        if path is None:
            raise KdloraError(f"no --{split}-file was given")
        p = require_file(path)
        stat = p.stat()
        return read_table(str(p.resolve()), stat.st_mtime_ns, stat.st_size), path
    name = args.validation_split if split == "validation" else split
    return _dataset_split(args.dataset, args.dataset_config, name), f"{args.dataset} split '{name}'"


@functools.lru_cache(maxsize=8)
def read_table(path: str, mtime_ns: int = 0, size: int = 0) -> Any:
    """One data file as a `datasets.Dataset`, in memory; cached per (path, modification time, size)."""
    import datasets

    suffix = Path(path).suffix.lower()
    if suffix not in FILE_TYPES:
        raise KdloraError(f"{path}: unknown file type '{suffix}'; use {', '.join(FILE_TYPES)}")
    if size == 0 and Path(path).stat().st_size == 0:
        raise KdloraError(f"{path} is empty")
    builder, options = FILE_TYPES[suffix]
    quiet = logging.getLogger("datasets")  # it logs a parse error before raising it: the error is said once, below
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as cache:  # no stale cache of an edited file, and nothing left behind
        try:
            rows = datasets.load_dataset(
                builder, data_files=path, split="train", cache_dir=cache, keep_in_memory=True, **options
            )
        except Exception as exc:  # pandas/pyarrow parse errors: one line that names the file and the reader's cause
            if "corresponds to no data" in str(exc):
                raise KdloraError(f"{path} has no data rows") from None
            cause = reader_cause(exc)
            reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise KdloraError(f"could not read {path} as {builder}: {reason[:200]}") from exc
        finally:
            quiet.setLevel(level)
    if len(rows) == 0:
        raise KdloraError(f"{path} has no data rows")
    if suffix in (".csv", ".tsv"):
        check_row_count(Path(path), suffix, len(rows))
    return rows


def check_row_count(path: Path, suffix: str, read: int) -> None:
    """The rows a parser read of a CSV/TSV file against a second, independent count (Python's csv module, quotes
    and all): a quote that one of them reads as a field spanning lines and the other does not would otherwise drop
    rows without a word."""
    import csv

    with path.open(encoding="utf-8-sig", newline="") as f:
        records = sum(1 for row in csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",") if row)
    if records - 1 != read:  # the header is a record to csv, not a row
        raise KdloraError(
            f"{path}: read {read} rows, but the file holds {records - 1} by a second count; a quote character "
            "that opens a cell it never closes is the usual cause (quote the cell, or remove the quote)"
        )


def reader_cause(exc: BaseException) -> BaseException:
    """The parser's own error under the ones `datasets` wraps it in ("An error occurred while generating the
    dataset"): it names the line or row ("EOF inside string starting at row 6")."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


@functools.lru_cache(maxsize=8)
def _dataset_split(name: str, config: str | None, split: str) -> Any:
    import datasets

    if Path(name).expanduser().is_dir():
        try:
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
        except Exception as exc:
            raise KdloraError(f"{name} is not a save_to_disk directory ({type(exc).__name__})") from exc
        if isinstance(loaded, datasets.Dataset):
            raise KdloraError(f"{name} holds one split; save a DatasetDict with train and validation splits")
        if split not in loaded:
            raise KdloraError(f"{name} has no split '{split}'; it has {', '.join(loaded)} (see --validation-split)")
        return loaded[split]
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name or split: one line
        raise KdloraError(
            f"could not load split '{split}' of dataset {name} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); pass --train-file with local files"
        ) from exc


def _custom_examples(rows: Any, task: Task, args: DataArgs, split: str, source: str) -> list[Example]:
    """Examples of one split of the user's data, every cell checked: text present and textual, labels known (a
    validation label never seen in training is an error), regression targets finite, ids unique."""
    labelled = split != "test"
    needed = [
        *task.text_columns,
        *([task.tsv_label] if labelled else []),
        *([args.id_column] if args.id_column else []),
    ]
    require_columns(rows.column_names, needed, source)
    columns = {c: rows[c] for c in needed}
    examples, seen = [], set()
    for row in range(len(rows)):
        where = f"{source} row {row + 1}"
        texts = []
        for c in task.text_columns:
            value = columns[c][row]
            if not isinstance(value, str):
                kind = "empty" if value is None else f"not text ({value!r})"
                raise KdloraError(f"{where}: column '{c}' is {kind}")
            if not value.strip():
                raise KdloraError(f"{where}: column '{c}' is empty")
            texts.append(value)
        label = columns[task.tsv_label][row] if labelled else None
        if labelled:
            label = _custom_label(label, task, where)
        key = None
        if args.id_column:
            key = label_key(columns[args.id_column][row])
            if key in seen:
                raise KdloraError(f"{where}: id {key!r} in column '{args.id_column}' appears twice")
            seen.add(key)
        examples.append(Example(row, texts[0], texts[1] if len(texts) > 1 else None, label, key))
    return examples


def _custom_label(value: Any, task: Task, where: str) -> int | float:
    if value is None:
        raise KdloraError(f"{where}: the label column '{task.tsv_label}' is empty")
    return kind_of(task).label(value, task, where)


def hash_examples(h: Any, examples: Sequence[Example]) -> None:
    """Feed every example's id, texts and label to the hash `h`: the data part of every fingerprint."""
    for e in examples:
        h.update(json.dumps([e.id, e.text_a, e.text_b, e.label]).encode())


def data_fingerprint(examples: Sequence[Example], task: Task) -> str:
    """sha256 of a split's examples (ids, texts, labels) and the task's label map: which data a model saw."""
    h = hashlib.sha256(json.dumps([task.name, task.labels, task.text_columns]).encode())
    hash_examples(h, examples)
    return h.hexdigest()


def label_draw(examples: Sequence[Example], task: Task, budget: int, seed: int) -> tuple[list[Example], list[Example]]:
    """--label-budget: (the `budget` examples that keep their labels, the rest), drawn at random within each class
    (regression: each quintile of the scores), in proportion to the strata's sizes and at least one from each, so every
    class is kept. Both lists keep the split's order; the draw depends on the examples and the seed only."""
    if budget >= len(examples):
        raise KdloraError(
            f"--label-budget {budget} keeps every one of the {len(examples)} training examples: give fewer"
        )
    strata = [s for s in kind_of(task).strata([e.label for e in examples]) if s]
    if budget < len(strata):
        raise KdloraError(f"--label-budget {budget} cannot keep one example of each of the {len(strata)} classes")
    # Proportional shares by largest remainder, then at least one from each stratum (taken from the largest).
    shares = [budget * len(s) / len(examples) for s in strata]
    counts = [math.floor(x) for x in shares]
    for k in sorted(range(len(strata)), key=lambda k: counts[k] - shares[k])[: budget - sum(counts)]:
        counts[k] += 1
    for k in range(len(strata)):
        if counts[k] == 0:
            counts[k] = 1
            counts[max(range(len(strata)), key=lambda j: counts[j])] -= 1
    rng = random.Random(seed)
    kept = {i for s, n in zip(strata, counts, strict=True) for i in rng.sample(s, n)}
    return [e for i, e in enumerate(examples) if i in kept], [e for i, e in enumerate(examples) if i not in kept]


def training_rows(args: DataArgs, task: Task) -> tuple[list[Example], list[Example]]:
    """The training split after --max-train-samples, split by --label-budget into (labelled, the rest); without a
    budget the rest is empty."""
    examples = read_split(args, "train")
    if args.max_train_samples is not None:
        examples = examples[: args.max_train_samples]
    if not args.label_budget:
        return examples, []
    return label_draw(examples, task, args.label_budget, args.label_seed)


def unlabeled_rest(args: DataArgs, task: Task) -> list[Example]:
    """--unlabeled-rest: the training rows that --label-budget leaves out, their labels dropped (distilled only)."""
    return [dataclasses.replace(e, label=None) for e in training_rows(args, task)[1]]


def load_splits(args: DataArgs, splits: Sequence[str]) -> dict[str, list[Example]]:
    """Read the named splits and apply --max-train-samples / --max-eval-samples (the first N rows, as run_glue does)
    and --label-budget (a stratified draw of the training rows)."""
    out = {}
    for split in splits:
        if split == "train":
            cap = args.max_train_samples
            examples = training_rows(args, load_task(args))[0]
        else:
            cap = args.max_eval_samples
            examples = read_split(args, split)
            if cap is not None:
                examples = examples[:cap]
        if not examples:
            raise KdloraError(
                f"the {args.task} '{split}' split is empty"
                + (" after the sample cap: raise --max-train-samples / --max-eval-samples" if cap is not None else "")
            )
        out[split] = examples
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tokenising and batching


class TokenizedDataset(Dataset):
    """Tokenised examples: each item holds input ids (unpadded), the example id, the label and, when distilling, the
    teacher's logits for that example."""

    def __init__(
        self, examples: Sequence[Example], tokenizer: Any, max_length: int, teacher_logits: torch.Tensor | None = None
    ) -> None:
        texts_a = [e.text_a for e in examples]
        texts_b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
        limit = tokenizer.model_max_length  # the model's position table (models.prepare_tokenizer): cut, never crash
        enc = tokenizer(texts_a, texts_b, truncation=True, max_length=min(max_length, limit or max_length))
        self.features = [{k: enc[k][i] for k in enc.keys()} for i in range(len(examples))]
        self.ids = [e.id for e in examples]
        self.labels = [e.label for e in examples]
        self.lengths = [len(f["input_ids"]) for f in self.features]
        self.teacher_logits = teacher_logits  # [N, C], row i belongs to example ids[i]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"features": self.features[i], "id": self.ids[i], "label": self.labels[i]}
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[i]
        return item


class Batch(NamedTuple):
    """One collated batch: what the model reads, kept apart from what the loop and the metrics read.

    A NamedTuple, so accelerate moves every tensor in it to the device and shards it like any tuple."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, ...: [B, L], L the batch's longest sequence
    ids: torch.Tensor  # [B] example ids
    labels: torch.Tensor | None  # [B] class ids (long) or regression targets (float); None for unlabelled rows
    teacher_logits: torch.Tensor | None  # [B, C] the teacher's logits of these examples, when distilling


class Collator:
    """Pad a batch to its own longest sequence (dynamic padding), never to max_length."""

    def __init__(self, tokenizer: Any, kind: Kind) -> None:
        self.tokenizer, self.kind = tokenizer, kind

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        inputs = dict(self.tokenizer.pad([it["features"] for it in items], return_tensors="pt"))
        labels = [it["label"] for it in items]
        teacher = torch.stack([it["teacher_logits"] for it in items]) if "teacher_logits" in items[0] else None
        # A distillation batch always carries labels, even when every row in it is a transfer row (the loss then
        # masks them all); only an unlabelled split without teacher targets (a test set) has none.
        has_labels = teacher is not None or any(label is not None for label in labels)
        return Batch(
            inputs=inputs,
            ids=torch.tensor([it["id"] for it in items], dtype=torch.long),
            labels=self.kind.labels_tensor(labels) if has_labels else None,  # None: a transfer row, distilled only
            teacher_logits=teacher,
        )


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length, so dynamic padding wastes little.

    Indices are shuffled, cut into mega-batches of `mega` batches, each mega-batch is sorted by length and cut into
    batches, and the batches are shuffled again. Every index appears exactly once per epoch; the order depends only on
    (seed, epoch).

    With `sampled`: the first `fixed` indices (the labelled rows) are in every epoch, and `sampled` of the others (the
    transfer set) are drawn anew each epoch, so a large transfer set sets the epoch's cost by its share, not its size.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50,
                 fixed: int | None = None, sampled: int | None = None) -> None:  # fmt: skip
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega
        self.fixed, self.sampled = fixed, sampled
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def rows(self) -> int:
        """Rows per epoch."""
        return len(self.lengths) if self.sampled is None else self.fixed + self.sampled

    def __len__(self) -> int:
        return (self.rows + self.batch_size - 1) // self.batch_size

    def epoch_rows(self, g: torch.Generator) -> list[int]:
        if self.sampled is None:
            return list(range(len(self.lengths)))
        rest = torch.randperm(len(self.lengths) - self.fixed, generator=g)[: self.sampled] + self.fixed
        return [*range(self.fixed), *rest.tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        rows = self.epoch_rows(g)
        order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        size = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches in length order: the least padding; predictions are matched back by example id."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def eval_loader(dataset: TokenizedDataset, tokenizer: Any, batch_size: int, kind: Kind) -> DataLoader:
    """Batches of `dataset` in length order, for prediction and evaluation."""
    return DataLoader(
        dataset, batch_sampler=eval_batches(dataset.lengths, batch_size), collate_fn=Collator(tokenizer, kind)
    )


@dataclass
class Loaders:
    train: DataLoader
    sampler: LengthGroupedBatchSampler  # the train loader's, whose epoch the loop sets
    eval: dict[str, DataLoader]  # one per evaluation split


def build_loaders(
    splits: dict[str, list[Example]],
    tokenizer: Any,
    task: Task,
    max_length: int,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    teacher_rows: Callable[[Sequence[int]], torch.Tensor] | None = None,
    labelled: int | None = None,
    transfer_per_epoch: int | None = None,
) -> Loaders:
    """The shuffled, length-grouped train loader and one loader per evaluation split (with `transfer_per_epoch`,
    each epoch holds the first `labelled` training rows and that many others drawn anew). `teacher_rows` looks up the
    teacher's logits by example id, so they travel with their example through any shuffling."""
    train_ds = TokenizedDataset(splits["train"], tokenizer, max_length)
    if teacher_rows is not None:
        train_ds.teacher_logits = teacher_rows(train_ds.ids)
    sampler = LengthGroupedBatchSampler(train_ds.lengths, batch_size, seed, fixed=labelled, sampled=transfer_per_epoch)
    # The loader's own generator keeps it from drawing on the global RNG, which drives dropout and is checkpointed.
    train = DataLoader(
        train_ds,
        batch_sampler=sampler,
        collate_fn=Collator(tokenizer, kind_of(task)),
        generator=torch.Generator().manual_seed(seed),
    )
    evals = {
        s: eval_loader(TokenizedDataset(splits[s], tokenizer, max_length), tokenizer, eval_batch_size, kind_of(task))
        for s in task.eval_splits
    }
    return Loaders(train, sampler, evals)


# ---------------------------------------------------------------------------------------------------------------------
# Raw rows to predict: streamed, so memory stays flat in the file's size

RAW_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")


def iter_raw_rows(
    path: str | Path, text_columns: Sequence[str] | None, id_column: str | None = None
) -> Iterator[tuple[str, str, str | None]]:
    """(id, text, second text or None) per row of a CSV/TSV/JSONL/JSON/Parquet file, or per line of a text file.
    The id is the --id-column value, else the row number from 0. Without `text_columns` they are guessed as in
    training (text, sentence, sentence1+sentence2, ...). Every cell is checked as it is read."""
    path = require_file(path)
    suffix = path.suffix.lower()
    if suffix not in RAW_TYPES:
        raise KdloraError(f"{path}: unknown file type '{suffix}'; use {', '.join(RAW_TYPES)}")
    if path.stat().st_size == 0:
        raise KdloraError(f"{path} is empty")
    if suffix == ".txt":
        if text_columns and len(text_columns) > 1:
            raise KdloraError(f"{path}: a text file holds one text a line; a pair model needs a CSV or JSONL file")
        yield from _txt_rows(path)
        return
    columns: tuple[str, ...] | None = None
    for row, record in enumerate(_records(path, suffix)):
        where = f"{path} row {row + 1}"
        if not isinstance(record, dict):
            raise KdloraError(f"{where}: expected an object with named fields, got {type(record).__name__}")
        if columns is None:
            columns = tuple(text_columns or _guess_text_columns(list(record), str(path)))
            require_columns(list(record), [*columns, *([id_column] if id_column else [])], str(path))
        texts = []
        for c in columns:
            value = record.get(c)
            if not isinstance(value, str) or not value.strip():
                raise KdloraError(f"{where}: column '{c}' is {'empty' if not value else f'not text ({value!r})'}")
            texts.append(value)
        key = label_key(record[id_column]) if id_column else str(row)
        yield key, texts[0], texts[1] if len(texts) > 1 else None


def read_unlabeled(path: str | Path, task: Task, first_id: int) -> list[Example]:
    """The user's unlabelled text for the transfer set, with ids from `first_id` and no labels. The text columns are
    the training data's for the user's own task, else guessed (text, sentence, sentence1+sentence2, ...); a row must
    hold one text for a single-text task and two for a pair task."""
    pair = len(task.hf_text) > 1
    rows = iter_raw_rows(path, task.text_columns if task.custom else None)
    examples = []
    for i, (_, text_a, text_b) in enumerate(rows):
        if (text_b is not None) != pair:
            want, got = ("a pair of texts", "one") if pair else ("one text", "two")
            raise KdloraError(f"{path}: {task.name} takes {want} per example; its rows have {got}")
        examples.append(Example(first_id + i, text_a, text_b, None))
    return examples


def _txt_rows(path: Path) -> Iterator[tuple[str, str, None]]:
    with path.open(encoding="utf-8-sig") as f:
        for row, line in enumerate(f):
            text = line.rstrip("\r\n")
            if not text.strip():
                raise KdloraError(f"{path} line {row + 1} is empty: one text a line")
            yield str(row), text, None


def _records(path: Path, suffix: str) -> Iterator[Any]:
    """The file's records one by one (a .json array is the one format read whole). CSV and TSV go through pandas'
    parser with the training reader's options (FILE_TYPES; `datasets`' csv builder is pandas), a chunk at a time, so
    predict and train accept the same files and read the same rows: an unclosed quote is an error in both, never
    a row that swallows the rest of the file."""
    try:
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            options = FILE_TYPES[suffix][1]
            chunks = pd.read_csv(
                path, sep=options.get("delimiter", ","), dtype=str, keep_default_na=False, encoding="utf-8-sig",
                chunksize=1024,
            )  # fmt: skip
            read = 0
            for chunk in chunks:
                read += len(chunk)
                yield from chunk.to_dict("records")
            check_row_count(path, suffix, read)
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as exc:  # its own "line 1" is the line's, not the file's
                            where = f"{path} line {number}, column {exc.colno}"
                            raise KdloraError(f"could not read {where}: {exc.msg}") from None
                        yield record
        elif suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8-sig"))
            yield from records if isinstance(records, list) else [records]
        else:
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise KdloraError(f"could not read {path}: {message[:200]}") from None
