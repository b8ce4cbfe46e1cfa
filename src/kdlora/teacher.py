"""The teacher's logits on the training set: computed once, in eval mode, and cached under a fingerprint.

The cache lives in the teacher's run directory (rundir.logits_path), one file per fingerprint, holding the example ids
beside the logits. The fingerprint covers the teacher weights, its tokenizer, the examples (ids, texts, labels), the
label map and max_length, so any change means a recompute and never a stale or misaligned row.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from kdlora.config import RunConfig
from kdlora.data import Collator, Example, TokenizedDataset, eval_batches, hash_examples, read_unlabeled, unlabeled_rest
from kdlora.errors import KdloraError
from kdlora.io import atomic_write_bytes
from kdlora.kinds import kind_of
from kdlora.models import load_masked_lm, load_saved
from kdlora.rundir import logits_path, merged_dir, read_run
from kdlora.tasks import Task

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "spm.model",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
)


@dataclass
class TeacherLogits:
    ids: torch.Tensor  # [N] example ids
    logits: torch.Tensor  # [N, C] fp32 teacher logits, row i belonging to example ids[i]

    def rows_for(self, ids: Sequence[int]) -> torch.Tensor:
        """The teacher logits of the given example ids, [len(ids), C], looked up by id and never by position."""
        pos = {int(i): row for row, i in enumerate(self.ids.tolist())}
        missing = [i for i in ids if int(i) not in pos]
        if missing:
            raise KdloraError(f"teacher logits are missing for example ids {missing[:5]}: recompute the teacher cache")
        return self.logits[[pos[int(i)] for i in ids]]


def _hash_files(h: Any, directory: Path, names: Sequence[str]) -> None:
    for name in names:
        path = directory / name
        if path.is_file():
            h.update(name.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)


def fingerprint(model_dir: Path, examples: Sequence[Example], task: Task, max_length: int) -> str:
    """sha256 over teacher weights, tokenizer files, label map, max_length and every example's id, texts and label."""
    h = hashlib.sha256()
    weights = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not weights:
        raise KdloraError(f"{model_dir} has no .safetensors weights")
    _hash_files(h, model_dir, weights)
    _hash_files(h, model_dir, _TOKENIZER_FILES)
    config = json.loads((model_dir / "config.json").read_text())
    h.update(json.dumps([task.name, config.get("id2label"), max_length], sort_keys=True).encode())
    hash_examples(h, examples)
    return h.hexdigest()


def teacher_model_dir(run_dir: Path, task: Task) -> Path:
    """The merged model of a finished run of any method on `task` (fft; lora and the distilled methods with their
    adapters merged in), or a clear error."""
    run = read_run(run_dir)
    if run is None:
        raise KdloraError(f"--teacher {run_dir} is not a finished kdlora run")
    if run.get("task") != task.name:
        raise KdloraError(f"--teacher {run_dir} was trained on {run.get('task')}, not {task.name}")
    model_dir = merged_dir(run_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("num_labels", len(config.get("id2label", {}))) != task.num_labels:
        raise KdloraError(
            f"--teacher {run_dir} has {config.get('num_labels')} labels; {task.name} has {task.num_labels}"
        )
    names = tuple(config.get("id2label", {}).get(str(i)) for i in range(task.num_labels))
    if task.custom and task.labels and names != task.label_names:
        raise KdloraError(f"--teacher {run_dir} has the labels {', '.join(map(str, names))}; "
                          f"this data has {', '.join(task.label_names)}")  # fmt: skip
    return model_dir


@torch.inference_mode()
def _compute(
    model_dir: Path,
    examples: Sequence[Example],
    task: Task,
    max_length: int,
    batch_size: int,
    device: torch.device,
    quiet: bool,
) -> torch.Tensor:
    from tqdm.auto import tqdm

    model, tokenizer = load_saved(model_dir)
    model = model.to(device).eval()
    dataset = TokenizedDataset(examples, tokenizer, max_length)
    collate = Collator(tokenizer, kind_of(task))
    logits = torch.empty(len(dataset), task.num_labels)
    for batch_idx in tqdm(eval_batches(dataset.lengths, batch_size), desc="teacher logits", disable=quiet):
        batch = collate([dataset[i] for i in batch_idx])
        out = model(**{k: v.to(device) for k, v in batch.inputs.items()}).logits
        logits[batch_idx] = out.float().cpu()
    del model  # the teacher is not kept in memory while the student trains
    gc.collect()
    return logits


def teacher_logits(
    run_dir: Path,
    examples: Sequence[Example],
    task: Task,
    max_length: int,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    quiet: bool = False,
    recompute: bool = True,
) -> tuple[TeacherLogits, bool]:
    """The teacher's logits for `examples`, from the cache when it matches, else computed and cached.

    Returns (logits, came_from_cache).
    """
    model_dir = teacher_model_dir(run_dir, task)
    fp = fingerprint(model_dir, examples, task, max_length)
    path = logits_path(run_dir, fp)
    ids = torch.tensor([e.id for e in examples], dtype=torch.long)
    cached = _load_cache(path, fp, ids, task.num_labels)
    if cached is not None:
        return cached, True
    if not recompute:
        raise KdloraError(
            f"no valid cached teacher logits for this teacher, data, tokenizer and label map (expected {path}); "
            "run without --no-recompute to compute them"
        )
    logits = _compute(model_dir, examples, task, max_length, batch_size, device or torch.device("cpu"), quiet)
    if not torch.isfinite(logits).all():
        raise KdloraError(f"the teacher in {run_dir} produced non-finite logits; retrain it")
    # Under a temporary name of its own: two runs distilling from one teacher may write the same cache at once.
    atomic_write_bytes(path, save({"ids": ids, "logits": logits}, metadata={"fingerprint": fp}))
    return TeacherLogits(ids, logits), False


def _load_cache(path: Path, fp: str, ids: torch.Tensor, num_labels: int) -> TeacherLogits | None:
    """The cached logits if the file is intact and matches fingerprint, ids and shape; None means recompute."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}  # own the memory: the file is mapped
    except Exception:  # a truncated or corrupted file is a cache miss, never a crash
        return None
    cached_ids, logits = tensors.get("ids"), tensors.get("logits")
    if (
        meta.get("fingerprint") != fp
        or cached_ids is None
        or logits is None
        or not torch.equal(cached_ids, ids)
        or tuple(logits.shape) != (len(ids), num_labels)
        or not torch.isfinite(logits).all()
    ):
        return None
    return TeacherLogits(cached_ids, logits)


# ---------------------------------------------------------------------------------------------------------------------
# A transfer set: more text for the teacher to label, made from the training set


def transfer_set(
    run_dir: Path,
    examples: Sequence[Example],
    task: Task,
    n: int,
    prob: float,
    neighbours: int,
    seed: int,
    mlm: str | None = None,
    trust_remote_code: bool = False,
) -> list[Example]:
    """`n` variants of each example with word pieces swapped, each piece with probability `prob`, for one of
    `neighbours` candidates: its nearest neighbours (cosine) in the teacher's input embeddings (TinyBERT's augmentation
    without a masked LM), or, given `mlm`, that masked LM's top predictions at the masked position (TinyBERT's). They
    carry no label: the teacher's logits are their only target. Deterministic in (examples, settings, seed); ids follow
    the training ids, so their teacher logits are looked up and cached like any example's."""
    if mlm:
        swap: Any = MaskedLMSwap(mlm, neighbours, trust_remote_code)
    else:
        swap = EmbeddingSwap(teacher_model_dir(run_dir, task), neighbours)
    texts = _swapped(swap, [e for _ in range(n) for e in examples], prob, seed)
    del swap  # the masked LM or the teacher's embeddings, gone before the student loads
    gc.collect()
    start = max(e.id for e in examples) + 1
    return [Example(start + i, a, b, None) for i, (a, b) in enumerate(texts)]


def noisy_view(
    run_dir: Path, examples: Sequence[Example], task: Task, first: int, prob: float, neighbours: int, seed: int
) -> list[Example]:
    """Noisy Student's view: the rows from `first` on (the transfer set) with word pieces swapped for their embedding
    neighbours, as `transfer_set` swaps them, but keeping their ids, so their target stays the teacher's logits on
    the clean text. The labelled rows are kept as they are: a swapped word can change the gold label (CoLA)."""
    swap = EmbeddingSwap(teacher_model_dir(run_dir, task), neighbours)
    texts = _swapped(swap, examples[first:], prob, seed)
    del swap
    gc.collect()
    return [*examples[:first], *(Example(e.id, a, b, None) for e, (a, b) in zip(examples[first:], texts, strict=True))]


@torch.inference_mode()
def _swapped(swap: Any, examples: Sequence[Example], prob: float, seed: int) -> list[tuple[str | None, str | None]]:
    """Each example's (text_a, text_b) with pieces swapped by `swap`; deterministic in (examples, prob, seed)."""
    tokenizer = swap.tokenizer
    pieces = [
        [tokenizer(t, add_special_tokens=False)["input_ids"] if t is not None else None for t in (e.text_a, e.text_b)]
        for e in examples
    ]
    g = torch.Generator().manual_seed(seed)
    # The random draws come first, in a fixed order, so the variants do not depend on how the masked LM is batched.
    plans = [[None if ids is None else (ids, *_draws(ids, prob, g)) for ids in pair] for pair in pieces]
    swapped = swap([text for pair in plans for text in pair if text is not None])
    decoded = iter(tokenizer.decode(ids) for ids in swapped)
    return [tuple(None if text is None else next(decoded) for text in pair) for pair in plans]  # type: ignore[misc]


def _neighbours(embeddings: torch.Tensor, used: list[int], k: int, special: set[int]) -> dict[int, list[int]]:
    """For each used piece, its k nearest other pieces by cosine similarity (special tokens excluded)."""
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    banned = torch.tensor(sorted(special), dtype=torch.long)
    table = {}
    for start in range(0, len(used), 512):  # [512, V] similarities at a time: flat memory in the vocabulary
        ids = torch.tensor(used[start : start + 512])
        sims = unit[ids] @ unit.T
        sims[torch.arange(len(ids)), ids] = -2.0  # never itself
        sims[:, banned] = -2.0
        top = sims.topk(k, dim=-1).indices.tolist()
        table.update(zip(ids.tolist(), top, strict=True))
    return table


def _draws(ids: list[int], prob: float, g: torch.Generator) -> tuple[list[bool], list[int]]:
    """Which pieces are swapped (each with probability `prob`) and a random pick per piece to choose its candidate."""
    chosen = [d < prob for d in torch.rand(len(ids), generator=g).tolist()]
    return chosen, torch.randint(0, 1 << 30, (len(ids),), generator=g).tolist()


class EmbeddingSwap:
    """Swaps each chosen piece for one of its k nearest neighbours in the teacher's input embeddings."""

    def __init__(self, model_dir: Path, k: int) -> None:
        model, self.tokenizer = load_saved(model_dir)
        self.embeddings = model.get_input_embeddings().weight
        self.k = k

    def __call__(self, texts: list[tuple[list[int], list[bool], list[int]]]) -> list[list[int]]:
        special = set(self.tokenizer.all_special_ids)
        used = sorted({i for ids, _, _ in texts for i in ids} - special)
        table = _neighbours(self.embeddings.float(), used, self.k, special)
        return [
            [table[i][p % len(table[i])] if c and i in table else i for i, c, p in zip(ids, chosen, picks, strict=True)]
            for ids, chosen, picks in texts
        ]


class MaskedLMSwap:
    """Swaps the chosen pieces of each text for one of the masked LM's top-k predictions at their position, all the
    text's chosen pieces masked at once (never the original piece, never a special token). Texts are in the masked
    LM's own tokenization; pieces past its longest input are kept as they are."""

    def __init__(self, name: str, k: int, trust_remote_code: bool = False, batch_size: int = 16) -> None:
        self.model, self.tokenizer = load_masked_lm(name, trust_remote_code)  # batch x length x vocabulary logits:
        # a small batch keeps them in memory
        self.k, self.batch_size = k, batch_size
        self.special = sorted(set(self.tokenizer.all_special_ids))
        # The special tokens around one text, read off an encoded probe (fast tokenizers have no build_inputs_*).
        probe, plain = (self.tokenizer("hello", add_special_tokens=a)["input_ids"] for a in (True, False))
        at = next(i for i in range(len(probe)) if probe[i : i + len(plain)] == plain)
        self.prefix, self.suffix = probe[:at], probe[at + len(plain) :]
        self.limit = min(self.tokenizer.model_max_length, 512) - len(self.prefix) - len(self.suffix)

    def __call__(self, texts: list[tuple[list[int], list[bool], list[int]]]) -> list[list[int]]:
        out = []
        for start in range(0, len(texts), self.batch_size):
            out += self._batch(texts[start : start + self.batch_size])
        return out

    def _batch(self, texts: list[tuple[list[int], list[bool], list[int]]]) -> list[list[int]]:
        tok, special = self.tokenizer, set(self.special)
        spots = [
            [j for j, i in enumerate(ids[: self.limit]) if chosen[j] and i not in special] for ids, chosen, _ in texts
        ]
        inputs = []
        for (ids, _, _), where in zip(texts, spots, strict=True):
            masked = list(ids[: self.limit])
            for j in where:
                masked[j] = tok.mask_token_id
            inputs.append(self.prefix + masked + self.suffix)
        width = max(map(len, inputs))
        input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in inputs])
        attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logits[..., self.special] = float("-inf")
        out = []
        for row, ((ids, _, picks), where) in enumerate(zip(texts, spots, strict=True)):
            new = list(ids)
            for j in where:
                scores = logits[row, len(self.prefix) + j]
                scores[ids[j]] = float("-inf")  # a swap changes the piece
                new[j] = scores.topk(self.k).indices.tolist()[picks[j] % self.k]
            out.append(new)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# What a distilled run trains on


def distil_examples(cfg: RunConfig, task: Task, teacher_run: Path | None, train: list[Example]) -> list[Example]:
    """What the student trains on: the training set, then the transfer set (distilled only): --augment's variants of
    the training examples, the rows --label-budget left out (--unlabeled-rest) and the rows of --unlabeled-file."""
    kd, out = cfg.kd, list(train)
    if teacher_run is None:
        return out
    if kd.augment:
        out += transfer_set(
            teacher_run, train, task, kd.augment, kd.augment_prob, kd.augment_neighbours, cfg.train.seed,
            kd.augment_mlm, cfg.model.trust_remote_code,
        )  # fmt: skip
    if kd.unlabeled_rest:  # the rows keep their ids: they are rows of the training split, unlike the file's
        out += unlabeled_rest(cfg.data, task)
    if kd.unlabeled_file:
        out += read_unlabeled(kd.unlabeled_file, task, first_id=max(e.id for e in out) + 1)
    return out


def distil_targets(
    cfg: RunConfig, task: Task, teacher_run: Path | None, train: list[Example], accelerator: Any, quiet: bool
) -> tuple[Any, dict[str, Any]]:
    """The teacher's logits on the training set (cached by the main process first) and what to record of them."""
    if teacher_run is None:
        return None, {}
    t0 = time.perf_counter()
    with accelerator.main_process_first():  # the main process computes and caches, the others read the cache
        logits, cached = teacher_logits(
            teacher_run,
            train,
            task,
            cfg.data.max_length,
            batch_size=cfg.train.eval_batch_size,
            device=accelerator.device,
            quiet=quiet,
            recompute=not cfg.kd.no_recompute,
        )
    teacher = read_run(teacher_run) or {}
    return logits, {
        "teacher": str(teacher_run),
        "teacher_score": teacher.get("score"),
        "teacher_total_params": teacher.get("total_params"),
        "teacher_logits_cached": cached,
        "teacher_logits_seconds": time.perf_counter() - t0,
    }
