"""The one training loop and the one training step, for every method, on accelerate (CPU now, CUDA when present).

`loop(parts)` runs what `train.build` (or anyone) built: the epochs, the step, the loss log, checkpoints, the
evaluation after each epoch and the best epoch's weights. It reads no config and no files: everything it uses is in
`Parts`, so a test or another pipeline can hand it a model and loaders of its own. `TrainStep` is the one step: the
loop, `kdlora bench` and the benchmarks all run it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlora.checkpoint import Checkpoint, Progress, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kdlora.config import KDArgs, TrainArgs
from kdlora.data import Batch
from kdlora.env import distributed_cpu, say
from kdlora.errors import KdloraError
from kdlora.evaluate import constant_notice, evaluate
from kdlora.features import FeatureKD
from kdlora.kinds import Kind
from kdlora.losses import TASK_ONLY, Term, View, active_terms, objective
from kdlora.lrfind import Collapse, Guard
from kdlora.rundir import checkpoint_dir
from kdlora.tasks import Task

SYNC_EVERY = 25  # optimizer steps between moving the logged losses to the host (and checking them)


def loss_keys(terms: Sequence[Term]) -> list[str]:
    """The loss log's keys: the total, then each term's (metrics.json and the trackers use the same names)."""
    return ["train_loss", *(f"train_loss_{t.name}" for t in terms)]


def build_accelerator(tc: TrainArgs, report_to: Sequence[str] = (), logging_dir: str | None = None) -> Any:
    """The run's Accelerator: precision, accumulation, processes, and the trackers the loop reports to."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # accelerate keeps one global state: forget the last run's precision
    return Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum_steps,
        cpu=distributed_cpu(),
        log_with=list(report_to) or None,
        project_dir=logging_dir,
    )


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, extra: torch.nn.Module | None = None
) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters (and `extra`'s, a module that trains beside it), biases and
    LayerNorm weights without decay. The fused kernel can skip a step on the device (see TrainStep), so a non-finite
    loss is kept from the weights without waiting on the host."""
    decay, no_decay = [], []
    for p in [*model.parameters(), *(extra.parameters() if extra is not None else [])]:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cpu", "cuda"))


class TrainStep:
    """One micro-batch of training for every method: forward, objective, backward, clip and (at the end of an
    accumulation) the optimizer and scheduler step. Returns the loss parts [total, *terms], on the device.

    `terms` (losses.TERMS' entries) make the objective; without them a batch with teacher logits is distilled with
    the KD settings' terms and one without is trained on the task loss alone.

    A non-finite loss sets `self.bad` on the device, and while it is set no update happens: a fused optimizer skips
    inside the kernel (as with a GradScaler), so no step waits on the host; other optimizer groups are skipped after a
    host check. The loop finds the non-finite loss when it moves losses to the host (LossLog.flush) and stops there,
    before any checkpoint."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, accelerator: Any, kd: KDArgs, kind: Kind,
                 max_grad_norm: float, features: FeatureKD | None = None,
                 terms: Sequence[Term] | None = None) -> None:  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.kd, self.kind, self.max_grad_norm, self.features = kd, kind, max_grad_norm, features
        self.terms = tuple(terms) if terms is not None else None
        projection = features.projection if features is not None else None
        self.params = [*model.parameters(), *(projection.parameters() if projection is not None else [])]
        self.inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        self.bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)

    @property
    def fused(self) -> bool:
        """Whether every parameter group steps with the fused kernel (a checkpoint's groups may say otherwise)."""
        return all(g.get("fused") for g in self.inner.param_groups)

    def __call__(self, batch: Batch) -> torch.Tensor:
        with self.accelerator.accumulate(self.model):
            features = self.features
            hidden = features is not None and features.hidden is not None
            out = self.model(**batch.inputs, output_hidden_states=hidden)
            paired = features.pair(batch, out.hidden_states, self.accelerator) if features is not None else None
            view = View(out.logits, batch.labels, batch.teacher_logits, batch.inputs["attention_mask"], paired)
            terms = self.terms or (TASK_ONLY if batch.teacher_logits is None else active_terms(self.kd, True))
            parts = objective(terms, view, self.kd, self.kind)
            self.bad |= ~torch.isfinite(parts["total"])
            self.accelerator.backward(parts["total"])
            if self.accelerator.sync_gradients and self.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
            fused = self.fused
            if fused:
                self.inner.found_inf = self.bad.float()  # skips the update on the device while set
            if fused or not self.bad.item():
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad()
        return torch.stack([p.detach() for p in parts.values()])


@dataclass
class LossLog:
    """Loss per optimizer step, kept on the device and moved to the host in bulk (`flush`)."""

    history: dict[str, list[float]]  # loss_keys(terms): one value per optimizer step
    pending: list[torch.Tensor] = field(default_factory=list)  # [keys] per step, not yet moved
    micro: list[torch.Tensor] = field(default_factory=list)  # [keys] per micro-batch of the step being accumulated

    def add(self, parts: torch.Tensor, accelerator: Any) -> bool:
        """Log one micro-batch; True when it ended an optimizer step."""
        self.micro.append(parts)
        if not accelerator.sync_gradients:
            return False
        self.pending.append(accelerator.reduce(torch.stack(self.micro).mean(0), reduction="mean"))  # over processes
        self.micro = []
        return True

    @property
    def steps(self) -> int:
        return len(self.history["train_loss"]) + len(self.pending)

    def flush(self, out: Path | None) -> list[dict[str, float]]:
        """Move the pending losses to the history; stop at a non-finite one. Returns the steps moved, by key."""
        rows, self.pending = (torch.stack(self.pending).tolist() if self.pending else []), []
        moved = []
        for row in rows:
            if not math.isfinite(row[0]):
                kept = checkpoint_dir(out) if out is not None else None
                saved = f"; the last good checkpoint is kept in {kept}" if kept is not None and kept.exists() else ""
                at = len(self.history["train_loss"]) + 1
                raise Collapse(
                    f"the loss became {row[0]} at step {at}{saved}: lower --lr, or turn off --mixed-precision",
                    f"the loss became {row[0]} at step {at}",
                )
            for key, value in zip(self.history, row, strict=True):
                self.history[key].append(value)
            moved.append(dict(zip(self.history, row, strict=True)))
        return moved


@dataclass
class Parts:
    """Everything one training run is made of, built: what `loop` runs. `train.build` makes them from a config;
    anything else that builds them (a test, another pipeline) gets the same loop."""

    accelerator: Any
    model: Any  # prepared by accelerate
    step: TrainStep
    train_loader: Any  # prepared by accelerate
    sampler: Any  # the train loader's batch sampler, whose epoch the loop sets
    eval_loaders: dict[str, Any]
    trainable: dict[str, torch.Tensor]  # checkpointed and restored: LoRA + head, or every parameter
    task: Task
    epochs: int
    total_steps: int
    keys: list[str]  # the loss log's keys (loss_keys of the step's terms)
    out: Path | None = None  # where checkpoints go; None: none are written
    save_steps: int = 0
    checkpoint: Checkpoint | None = None  # a killed run's, restored into the weights, optimizer and schedule
    quiet: bool = True
    desc: str = "train"
    on_log: Callable[[dict[str, float], int], None] | None = None  # per optimizer step and per epoch (trackers)
    guard: Guard | None = None  # judges each epoch for a collapse (and may stop the loop for a restart)
    # (model, eval_loaders, task, accelerator) -> (metrics with a `score`, the splits predicted as one constant);
    # None: evaluate.evaluate, a classifier's or a regressor's. A causal LM brings its own (lm.LMEvaluator).
    evaluate: Callable[..., tuple[dict[str, Any], list[str]]] | None = None


@dataclass
class Record:
    """What the loop leaves: the progress (epochs' metrics, loss history, best epoch), the best epoch's trainable
    weights (already in the model) and the training time across resumes."""

    progress: Progress
    best: dict[str, torch.Tensor]
    train_seconds: float


def restore(out: Path, trainable: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
            keys: Sequence[str]) -> Checkpoint | None:  # fmt: skip
    """Load the checkpoint of a killed run into the weights, optimizer and schedule; the RNG is set by the loop."""
    ckpt = load_checkpoint(out)
    if ckpt is None:
        return None
    damaged = checkpoint_damage(ckpt, trainable)
    if damaged:
        raise KdloraError(f"the checkpoint in {checkpoint_dir(out)} is damaged ({damaged}): rerun with --overwrite")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(ckpt.trainable[n])
    optimizer.load_state_dict(ckpt.state["optimizer"])
    scheduler.load_state_dict(ckpt.state["scheduler"])
    history, steps = ckpt.progress.history, len(ckpt.progress.history["train_loss"])
    # A checkpoint written before a term existed lacks its history; one written by an older version logged every
    # term, on or off: keep this run's terms, in its order.
    ckpt.progress.history = {k: history.get(k, [0.0] * steps) for k in keys}
    say(f"resuming {out} at epoch {ckpt.progress.epoch + 1}, batch {ckpt.progress.batches_done}")
    return ckpt


def checkpoint_damage(ckpt: Checkpoint, trainable: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a checkpoint for these weights, found before anything resumes (None: nothing)."""
    progress = ckpt.progress
    if not isinstance(progress.history, dict) or not isinstance(progress.history.get("train_loss"), list):
        return "its progress has no loss history"
    if progress.epochs and (ckpt.best is None or progress.best_epoch is None):
        return "it has finished epochs but no best weights"
    for name, weights in (("trainable", ckpt.trainable), ("best", ckpt.best or {})):
        if weights and set(weights) != set(trainable):
            return f"its {name} weights are another model's"
        wrong = [
            (n, tuple(w.shape), tuple(trainable[n].shape)) for n, w in weights.items() if w.shape != trainable[n].shape
        ]
        if wrong:
            return f"its {name} weight {wrong[0][0]} has shape {wrong[0][1]}, not {wrong[0][2]}"
    if not {"optimizer", "scheduler"} <= set(ckpt.state):
        return "its optimizer state is missing"
    return None


def epoch_batches(parts: Parts, epoch: int, progress: Progress, ckpt: Checkpoint | None) -> Any:
    """The epoch's batches: all of them, or those after the checkpoint's position when resuming in this epoch."""
    skip = progress.batches_done if epoch == progress.epoch else 0
    # accelerate's loader hands its own epoch counter to the sampler, so set it: a resumed run starts mid-count.
    parts.sampler.set_epoch(epoch)  # directly too: with several processes accelerate's wrapper does not pass it on
    parts.train_loader.set_epoch(epoch)
    batches = parts.accelerator.skip_first_batches(parts.train_loader, skip) if skip else parts.train_loader
    batches.set_epoch(epoch)
    if ckpt is not None:
        set_rng_state(ckpt.rng)
        parts.accelerator.step = skip  # micro-batches already accumulated this epoch
    return batches


def loop(parts: Parts) -> Record:
    """Train for parts.epochs (the last stopped at parts.total_steps), evaluating after each; leave the best epoch's
    trainable weights in the model."""
    from tqdm.auto import tqdm

    accelerator, trainable, ckpt = parts.accelerator, parts.trainable, parts.checkpoint
    progress = ckpt.progress if ckpt else Progress(history={k: [] for k in parts.keys})
    log, best = LossLog(progress.history), ckpt.best if ckpt else None
    seconds_before, start = progress.train_seconds, time.perf_counter()
    report = parts.on_log or (lambda values, step: None)
    lrs: list[float] = []  # the lr of each step not yet flushed (a host value: reading it costs nothing)

    def flush() -> None:
        first = len(log.history["train_loss"]) + 1
        for i, values in enumerate(log.flush(parts.out)):  # raises on a non-finite loss before it can be saved
            report({**values, "lr": lrs[i]}, first + i)
        lrs.clear()

    def checkpoint() -> None:
        flush()
        progress.train_seconds = seconds_before + time.perf_counter() - start
        state = {"optimizer": parts.step.optimizer.state_dict(), "scheduler": parts.step.scheduler.state_dict()}
        if parts.out is not None and accelerator.is_main_process:
            save_checkpoint(parts.out, Checkpoint(progress, trainable, best, state, rng_state()))

    bar = tqdm(total=parts.total_steps, initial=log.steps, desc=parts.desc, disable=parts.quiet)
    for epoch in range(progress.epoch, parts.epochs):
        parts.model.train()
        for batch in epoch_batches(parts, epoch, progress, ckpt):
            progress.batches_done += 1
            if log.add(parts.step(batch), accelerator):
                lrs.append(parts.step.scheduler.get_last_lr()[0])
                bar.update(1)
                if parts.save_steps and log.steps % parts.save_steps == 0:
                    checkpoint()
                elif log.steps % SYNC_EVERY == 0:
                    flush()
                    bar.set_postfix(loss=f"{log.history['train_loss'][-1]:.4f}")
                if log.steps >= parts.total_steps:
                    break  # --max-steps: the last epoch ends at the step
        ckpt = None
        flush()

        # Evaluate; keep the best epoch's trainable weights (only they can differ between epochs).
        result, constant = (parts.evaluate or evaluate)(parts.model, parts.eval_loaders, parts.task, accelerator)
        if parts.guard is not None:  # before anything of this epoch is kept: a restart discards the attempt
            parts.guard.after_epoch(epoch + 1, constant, log.history)
        if constant:
            say(constant_notice(constant, parts.task, epoch + 1))
        progress.epochs.append({"epoch": epoch + 1, **result})
        report({f"eval_{k}": v for k, v in result.items()} | {"epoch": epoch + 1}, log.steps)
        if not parts.quiet:
            bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if progress.best_score is None or result["score"] > progress.best_score:
            progress.best_epoch, progress.best_score = epoch + 1, result["score"]
            best = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
        progress.epoch, progress.batches_done = epoch + 1, 0
        checkpoint()
    bar.close()

    train_seconds = seconds_before + time.perf_counter() - start
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best[n])
    return Record(progress, best, train_seconds)
