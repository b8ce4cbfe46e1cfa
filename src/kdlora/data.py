"""GLUE data: read a split from TSV, `datasets` or a save_to_disk directory; tokenise; batch with dynamic padding.

Every example carries an integer `id` that is stable across runs (its row in the split), so cached teacher logits
are looked up by example and never by batch position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdlora.config import DataArgs
from kdlora.errors import KdloraError
from kdlora.tasks import Task, get_task


@dataclass(frozen=True)
class Example:
    id: int  # row index in the split (or the file's own index column for test sets)
    text_a: str
    text_b: str | None
    label: int | float | None  # class id, regression target, or None for unlabelled test rows


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _parse_label(raw: str, task: Task, where: str) -> int | float:
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise KdloraError(f"{where}: label {raw!r} is not a finite number; {task.name} is a regression task")
        return value
    if raw not in task.labels:
        raise KdloraError(f"{where}: unknown label {raw!r} for {task.name}; expected one of {', '.join(task.labels)}")
    return task.labels.index(raw)


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
        label = None if is_test else _parse_label(cells[col[task.tsv_label]], task, where)
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
        elif isinstance(label, str):
            label = _parse_label(label, task, f"{source} split '{split}' row {row}")
        elif task.is_regression:
            label = float(label)
        elif not 0 <= int(label) < task.num_labels:
            raise KdloraError(f"{source} split '{split}' row {row}: label {label} is outside 0..{task.num_labels - 1}")
        else:
            label = int(label)
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
    """Read one split of args.task from args.data_dir (GLUE TSV or save_to_disk) or from the `datasets` hub."""
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


def load_splits(args: DataArgs, splits: Sequence[str]) -> dict[str, list[Example]]:
    """Read the named splits and apply --max-train-samples / --max-eval-samples (the first N rows, as run_glue does)."""
    out = {}
    for split in splits:
        examples = read_split(args, split)
        cap = args.max_train_samples if split == "train" else args.max_eval_samples
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
        enc = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length)
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

    def __init__(self, tokenizer: Any, regression: bool) -> None:
        self.tokenizer = tokenizer
        self.regression = regression

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        inputs = dict(self.tokenizer.pad([it["features"] for it in items], return_tensors="pt"))
        labels = [it["label"] for it in items]
        return Batch(
            inputs=inputs,
            ids=torch.tensor([it["id"] for it in items], dtype=torch.long),
            labels=(
                torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
                if all(label is not None for label in labels)
                else None
            ),
            teacher_logits=torch.stack([it["teacher_logits"] for it in items])
            if "teacher_logits" in items[0]
            else None,
        )


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length, so dynamic padding wastes little.

    Indices are shuffled, cut into mega-batches of `mega` batches, each mega-batch is sorted by length and cut into
    batches, and the batches are shuffled again. Every index appears exactly once per epoch; the order depends only on
    (seed, epoch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
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


def eval_loader(dataset: TokenizedDataset, tokenizer: Any, batch_size: int, regression: bool) -> DataLoader:
    """Batches of `dataset` in length order, for prediction and evaluation."""
    return DataLoader(
        dataset, batch_sampler=eval_batches(dataset.lengths, batch_size), collate_fn=Collator(tokenizer, regression)
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
) -> Loaders:
    """The shuffled, length-grouped train loader and one loader per evaluation split. `teacher_rows` looks up the
    teacher's logits by example id, so they travel with their example through any shuffling."""
    train_ds = TokenizedDataset(splits["train"], tokenizer, max_length)
    if teacher_rows is not None:
        train_ds.teacher_logits = teacher_rows(train_ds.ids)
    sampler = LengthGroupedBatchSampler(train_ds.lengths, batch_size, seed)
    # The loader's own generator keeps it from drawing on the global RNG, which drives dropout and is checkpointed.
    train = DataLoader(
        train_ds,
        batch_sampler=sampler,
        collate_fn=Collator(tokenizer, task.is_regression),
        generator=torch.Generator().manual_seed(seed),
    )
    evals = {
        s: eval_loader(
            TokenizedDataset(splits[s], tokenizer, max_length), tokenizer, eval_batch_size, task.is_regression
        )
        for s in task.eval_splits
    }
    return Loaders(train, sampler, evals)
