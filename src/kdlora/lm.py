"""Generative KD-LoRA: a causal LM teacher distilled into a smaller LoRA student, token by token, by the one loop.

    kdlora train --method kd-lora --train-file train.jsonl --validation-file dev.jsonl \\
        --prompt-column prompt --completion-column completion --teacher-model TEACHER --model STUDENT

What differs from a classifier is all here, behind train's pipeline seam (`PIPELINE`): rows are a prompt and its
completion, chat messages or a text (lm_data.encode); the teacher's targets are its top-k distribution on every learnt
token, cached once under a fingerprint (topk_cache); the step trains on the last hidden states and the LM head a chunk
of tokens at a time (losses.chunked_lm_kd_sum), its sums divided by the learnt tokens of the whole optimizer step, on
every process; each epoch reads NLL, perplexity, KL to the teacher, top-1 agreement and, by greedy decoding,
exact match. train.run, train.fit (lr plan, collapse restarts) and loop.loop are the classifier's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdlora import __version__, rundir
from kdlora.config import DISTILLED, LORA_METHODS, DataArgs, RunConfig
from kdlora.data import LengthGroupedBatchSampler, Loaders, custom_rows, iter_raw_rows, require_columns
from kdlora.env import default_device, peak_memory, say
from kdlora.errors import KdloraError
from kdlora.evaluate import PredictionWriter, chunks
from kdlora.io import atomic_write_text
from kdlora.kinds import GENERATION
from kdlora.lm_data import LMRow, encode, shared_vocabulary
from kdlora.loop import Parts, build_accelerator, build_optimizer, restore
from kdlora.losses import chunked_lm_kd_sum, student_buckets, token_divergence
from kdlora.lrfind import BANDS, plot, probe_steps, range_test
from kdlora.models import (
    add_lm_lora,
    causal_lm_config,
    causal_lm_source,
    count_parameters,
    deployed_parameters,
    keep_layers,
    load_causal_lm,
    load_lm_tokenizer,
    lora_targets,
)
from kdlora.tasks import Task
from kdlora.topk_cache import TopKCache, fill_from_model, predicted

GENERATIONS = rundir.GENERATIONS  # the best epoch's greedy completions of the first validation rows
TOPK = "topk"  # the teacher's top-k caches, one directory per fingerprint, in the teacher's run directory
CHUNK = 256  # tokens per chunk of the loss: one [CHUNK, V] logits tensor at a time


# ---------------------------------------------------------------------------------------------------------------------
# Rows


def lm_task(data: DataArgs) -> Task:
    """The task of a language model's data: its name and columns; no labels, no classifier metric."""
    columns = tuple(c for c in (data.prompt_column, data.completion_column, data.messages_column, data.text_column)
                    if c)  # fmt: skip
    return Task(data.task, "", columns, "", (), (), (), "accuracy", test_splits=(), custom=True, generative=True)


def _cell(value: Any, where: str, column: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise KdloraError(
            f"{where}: column '{column}' must hold {'a' if empty else 'a non-empty'} string, got {value!r}"
        )
    return value


def _messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    turns = list(value) if isinstance(value, (list, tuple)) else None
    if not turns or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                            and isinstance(t.get("content"), str) for t in turns):  # fmt: skip
        raise KdloraError(
            f"{where}: column '{column}' must hold a list of {{role, content}} turns, got {value!r}"[:300]
        )
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def read_rows(data: DataArgs, split: str) -> list[LMRow]:
    """One split of a language model's data, every cell checked (`--max-train-samples`/`--max-eval-samples` kept)."""
    rows, source = custom_rows(data, split)
    columns = list(lm_task(data).tsv_text)
    require_columns(rows.column_names, columns, source)
    limit = data.max_train_samples if split == "train" else data.max_eval_samples
    out = []
    for i, r in enumerate(rows):
        if limit is not None and i >= limit:
            break
        where = f"{source} row {i + 1}"
        if data.text_column:
            out.append(LMRow(i, text=_cell(r[data.text_column], where, data.text_column)))
        elif data.messages_column:
            out.append(LMRow(i, messages=_messages(r[data.messages_column], where, data.messages_column)))
        else:
            prompt = _cell(r[data.prompt_column], where, data.prompt_column, empty=True)
            out.append(
                LMRow(i, prompt=prompt, completion=_cell(r[data.completion_column], where, data.completion_column))
            )
    if not out:
        raise KdloraError(f"{source} has no rows")
    return out


@dataclass(frozen=True)
class Encoded:
    """One row as the model reads it: input ids, labels (IGNORE where nothing is learnt), the prompt's ids (what a
    greedy completion starts from) and the completion as written (what exact match compares to)."""

    id: int
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str | None


def encode_rows(rows: Sequence[LMRow], tokenizer: Any, max_length: int) -> list[Encoded]:
    out = []
    for row in rows:
        ids, labels = encode(row, tokenizer, max_length)
        learnt = predicted(labels)
        if not learnt:
            raise KdloraError(f"row {row.id + 1}: nothing is left to learn within --max-length {max_length}")
        first = learnt[0] + 1
        reference = None if row.text is not None else tokenizer.decode(ids[first:], skip_special_tokens=True).strip()
        out.append(Encoded(row.id, ids, labels, ids[:first], reference))
    return out


def data_hash(encoded: Sequence[Encoded]) -> str:
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.id, e.input_ids, e.labels]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Batches: an optimizer step's micro-batches travel together, so the loss is divided by all their learnt tokens


class LMBatch(NamedTuple):
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [N] the batch row of each learnt position
    positions: torch.Tensor  # [N] its position: it predicts the token after it
    targets: torch.Tensor  # [N] that next token
    teacher_top: torch.Tensor | None  # [N, K] the teacher's log-probs on its top-k tokens
    teacher_idx: torch.Tensor | None  # [N, K] those tokens
    teacher_tail: torch.Tensor | None  # [N] the log-mass of every other token


class Window(NamedTuple):
    batches: tuple[LMBatch, ...]  # the micro-batches of one optimizer step


class LMDataset(Dataset):
    def __init__(self, encoded: Sequence[Encoded], cache: TopKCache | None) -> None:
        self.encoded, self.cache = list(encoded), cache
        self.lengths = [len(e.input_ids) for e in self.encoded]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple[Encoded, tuple[torch.Tensor, ...] | None]:
        return self.encoded[i], self.cache.row(i) if self.cache is not None else None


def collate(items: Sequence[tuple[Encoded, Any]], pad_id: int) -> LMBatch:
    width = max(len(e.input_ids) for e, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, positions, targets = [], [], []
    for b, (e, _) in enumerate(items):
        ids[b, : len(e.input_ids)], mask[b, : len(e.input_ids)] = torch.tensor(e.input_ids), 1
        at = predicted(e.labels)
        rows += [b] * len(at)
        positions += at
        targets += [e.labels[t + 1] for t in at]
    teacher = [None] * 3
    if items[0][1] is not None:  # the cache holds the same positions, in the same order
        teacher = [torch.cat([t[j] for _, t in items]) for j in range(3)]
    return LMBatch(ids, mask, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets), *teacher)


class WindowCollator:
    """A flat list of an optimizer step's rows into its micro-batches of `batch_size`."""

    def __init__(self, batch_size: int, pad_id: int) -> None:
        self.batch_size, self.pad_id = batch_size, pad_id

    def __call__(self, items: list[Any]) -> Window:
        return Window(tuple(collate(items[i : i + self.batch_size], self.pad_id)
                            for i in range(0, len(items), self.batch_size)))  # fmt: skip


class WindowSampler(LengthGroupedBatchSampler):
    """The length-grouped, shuffled micro-batches, `accum` at a time: one item per optimizer step."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, accum: int) -> None:
        super().__init__(lengths, batch_size, seed)
        self.accum = accum

    def __len__(self) -> int:
        return -(-super().__len__() // self.accum)

    def __iter__(self):
        window: list[int] = []
        for n, batch in enumerate(super().__iter__(), 1):
            window += batch
            if n % self.accum == 0:
                yield window
                window = []
        if window:
            yield window


def lm_loader(dataset: LMDataset, batch_size: int, pad_id: int, seed: int | None, accum: int = 1) -> DataLoader:
    """The train loader (seed: shuffled, `accum` micro-batches an item) or an evaluation one (seed None: in order)."""
    if seed is None:
        batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
        return DataLoader(dataset, batch_sampler=batches, collate_fn=WindowCollator(batch_size, pad_id))
    sampler = WindowSampler(dataset.lengths, batch_size, seed, accum)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=WindowCollator(batch_size, pad_id),
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The model as the step trains it, and the step


class HiddenStates(nn.Module):
    """A causal LM that returns its last hidden states and its LM head's weight, never the [B, L, V] logits: the loss
    makes logits a chunk at a time. (A module, so accelerate can wrap it for several processes.)"""

    def __init__(self, lm: nn.Module, vocab: int) -> None:
        super().__init__()
        self.lm, self.vocab = lm, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, self.lm.get_output_embeddings().weight[: self.vocab]


def loss_sums(model: nn.Module, b: LMBatch, kd: Any, distilled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy, Σ KD) over the batch's learnt tokens."""
    hidden, head = model(b.input_ids, b.attention_mask)
    teacher = (b.teacher_top, b.teacher_idx) if distilled else (None, None)
    return chunked_lm_kd_sum(
        hidden[b.rows, b.positions], head, *teacher, b.targets, kd.temperature, kd.divergence, kd.jsd_beta, CHUNK,
        b.teacher_tail if distilled else None,
    )  # fmt: skip


class LMStep:
    """One optimizer step of a causal LM, over its window of micro-batches: α·CE + (1-α)·KD (CE alone undistilled),
    each a sum over learnt tokens divided by the learnt tokens of the whole step on every process, so the loss does
    not depend on how the tokens fall into micro-batches and processes. Returns [total, task, kd] (or [total]) on the
    device; a non-finite loss skips the update, as loop.TrainStep does."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, accelerator: Any, kd: Any, max_grad_norm: float,
                 distilled: bool) -> None:  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.kd, self.max_grad_norm, self.distilled = kd, max_grad_norm, distilled
        self.bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)

    def __call__(self, window: Window) -> torch.Tensor:
        acc = self.accelerator
        local = torch.tensor(sum(len(b.targets) for b in window.batches), device=acc.device, dtype=torch.float32)
        scale = acc.num_processes / acc.reduce(local, reduction="sum").clamp(min=1)  # DDP averages over processes
        sums = torch.zeros(3, device=acc.device)
        alpha = self.kd.alpha if self.distilled else 1.0
        for i, b in enumerate(window.batches):
            last = i == len(window.batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                ce, kd = loss_sums(self.model, b, self.kd, self.distilled)
                total = (alpha * ce + (1 - alpha) * kd) * scale
                acc.backward(total)
            sums += torch.stack([total, ce * scale, kd * scale]).detach()
        self.bad |= ~torch.isfinite(sums[0])
        if self.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if not self.bad.item():
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad()
        return sums if self.distilled else sums[:1]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def greedy(lm: nn.Module, tokenizer: Any, rows: Sequence[Encoded], max_new_tokens: int, batch_size: int,
           stats: dict[str, float] | None = None) -> list[str]:  # fmt: skip
    """Greedy completions of the rows' prompts, left-padded in batches; `stats` gets the tokens generated (each row's
    up to its end of text) and the seconds it took."""

    t0 = time.perf_counter()
    lm.eval()
    device = next(lm.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r.prompt_ids) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(chunk):
            ids[b, width - len(r.prompt_ids) :], mask[b, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids), 1
        new = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, width:]  # fmt: skip
        out += [tokenizer.decode(x, skip_special_tokens=True).strip() for x in new.tolist()]
        if stats is not None:
            ends = [row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                    for row in new.tolist()]  # fmt: skip
            stats["tokens"] = stats.get("tokens", 0) + sum(ends)
    if stats is not None:
        stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - t0
    return out


class LMEvaluator:
    """The loop's evaluation of a causal LM on the validation rows: completion-token NLL and perplexity, KL to the
    teacher and top-1 agreement (distilled runs), exact match of the greedy completions of the first rows; `score`,
    higher is better, from --best-metric."""

    def __init__(self, rows: Sequence[Encoded], tokenizer: Any, cfg: RunConfig, distilled: bool) -> None:
        self.rows, self.tokenizer, self.cfg, self.distilled = rows, tokenizer, cfg, distilled
        self.generated: list[str] = []

    def samples(self) -> list[Encoded]:
        return [r for r in self.rows[: self.cfg.train.generate_rows] if r.reference is not None]

    @torch.inference_mode()
    def __call__(self, model: Any, loaders: dict[str, Any], task: Task, accelerator: Any) -> tuple[dict, list[str]]:
        model.eval()
        kd = self.cfg.kd
        from accelerate.utils import send_to_device

        sums = torch.zeros(4, dtype=torch.float64)  # nll, kl, agreeing tokens, tokens
        # The loader is not accelerate's: each process takes every n-th batch, so no row is counted twice (accelerate
        # evens out processes by repeating rows, which a sum would count twice).
        # The unwrapped model: processes run different numbers of batches, so no forward may wait on the others.
        inner = accelerator.unwrap_model(model)
        for i, window in enumerate(loaders["validation"]):
            if i % accelerator.num_processes != accelerator.process_index:
                continue
            for b in send_to_device(window, accelerator.device).batches:
                hidden, head = inner(b.input_ids, b.attention_mask)
                logits = hidden[b.rows, b.positions].float() @ head.float().T
                nll = torch.nn.functional.cross_entropy(logits, b.targets, reduction="sum")
                kl = agree = torch.zeros(())
                if self.distilled:
                    log_p = torch.cat([b.teacher_top, b.teacher_tail[:, None]], dim=-1)
                    log_q = student_buckets(logits, b.teacher_idx, kd.temperature)
                    kl = token_divergence(log_p, log_q, "forward").sum()
                    agree = (logits.argmax(-1) == b.teacher_idx[:, 0]).sum()
                sums += torch.stack([nll, kl, agree.float(), torch.tensor(float(len(b.targets)))]).double().cpu()
        nll, kl, agree, n = accelerator.reduce(sums.to(accelerator.device), reduction="sum").tolist()
        result = {"nll": nll / n, "perplexity": math.exp(min(nll / n, 50.0))}
        if self.distilled:
            result |= {"kl": kl / n, "agreement": 100 * agree / n}
        samples = self.samples()
        if samples:
            lm = accelerator.unwrap_model(model).lm
            self.generated = greedy(lm, self.tokenizer, samples, self.cfg.train.max_new_tokens,
                                    self.cfg.train.eval_batch_size)  # fmt: skip
            hits = sum(g == r.reference for g, r in zip(self.generated, samples, strict=True))
            result["exact_match"] = 100 * hits / len(samples)
        metric = self.cfg.train.best_metric
        if metric not in result:
            raise KdloraError(f"--best-metric {metric}: this run does not measure it ({', '.join(result)} it does)")
        result["score"] = -result[metric] if metric in ("nll", "kl") else result[metric]
        return result, []  # a language model has no constant prediction to guard against: its loss is watched

    def write(self, path: Path) -> None:
        """The greedy completions of the model as it is now (the best epoch's), one JSON line a row."""
        samples = self.samples()
        lines = [json.dumps({"id": r.id, "reference": r.reference, "generated": g})
                 for r, g in zip(samples, self.generated, strict=True)]  # fmt: skip
        atomic_write_text(path, "".join(f"{line}\n" for line in lines))


# ---------------------------------------------------------------------------------------------------------------------
# Models: the teacher, the student, and what the run starts from


def teacher_source(cfg: RunConfig, teacher_run: Path | None) -> str:
    """The teacher's model: a finished run's merged model, or --teacher-model as it is (--teacher-method none)."""
    return str(rundir.merged_dir(teacher_run)) if teacher_run is not None else cfg.model.teacher_model


def student_source(cfg: RunConfig, teacher_run: Path | None) -> tuple[str, list[int] | None]:
    """The checkpoint the trained model starts from and the decoder layers kept of it."""
    m = cfg.model
    if cfg.train.method in DISTILLED and m.student_layers:
        base = teacher_source(cfg, teacher_run) if m.student_init == "teacher" else m.teacher_model
        return base, m.student_layers
    return m.name, None


def check_teacher_run(run_dir: Path, task: Task) -> None:
    run = rundir.read_run(run_dir)
    if run is None:
        raise KdloraError(f"--teacher {run_dir} is not a finished kdlora run")
    if run.get("task") != task.name or run.get("kind") != "generation":
        raise KdloraError(f"--teacher {run_dir} is not a language model trained on {task.name}")


def preflight(cfg: RunConfig) -> Task:
    """Every row of every split read and checked, a finished teacher run, and each model the run builds on the meta
    device (loadable, a causal LM, the student's layers, LoRA's targets and rank), and one vocabulary for teacher and
    student, before anything loads weights or trains."""
    task = lm_task(cfg.data)
    splits = {s: read_rows(cfg.data, s) for s in ("train", "validation")}
    m, trust = cfg.model, cfg.model.trust_remote_code
    if m.teacher:
        check_teacher_run(Path(m.teacher), task)
    teacher = None
    if cfg.train.method in DISTILLED:
        teacher = teacher_source(cfg, Path(m.teacher) if m.teacher else None)
        if m.teacher_model:
            model, _ = load_causal_lm(teacher, trust, weights=False)
            if cfg.kd.teacher_method == "lora":
                add_lm_lora(model, type(cfg.lora)())  # the teacher's LoRA has the defaults (train.teacher_config)
    source = m.name or teacher
    model, _ = load_causal_lm(source, trust, weights=False)
    if m.student_layers and not m.name:
        keep_layers(model, m.student_layers)
    if cfg.train.method in LORA_METHODS:
        add_lm_lora(model, cfg.lora)
    tokenizer = load_lm_tokenizer(source, trust)
    for rows in splits.values():
        encode_rows(rows, tokenizer, cfg.data.max_length)  # chat templates, lengths: every row
    if teacher is not None and m.name:
        teacher_config = causal_lm_config(teacher, trust)
        shared_vocabulary(load_lm_tokenizer(teacher, trust), tokenizer, teacher_config.vocab_size,
                          model.config.vocab_size)  # fmt: skip
    return task


def load_student(
    cfg: RunConfig, teacher_run: Path | None, out: Path, main: bool
) -> tuple[nn.Module, Any, str, list[int] | None]:
    """The model the run trains, its tokenizer, the checkpoint it starts from and the layers kept (a student cut from
    the teacher's decoder is saved in the run, so that its adapter names a base that exists), with LoRA for the LoRA
    methods."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    source, layers = student_source(cfg, teacher_run)
    model, tokenizer = load_causal_lm(source, cfg.model.trust_remote_code)
    if layers:
        keep_layers(model, layers)
        base = rundir.save_student_base(out, model, tokenizer) if main else rundir.student_base_dir(out)
        model.name_or_path = model.config._name_or_path = str(base)
    if cfg.train.method in LORA_METHODS:
        model = add_lm_lora(model, cfg.lora)
    return model, tokenizer, source, layers


def weights_hash(name: str) -> str:
    """sha256 of a model's weights: its .gguf file, or its directory's safetensors (a hub id: its name)."""

    path, gguf = causal_lm_source(name)
    files = [Path(path) / gguf["gguf_file"]] if gguf else sorted(Path(path).glob("*.safetensors"))
    h = hashlib.sha256(name.encode() if not files else b"")
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of what the cache's token ids mean: the vocabulary, the special tokens and the chat template."""
    parts = [sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map, tokenizer.chat_template]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def teacher_targets(
    cfg: RunConfig,
    teacher_run: Path | None,
    encoded: dict[str, list[Encoded]],
    tokenizer: Any,
    student_rows: int,
    accelerator: Any,
) -> tuple[dict[str, TopKCache], int, dict[str, Any]]:
    """The teacher's top-k distribution on every learnt token of each split, computed once (the main process fills
    the cache; the others wait and read it) under a fingerprint of the teacher's weights, its tokenizer, the data,
    the max length, k and T. Returns the caches, the vocabulary both models' logits are compared on, and what the
    metrics record says of the teacher."""

    source = teacher_source(cfg, teacher_run)
    ttok = load_lm_tokenizer(source, cfg.model.trust_remote_code)
    tconfig = causal_lm_config(source, cfg.model.trust_remote_code)
    vocab, notice = shared_vocabulary(ttok, tokenizer, tconfig.vocab_size, student_rows)
    if notice:
        say(notice)
    root = (teacher_run if teacher_run is not None else rundir.teacher_dir(cfg.train.output_dir)) / TOPK
    common = {"teacher": weights_hash(source), "tokenizer": tokenizer_hash(ttok), "max_length": cfg.data.max_length}
    k = min(cfg.kd.teacher_top_k, vocab)  # a vocabulary smaller than k: every token, no tail
    caches = {s: TopKCache(root, {**common, "data": data_hash(e)}, k, cfg.kd.temperature)
              for s, e in encoded.items()}  # fmt: skip
    missing = [s for s, c in caches.items() if not c.complete(len(encoded[s]))]
    t0, computed = time.perf_counter(), 0
    if missing and cfg.kd.no_recompute:
        raise KdloraError(f"--no-recompute: no cached teacher distribution in {root} matches this teacher, tokenizer "
                          "and data")  # fmt: skip
    if missing and accelerator.is_main_process:
        teacher, _ = load_causal_lm(source, cfg.model.trust_remote_code)
        teacher.to(accelerator.device)
        for s in missing:
            rows = [(e.input_ids, e.labels) for e in encoded[s]]
            computed += fill_from_model(caches[s], teacher, rows, vocab, cfg.train.eval_batch_size,
                                        tokenizer.pad_token_id)  # fmt: skip
        del teacher
    accelerator.wait_for_everyone()
    run = (rundir.read_run(teacher_run) or {}) if teacher_run is not None else {}
    record = {
        "teacher": str(teacher_run) if teacher_run is not None else source, "teacher_weights": source,
        "teacher_score": run.get("score"), "teacher_total_params": run.get("total_params"), "teacher_top_k": k,
        "teacher_temperature": cfg.kd.temperature,
        "teacher_cache": str(caches["train"].dir), "teacher_cache_bytes_per_token": caches["train"].bytes_per_token(),
        "teacher_rows_computed": computed, "teacher_cache_seconds": time.perf_counter() - t0, "vocabulary": vocab,
    }  # fmt: skip
    return caches, vocab, record


def cache_teacher(cfg: RunConfig) -> bool:
    """Fill the teacher's top-k cache of a distilled run without training it (compare does, before the student's
    child process starts, so that child never loads the teacher). True when it was already complete."""
    from accelerate import PartialState

    teacher_run = Path(cfg.model.teacher) if cfg.model.teacher else None
    source, _ = student_source(cfg, teacher_run)
    tokenizer = load_lm_tokenizer(source, cfg.model.trust_remote_code)
    encoded = {s: encode_rows(read_rows(cfg.data, s), tokenizer, cfg.data.max_length) for s in ("train", "validation")}
    rows_of = causal_lm_config(source, cfg.model.trust_remote_code).vocab_size
    _, _, record = teacher_targets(cfg, teacher_run, encoded, tokenizer, rows_of, PartialState())
    return record["teacher_rows_computed"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# build -> loop -> finish (train.fit runs them)


@dataclass
class LMBuilt:
    cfg: RunConfig
    parts: Any  # loop.Parts
    tokenizer: Any
    encoded: dict[str, list[Encoded]]
    source: str
    layers: list[int] | None
    params: dict[str, Any]
    teacher: dict[str, Any]
    plan: Any  # lrfind.Plan
    evaluator: LMEvaluator


def build(cfg: RunConfig, teacher_run: Path | None = None, resume: bool = False, plan: Any = None) -> LMBuilt:
    """Everything the loop runs for a causal LM: the rows, the teacher's cached distribution (the teacher is gone
    before the student loads), the model, loaders of whole optimizer steps, the lr plan, optimizer and schedule, and
    a killed run's state."""

    from kdlora.train import lr_plan, prepare_training, schedule, trackers  # train picks this module: imported here

    task, out = lm_task(cfg.data), Path(cfg.train.output_dir)
    tc = dataclasses.replace(cfg.train, grad_accum_steps=1)  # a loader item is a whole step: LMStep accumulates
    accelerator = build_accelerator(tc, tc.report_to or (), logging_dir=str(out / rundir.LOGS))
    main, quiet = accelerator.is_main_process, tc.quiet or not accelerator.is_main_process
    if main:
        rundir.write_config(cfg)
    distilled = tc.method in DISTILLED
    source, _ = student_source(cfg, teacher_run)
    tokenizer = load_lm_tokenizer(source, cfg.model.trust_remote_code)
    rows = {s: read_rows(cfg.data, s) for s in ("train", "validation")}
    encoded = {s: encode_rows(r, tokenizer, cfg.data.max_length) for s, r in rows.items()}
    caches: dict[str, TopKCache | None] = {"train": None, "validation": None}
    teacher: dict[str, Any] = {}
    vocab = None
    if distilled:
        rows_of = causal_lm_config(source, cfg.model.trust_remote_code).vocab_size
        caches, vocab, teacher = teacher_targets(cfg, teacher_run, encoded, tokenizer, rows_of, accelerator)
    model, tokenizer, source, layers = load_student(cfg, teacher_run, out, main)
    params: dict[str, Any] = {**count_parameters(model), "total_params": deployed_parameters(model)}
    if tc.method in LORA_METHODS:
        params["lora_target_modules"] = lora_targets(model)
    vocab = vocab or model.get_output_embeddings().weight.shape[0]
    pad = tokenizer.pad_token_id
    train_ds, eval_ds = (LMDataset(encoded[s], caches[s]) for s in ("train", "validation"))
    train = lm_loader(train_ds, tc.batch_size, pad, tc.seed, cfg.train.grad_accum_steps)
    loaders = Loaders(train, train.batch_sampler, {"validation": lm_loader(eval_ds, tc.eval_batch_size, pad, None)})
    wrapped = accelerator.prepare(HiddenStates(model, vocab).to(accelerator.device))
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}

    epochs, steps = schedule(tc, loaders)

    def make_step(optimizer: Any, scheduler: Any) -> LMStep:
        return LMStep(wrapped, optimizer, scheduler, accelerator, cfg.kd, tc.max_grad_norm, distilled)

    def probe() -> Any:  # --lr auto: the range test on this very model, data and objective
        return range_test(
            wrapped, make_step, lambda lr: build_optimizer(wrapped, lr, tc.weight_decay), loaders.train,
            loaders.sampler, accelerator, trainable, probe_steps(steps),
            BANDS["lora" if tc.method in LORA_METHODS else "full"],
        )  # fmt: skip

    if plan is None:
        plan = lr_plan(cfg, out, resume, probe)
        if main:
            plan.save(out)
            if plan.probe is not None and not (out / rundir.LR_PLOT).is_file():
                plot(plan.probe, out / rundir.LR_PLOT, f"{tc.method} {task.name}: lr range test")
    accelerator.wait_for_everyone()
    optimizer, scheduler, train_loader, _, total = prepare_training(tc, plan.lr, wrapped, loaders, accelerator, None)
    eval_loaders = loaders.eval  # as they are: LMEvaluator shards them itself
    keys = ["train_loss", "train_loss_task", "train_loss_kd"] if distilled else ["train_loss"]
    ckpt = restore(out, trainable, optimizer, scheduler, keys) if resume else None
    evaluator = LMEvaluator(encoded["validation"], tokenizer, cfg, distilled)
    parts = Parts(
        accelerator, wrapped, make_step(optimizer, scheduler), train_loader, loaders.sampler, eval_loaders,
        trainable, task, epochs, total, keys, out, tc.save_steps, ckpt, quiet, f"{tc.method} {task.name}",
        trackers(cfg, accelerator), None, evaluator,
    )  # fmt: skip
    return LMBuilt(cfg, parts, tokenizer, encoded, source, layers, params, teacher, plan, evaluator)


def finish(built: LMBuilt, record: Any) -> dict[str, Any]:
    """A trained causal LM's outputs (the best epoch's weights are in the model): the greedy completions of the first
    validation rows, adapter/ and merged/ (which pipeline("text-generation") loads) with the model card, then
    metrics.json, which marks the run finished."""

    from kdlora.train import write_outputs

    cfg, parts, out = built.cfg, built.parts, Path(built.cfg.train.output_dir)
    accelerator, tc = parts.accelerator, cfg.train
    bad = [n for n, p in parts.trainable.items() if not torch.isfinite(p).all()]
    if bad:
        raise KdloraError(f"the trained weights are not finite ({bad[0]}): lower --lr; the run is not marked finished")
    memory = peak_memory(accelerator.device)
    progress = record.progress
    best = {k: v for k, v in progress.epochs[progress.best_epoch - 1].items() if k != "epoch"}
    train_tokens = sum(len(predicted(e.labels)) for e in built.encoded["train"])  # learnt
    seen = sum(len(e.input_ids) for e in built.encoded["train"])  # read (prompt and completion)
    metrics = {
        "task": parts.task.name, "method": tc.method, "kind": "generation", **best,
        "best_epoch": progress.best_epoch, "best_metric": tc.best_metric, "epochs": progress.epochs,
        **{k: progress.history[k] for k in parts.keys}, **built.params, "train_seconds": record.train_seconds,
        "train_tokens_per_second": seen * len(progress.epochs) / max(record.train_seconds, 1e-9),
        "peak_memory_mb": memory[0], "peak_memory_kind": memory[1], "num_train_examples": len(built.encoded["train"]),
        "num_train_tokens": train_tokens, "num_eval_examples": {"validation": len(built.encoded["validation"])},
        "device": str(accelerator.device), "num_processes": accelerator.num_processes,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "kdlora_version": __version__,
        **built.plan.record(), "collapsed_epochs": [], "collapsed": False, **built.teacher,
        "data_fingerprint": data_hash(built.encoded["train"]),
    }  # fmt: skip
    evaluator = built.evaluator
    if evaluator.samples():  # the best epoch's completions: the last evaluation's may be another epoch's
        lm = accelerator.unwrap_model(parts.model).lm
        timed: dict[str, float] = {}
        evaluator.generated = greedy(lm, built.tokenizer, evaluator.samples(), tc.max_new_tokens, tc.eval_batch_size,
                                     timed)  # fmt: skip
        # Greedy decoding with the KV cache, unmerged LoRA, batches of --eval-batch-size, on the run's device.
        metrics["generate_tokens_per_second"] = timed["tokens"] / max(timed["seconds"], 1e-9)
    if accelerator.is_main_process and evaluator.samples():
        evaluator.write(out / GENERATIONS)
    card = lm_card(cfg, metrics, built.source, built.layers)
    return write_outputs(cfg, accelerator, accelerator.unwrap_model(parts.model).lm, built.tokenizer, card, metrics)


def lm_card(cfg: RunConfig, metrics: dict[str, Any], source: str, layers: list[int] | None) -> str:
    """The merged model's README: what it is, how it was trained, its validation figures."""
    how = {"fft": "full fine-tuning", "lora": "LoRA", "kd-lora": "LoRA, distilled token by token from a teacher",
           "kd-fft": "full fine-tuning, distilled token by token from a teacher"}[cfg.train.method]  # fmt: skip
    origin = f"layers {', '.join(map(str, layers))} of {source}" if layers else source
    figures = [f"- {k}: {metrics[k]:.4g}" for k in ("nll", "perplexity", "kl", "agreement", "exact_match")
               if isinstance(metrics.get(k), (int, float))]  # fmt: skip
    teacher = (
        f"\nTeacher: {metrics['teacher']} (top-{metrics['teacher_top_k']} cache).\n" if "teacher" in metrics else ""
    )
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [kdlora, {cfg.train.method}]\n---\n\n"
        f"# {cfg.data.task}: a causal language model trained by kdlora\n\nStarts from {origin}; trained with {how}, "
        f"{metrics['epochs'][-1]['epoch']} epochs at lr {metrics['lr']:.3g}; the best epoch "
        f"({metrics['best_epoch']}) by {metrics['best_metric']}.\n{teacher}\nValidation (completion tokens):\n\n"
        + "\n".join(figures)
        + "\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# kdlora predict: completions of a raw file's prompts


def is_causal_lm(model_path: str | Path) -> bool:
    """Whether a run directory's merged model (or a model directory) is a causal LM."""
    config = rundir.model_dir(model_path) / "config.json"
    archs = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    return any(a.endswith("ForCausalLM") for a in archs)


def generate_file(model_path: str | Path, input_file: str | Path, output_file: str | Path,
                  column: str | None = None, id_column: str | None = None, batch_size: int = 16,
                  max_length: int = 128, max_new_tokens: int = 32) -> int:  # fmt: skip
    """Greedy completions of every prompt of a raw file (CSV, TSV, JSONL, JSON, Parquet or one prompt a line), in
    input order, a batch at a time, to a .csv or .jsonl file written whole or not at all. A run trained on chat
    messages gets each prompt as a user turn rendered by the chat template; otherwise the prompt is the text as it
    is, as in training. Returns the number of rows written."""

    rundir.refuse_own_inputs(output_file, [("--input-file", input_file), ("--model-dir", model_path)], "--output-file")
    data = ((rundir.read_config(model_path) or {}).get("data") or {}) if rundir.is_run(model_path) else {}
    column = column or data.get("prompt_column") or data.get("text_column")
    chat = bool(data.get("messages_column"))
    lm, tokenizer = load_causal_lm(str(rundir.model_dir(model_path)))
    lm.to(default_device())

    def prompt_ids(i: int, text: str) -> Encoded:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"][-max_length:]
        return Encoded(i, ids, [], ids, None)

    rows = iter_raw_rows(input_file, [column] if column else None, id_column)
    with PredictionWriter(output_file, [], GENERATION) as writer:
        for chunk in chunks(rows, batch_size):
            keys, texts, _ = zip(*chunk, strict=True)
            encoded = [prompt_ids(i, t) for i, t in enumerate(texts)]
            writer.write(list(keys), greedy(lm, tokenizer, encoded, max_new_tokens, batch_size))
    return writer.rows
