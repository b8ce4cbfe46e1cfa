"""One training loop for fft, lora and kd-lora, on accelerate (CPU now, CUDA when present).

    kdlora train --method kd-lora --task cola --teacher-model all-MiniLM-L6-v2 --student-layers 0,2,4

`run` is the paper's three steps: prepare the run directory, get the teacher (fine-tune it with fft, or reuse a
finished one), then `fit` the student's LoRA matrices and head on α·L_task + (1-α)·L_KD over the teacher's cached
logits. `TrainStep` is the one training step: the loop, `kdlora bench` and the benchmarks all run it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlora import __version__, rundir
from kdlora.card import model_card
from kdlora.checkpoint import Checkpoint, Progress, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kdlora.config import DEFAULT_EPOCHS, DISTILLED, LORA_METHODS, KDArgs, RunConfig, TrainArgs
from kdlora.data import (
    Batch,
    Example,
    build_loaders,
    data_fingerprint,
    load_splits,
    load_task,
    read_unlabeled,
    unlabeled_rest,
)
from kdlora.env import distributed_cpu, peak_memory, process_state, reset_peak_memory, say
from kdlora.errors import KdloraError
from kdlora.evaluate import evaluate, write_test_predictions
from kdlora.losses import attention_relation_loss, hidden_state_loss, objective
from kdlora.models import (
    add_lora,
    attention_projections,
    build_model,
    check_model,
    count_parameters,
    deployed_parameters,
    enable_gradient_checkpointing,
    load_classifier,
    load_masked_lm,
    load_tokenizer,
    lora_targets,
    resolve_model_path,
)
from kdlora.tasks import Task
from kdlora.teacher import teacher_logits, teacher_model_dir, transfer_set

SYNC_EVERY = 25  # optimizer steps between moving the logged losses to the host (and checking them)


# ---------------------------------------------------------------------------------------------------------------------
# The paper's three steps


def run(cfg: RunConfig) -> dict[str, Any]:
    """`kdlora train`: check everything, hold the output directory, get a teacher when distilling, fit. Returns the
    metrics record."""
    state = process_state()
    task = preflight(cfg)
    with rundir.locked(cfg.train.output_dir) if state.is_main_process else contextlib.nullcontext():
        resume = rundir.check(cfg)
        state.wait_for_everyone()  # all processes have looked before the main one changes anything
        if state.is_main_process and not resume:
            rundir.clear(cfg)
        state.wait_for_everyone()
        teacher_run = None
        if cfg.train.method in DISTILLED:
            teacher_run = Path(cfg.model.teacher) if cfg.model.teacher else ensure_teacher(cfg)
            teacher_model_dir(teacher_run, task)
        return fit(cfg, teacher_run, resume)


def preflight(cfg: RunConfig) -> Task:
    """Everything that can fail, before anything trains: the data (files, columns, every cell, the labels), a finished
    teacher run, and each model the run builds, on the meta device (loadable, LoRA targets, student layers, its
    tokenizer, max length). So a bad student setting fails in seconds, not after the teacher's fine-tuning."""
    task = load_task(cfg.data)
    load_splits(cfg.data, data_splits(cfg, task))
    if cfg.kd.unlabeled_file:
        read_unlabeled(cfg.kd.unlabeled_file, task, first_id=0)  # every row read and checked
    if cfg.kd.augment_mlm:
        load_masked_lm(cfg.kd.augment_mlm, cfg.model.trust_remote_code, weights=False)
    m, models = cfg.model, []
    if cfg.train.method not in DISTILLED:
        models.append((m.name, cfg.train.method, None))
    else:
        if m.teacher:
            teacher_model_dir(Path(m.teacher), task)
        else:
            models.append((m.teacher_model, cfg.kd.teacher_method, None))
        # A student cut from the fine-tuned teacher has its checkpoint's architecture: check that checkpoint.
        source = m.name or m.teacher_model
        if not source:
            teacher = (rundir.read_config(m.teacher) or {}).get("model", {}).get("name")
            source = str(teacher_model_dir(Path(m.teacher), task)) if m.student_init == "teacher" else teacher
        models.append((source, cfg.train.method, m.student_layers))
    for name, method, layers in models:
        check_model(
            name, task, method, cfg.lora, layers, cfg.data.max_length, m.trust_remote_code,
            cfg.train.gradient_checkpointing,
        )  # fmt: skip
    if cfg.kd.hidden_weight:
        hidden_layer_map(cfg, task)
    if cfg.kd.attention_weight:
        attention_plan(cfg, task)
    return task


def paired_configs(cfg: RunConfig, task: Task, flag: str) -> tuple[str, Any, str, Any]:
    """The teacher's checkpoint and config, and the student's (a student cut by --student-layers: the teacher's
    architecture with fewer layers), for a loss that compares them token by token: so the student needs the teacher's
    vocabulary. Returns (teacher path, teacher config, student path, student config)."""
    from transformers import AutoConfig

    m = cfg.model
    teacher = str(teacher_model_dir(Path(m.teacher), task)) if m.teacher else resolve_model_path(m.teacher_model)
    t_cfg = AutoConfig.from_pretrained(teacher, trust_remote_code=m.trust_remote_code)
    if m.student_layers:
        s_cfg = copy.deepcopy(t_cfg)
        s_cfg.num_hidden_layers = len(m.student_layers)
        return teacher, t_cfg, teacher, s_cfg
    student = resolve_model_path(m.name)
    s_cfg = AutoConfig.from_pretrained(student, trust_remote_code=m.trust_remote_code)
    vocab = [load_tokenizer(p, m.trust_remote_code).get_vocab() for p in (student, teacher)]
    if vocab[0] != vocab[1]:
        raise KdloraError(
            f"{flag} compares the two models token by token: the student needs the teacher's vocabulary, "
            f"and {m.name} has another (a student cut by --student-layers has the teacher's)"
        )
    return teacher, t_cfg, student, s_cfg


@dataclass
class HiddenMap:
    """Intermediate-layer distillation's pairing: the teacher layer (from 1, an index of its hidden_states) whose
    output each student layer's output is matched to, and the two widths."""

    layers: list[int]
    student_width: int
    teacher_width: int


def hidden_layer_map(cfg: RunConfig, task: Task) -> HiddenMap:
    """The pairing of --hidden-layers (default uniform: student layer i of M to teacher layer i*N/M of N). Another
    width is bridged by a learned projection (HiddenProjection)."""
    _, t_cfg, _, s_cfg = paired_configs(cfg, task, "--hidden-weight")
    n, count = t_cfg.num_hidden_layers, s_cfg.num_hidden_layers
    layers = cfg.kd.hidden_layers or [round((i + 1) * n / count) for i in range(count)]
    if len(layers) != count or max(layers) > n:
        raise KdloraError(
            f"--hidden-layers {','.join(map(str, layers))}: give {count} teacher layers, one per student layer, "
            f"each from 1 to {n}"
        )
    return HiddenMap(layers, s_cfg.hidden_size, t_cfg.hidden_size)


class HiddenProjection(torch.nn.Module):
    """A learned linear map per matched layer from the student's width to the teacher's (TinyBERT's W_h), for a
    student narrower or wider than its teacher. It trains with the student, serves only the loss, and is never saved
    with the model."""

    def __init__(self, count: int, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.maps = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width) for _ in range(count))

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(h) for m, h in zip(self.maps, states, strict=True)]


@dataclass
class AttentionPlan:
    """Self-attention relation distillation: the teacher layer (from 1) whose query/key/value relations the student's
    last layer learns, and the relation heads every projection is split into."""

    layer: int
    heads: int


def attention_plan(cfg: RunConfig, task: Task) -> AttentionPlan:
    """--attention-layer and --attention-heads, checked against both models' projections (built on the meta device):
    relations are compared head by head, so the heads must divide every query, key and value width."""
    teacher, t_cfg, student, s_cfg = paired_configs(cfg, task, "--attention-weight")
    kd, n = cfg.kd, t_cfg.num_hidden_layers
    layer, heads = kd.attention_layer or n, kd.attention_heads or t_cfg.num_attention_heads
    if layer > n:
        raise KdloraError(f"--attention-layer {layer}: the teacher has layers 1 to {n}")
    widths = []
    for path, layer_index in ((teacher, layer - 1), (student, s_cfg.num_hidden_layers - 1)):
        model, _ = load_classifier(path, task, cfg.model.trust_remote_code, weights=False)
        widths += [p.out_features for p in attention_projections(model, layer_index)]
    if any(w % heads for w in widths):
        raise KdloraError(
            f"--attention-heads {heads} must divide every query, key and value width of the two models "
            f"({', '.join(map(str, sorted(set(widths))))})"
        )
    return AttentionPlan(layer, heads)


class Capture:
    """The outputs of some modules at their latest forward call, kept by forward hooks."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        for i, module in enumerate(modules):
            module.register_forward_hook(self._keeper(i))

    def _keeper(self, i: int) -> Any:
        def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            self.outputs[i] = output

        return keep


class FeatureKD:
    """Distillation of the models' inner features beside the logits: each student layer's output against a teacher
    layer's (--hidden-weight) and the self-attention relations of the student's last layer against a teacher layer's
    (--attention-weight, read by forward hooks on the query/key/value projections). The fine-tuned teacher runs beside
    the student on every batch (eval mode, no gradients); a width projection, when one is needed, trains with it."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        kd: KDArgs,
        hidden: HiddenMap | None,
        projection: torch.nn.Module | None,
        attention: AttentionPlan | None,
        student: torch.nn.Module,
    ) -> None:
        self.teacher, self.kind, self.hidden, self.projection = teacher, kd.hidden_loss, hidden, projection
        self.attention = attention
        if attention is not None:
            self.student_qkv = Capture(attention_projections(student, -1))
            self.teacher_qkv = Capture(attention_projections(teacher, attention.layer - 1))

    @classmethod
    def setup(
        cls, cfg: RunConfig, task: Task, teacher_run: Path | None, accelerator: Any, student: torch.nn.Module
    ) -> FeatureKD | None:
        kd = cfg.kd
        if teacher_run is None or not (kd.hidden_weight or kd.attention_weight):
            return None
        from transformers import AutoModelForSequenceClassification

        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_model_dir(teacher_run, task))
        teacher = teacher.requires_grad_(False).eval().to(accelerator.device)
        hidden = hidden_layer_map(cfg, task) if kd.hidden_weight else None
        projection = None
        if hidden is not None and hidden.student_width != hidden.teacher_width:
            projection = HiddenProjection(len(hidden.layers), hidden.student_width, hidden.teacher_width)
            projection = accelerator.prepare(projection.to(accelerator.device))
        attention = attention_plan(cfg, task) if kd.attention_weight else None
        return cls(teacher, kd, hidden, projection, attention, student)

    def trainable(self, accelerator: Any) -> dict[str, torch.nn.Parameter]:
        """The projection's parameters, named for the checkpoint (so a resumed run continues them)."""
        if self.projection is None:
            return {}
        return {f"hidden_projection.{n}": p for n, p in accelerator.unwrap_model(self.projection).named_parameters()}

    def losses(
        self, batch: Batch, student_states: tuple[torch.Tensor, ...] | None, accelerator: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden-state loss, attention-relation loss) of the batch the student has just seen; None for a term
        that is off."""
        with torch.no_grad(), accelerator.autocast():
            teacher_states = self.teacher(**batch.inputs, output_hidden_states=self.hidden is not None).hidden_states
        mask = batch.inputs["attention_mask"]
        hidden = attention = None
        if self.hidden is not None:
            student = list(student_states[1:])  # [0] is the embeddings' output
            hidden = hidden_state_loss(
                self.projection(student) if self.projection is not None else student,
                [teacher_states[i] for i in self.hidden.layers],
                mask,
                self.kind,
            )
        if self.attention is not None:
            student_qkv, teacher_qkv = self.student_qkv.outputs, self.teacher_qkv.outputs
            attention = attention_relation_loss(student_qkv, teacher_qkv, mask, self.attention.heads)
        return hidden, attention

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.hidden is not None:
            projection = sum(p.numel() for p in self.projection.parameters()) if self.projection is not None else 0
            out.update(hidden_layers=self.hidden.layers, hidden_projection_params=projection)
        if self.attention is not None:
            out.update(attention_layer=self.attention.layer, attention_heads=self.attention.heads)
        return out


def data_splits(cfg: RunConfig, task: Task) -> list[str]:
    """The splits a run reads: train, the evaluation split(s), and the test rows it predicts when given."""
    return ["train", *task.eval_splits, *(["test"] if cfg.data.test_file else [])]


def teacher_config(cfg: RunConfig, output_dir: Path) -> RunConfig:
    """The run that --teacher-model asks for (--teacher-method, LoRA with its defaults): same task, data and seed;
    the teacher's own lr and epochs."""
    t = copy.deepcopy(cfg)
    t.model = type(cfg.model)(name=cfg.model.teacher_model, trust_remote_code=cfg.model.trust_remote_code)
    t.train.method = cfg.kd.teacher_method
    t.train.lr = cfg.kd.teacher_lr
    t.train.epochs = cfg.kd.teacher_epochs or DEFAULT_EPOCHS[cfg.kd.teacher_method]
    t.train.output_dir = str(output_dir)
    t.train.overwrite = t.train.resume = False  # an unfinished teacher resumes; a finished one is reused or replaced
    t.lora, t.kd = type(cfg.lora)(), type(cfg.kd)()
    return t


def ensure_teacher(cfg: RunConfig) -> Path:
    """Train the teacher into the run's teacher directory, or reuse the finished one there if trained alike."""
    tdir = rundir.teacher_dir(cfg.train.output_dir)
    tcfg = teacher_config(cfg, tdir)
    if rundir.is_run(tdir):
        same = rundir.same_config(tdir, tcfg)
        if same and rundir.read_run(tdir) is not None:
            say(f"reusing the finished teacher in {tdir}")
            return tdir
        tcfg.train.overwrite = not same  # the same teacher, unfinished, resumes from its checkpoint
    say(f"training the {tcfg.train.method} teacher ({cfg.model.teacher_model}) into {tdir}")
    run(tcfg)
    return tdir


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks


def model_source(cfg: RunConfig, teacher_run: Path | None) -> tuple[str, list[int] | None]:
    """The checkpoint the trained model starts from, and the encoder layers kept of it (a student cut from a teacher:
    its pretrained checkpoint as in the paper, or the fine-tuned teacher itself)."""
    m = cfg.model
    if cfg.train.method in DISTILLED and m.student_layers:
        if m.student_init == "teacher":
            return str(teacher_model_dir(teacher_run, load_task(cfg.data))), m.student_layers
        pretrained = rundir.read_config(teacher_run)["model"]["name"]
        if not pretrained:  # a distilled teacher cut from its own teacher has no pretrained checkpoint of its own
            raise KdloraError(
                f"--student-init pretrained: the teacher {teacher_run} was itself cut from another model; "
                "use --student-init teacher"
            )
        return pretrained, m.student_layers
    return m.name, None


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


def build_accelerator(tc: TrainArgs) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # accelerate keeps one global state: forget the last run's precision
    return Accelerator(
        mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum_steps, cpu=distributed_cpu()
    )


class TrainStep:
    """One micro-batch of training for every method: forward, objective, backward, clip and (at the end of an
    accumulation) the optimizer and scheduler step. Returns the loss parts [total, task, kd, hidden, attention], on
    the device.

    A non-finite loss sets `self.bad` on the device, and while it is set no update happens: a fused optimizer skips
    inside the kernel (as with a GradScaler), so no step waits on the host; other optimizer groups are skipped after a
    host check. The loop finds the non-finite loss when it moves losses to the host (LossLog.flush) and stops there,
    before any checkpoint."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, accelerator: Any, kd: KDArgs, regression: bool,
                 max_grad_norm: float, features: FeatureKD | None = None) -> None:  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.kd, self.regression, self.max_grad_norm, self.features = kd, regression, max_grad_norm, features
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
            out = self.model(**batch.inputs, output_hidden_states=features is not None and features.hidden is not None)
            hidden = attention = None
            if features is not None:
                hidden, attention = features.losses(batch, out.hidden_states, self.accelerator)
            parts = objective(
                out.logits,
                batch.labels,
                batch.teacher_logits,
                alpha=self.kd.alpha,
                temperature=self.kd.temperature,
                regression=self.regression,
                hidden=hidden,
                hidden_weight=self.kd.hidden_weight,
                attention=attention,
                attention_weight=self.kd.attention_weight,
            )
            self.bad |= ~torch.isfinite(parts.total)
            self.accelerator.backward(parts.total)
            if self.accelerator.sync_gradients and self.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
            fused = self.fused
            if fused:
                self.inner.found_inf = self.bad.float()  # skips the update on the device while set
            if fused or not self.bad.item():
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad()
        return torch.stack([p.detach() for p in parts])


@dataclass
class LossLog:
    """Loss per optimizer step, kept on the device and moved to the host in bulk (`flush`)."""

    history: dict[str, list[float]]  # LOSS_KEYS: one value per optimizer step
    pending: list[torch.Tensor] = field(default_factory=list)  # [5] per step, not yet moved
    micro: list[torch.Tensor] = field(default_factory=list)  # [5] per micro-batch of the step being accumulated

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

    def flush(self, out: Path) -> float | None:
        """Move the pending losses to the history; stop at a non-finite one. Returns the last step's loss."""
        rows, self.pending = (torch.stack(self.pending).tolist() if self.pending else []), []
        for row in rows:
            if not math.isfinite(row[0]):
                kept = rundir.checkpoint_dir(out)
                saved = f"; the last good checkpoint is kept in {kept}" if kept.exists() else ""
                raise KdloraError(
                    f"the loss became {row[0]} at step {len(self.history['train_loss']) + 1}{saved}: "
                    "lower --lr, or turn off --mixed-precision"
                )
            for key, value in zip(self.history, row, strict=True):
                self.history[key].append(value)
        return self.history["train_loss"][-1] if self.history["train_loss"] else None


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
    teacher = rundir.read_run(teacher_run) or {}
    return logits, {
        "teacher": str(teacher_run),
        "teacher_score": teacher.get("score"),
        "teacher_total_params": teacher.get("total_params"),
        "teacher_logits_cached": cached,
        "teacher_logits_seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def build_trained_model(
    cfg: RunConfig, task: Task, teacher_run: Path | None, out: Path, main: bool
) -> tuple[Any, Any, str, list[int] | None]:
    """The model the run trains (a student cut from the teacher is saved in the run, so that its adapter names a base
    that exists), with LoRA for the LoRA methods. Returns (model, tokenizer, source checkpoint, layers kept)."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)  # the head and LoRA initialisation depend on the seed and nothing else
    source, layers = model_source(cfg, teacher_run)
    model, tokenizer = build_model(source, task, "fft", layers=layers, trust_remote_code=cfg.model.trust_remote_code)
    if layers:
        base = rundir.save_student_base(out, model, tokenizer) if main else rundir.student_base_dir(out)
        model.name_or_path = model.config._name_or_path = str(base)
    if cfg.train.method in LORA_METHODS:
        model = add_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer, source, layers


def prepare_training(
    tc: TrainArgs, model: Any, loaders: Any, accelerator: Any, extra: torch.nn.Module | None
) -> tuple[Any, Any, Any, Any, dict[str, Any], int]:
    """AdamW over the model (and `extra`, a module that trains beside it) with a linear warm-up schedule, all of it
    handed to accelerate. Returns (model, optimizer, scheduler, train loader, eval loaders, optimizer steps)."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = build_optimizer(model.to(accelerator.device), tc.lr, tc.weight_decay, extra)
    total_steps = math.ceil(len(loaders.train) / tc.grad_accum_steps) * tc.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, loaders.train, scheduler)
    eval_loaders = {s: accelerator.prepare(loader) for s, loader in loaders.eval.items()}
    return model, optimizer, scheduler, train_loader, eval_loaders, total_steps


def fit(cfg: RunConfig, teacher_run: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train one run into cfg.train.output_dir and write its outputs; returns the metrics record."""
    from tqdm.auto import tqdm

    tc, task, out = cfg.train, load_task(cfg.data), Path(cfg.train.output_dir)
    accelerator = build_accelerator(tc)
    main, quiet = accelerator.is_main_process, tc.quiet or not accelerator.is_main_process
    if main:
        rundir.write_config(cfg)

    # Data, then the teacher's logits (by example id), then the model: the teacher is gone before the student loads.
    splits = load_splits(cfg.data, data_splits(cfg, task))
    labelled = len(splits["train"])
    splits["train"] = distil_examples(cfg, task, teacher_run, splits["train"])
    logits, teacher_record = distil_targets(cfg, task, teacher_run, splits["train"], accelerator, quiet)
    model, tokenizer, source, layers = build_trained_model(cfg, task, teacher_run, out, main)
    params: dict[str, Any] = {**count_parameters(model), "total_params": deployed_parameters(model)}
    if cfg.train.method in LORA_METHODS:  # what LoRA adapts, spelled out: reports group runs by it
        params["lora_target_modules"] = lora_targets(model)
    loaders = build_loaders(
        splits, tokenizer, task, cfg.data.max_length, tc.batch_size, tc.eval_batch_size, tc.seed,
        logits.rows_for if logits is not None else None,
    )  # fmt: skip

    # Feature distillation keeps the teacher beside the student (and a width projection that trains with it).
    features = FeatureKD.setup(cfg, task, teacher_run, accelerator, model)

    # Optimizer and schedule, all of it handed to accelerate.
    model, optimizer, scheduler, train_loader, eval_loaders, total_steps = prepare_training(
        tc, model, loaders, accelerator, features.projection if features else None
    )
    step = TrainStep(model, optimizer, scheduler, accelerator, cfg.kd, task.is_regression, tc.max_grad_norm, features)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainable.update(features.trainable(accelerator) if features else {})  # checkpointed, never saved with the model
    reset_peak_memory(accelerator.device)  # the peak covers training only: not a teacher trained or run before it

    # A killed run continues where its checkpoint left it: weights, optimizer, schedule, position and RNG.
    ckpt = restore(out, trainable, optimizer, scheduler) if resume else None
    progress = ckpt.progress if ckpt else Progress(history={k: [] for k in LOSS_KEYS})
    log, best = LossLog(progress.history), ckpt.best if ckpt else None
    seconds_before, start = progress.train_seconds, time.perf_counter()

    def checkpoint() -> None:
        log.flush(out)  # raises on a non-finite loss before it can be saved
        progress.train_seconds = seconds_before + time.perf_counter() - start
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if main:
            save_checkpoint(out, Checkpoint(progress, trainable, best, state, rng_state()))

    bar = tqdm(total=total_steps, initial=log.steps, desc=f"{tc.method} {task.name}", disable=quiet)
    for epoch in range(progress.epoch, tc.epochs):
        model.train()
        for batch in epoch_batches(train_loader, loaders.sampler, epoch, progress, ckpt, accelerator):
            parts = step(batch)
            progress.batches_done += 1
            if log.add(parts, accelerator):
                bar.update(1)
                if tc.save_steps and log.steps % tc.save_steps == 0:
                    checkpoint()
                elif log.steps % SYNC_EVERY == 0:
                    bar.set_postfix(loss=f"{log.flush(out):.4f}")
        ckpt = None
        log.flush(out)

        # Evaluate; keep the best epoch's trainable weights (only they can differ between epochs).
        result = evaluate(model, eval_loaders, task, accelerator)
        progress.epochs.append({"epoch": epoch + 1, **result})
        if not quiet:
            bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if progress.best_score is None or result["score"] > progress.best_score:
            progress.best_epoch, progress.best_score = epoch + 1, result["score"]
            best = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
        progress.epoch, progress.batches_done = epoch + 1, 0
        checkpoint()
    bar.close()

    # Finish: the best epoch's weights, the outputs, then the metrics record that marks the run finished.
    train_seconds = seconds_before + time.perf_counter() - start
    memory = peak_memory(accelerator.device)
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(best[n])
    metrics = run_record(cfg, task, progress, params, train_seconds, memory, accelerator, labelled)
    metrics["num_transfer_examples"] = len(loaders.train.dataset) - labelled
    if cfg.data.label_budget:  # the draw, recorded: which rows kept their labels is in data_fingerprint
        metrics["label_budget"] = {
            "budget": cfg.data.label_budget,
            "seed": cfg.data.label_seed,
            "counts": label_counts(splits["train"][:labelled], task),
        }
    metrics.update(features.record() if features else {})
    metrics.update(teacher_record, num_eval_examples={s: len(dl.dataset) for s, dl in eval_loaders.items()})
    metrics["data_fingerprint"] = data_fingerprint(splits["train"], task)
    if "test" in splits:
        metrics["num_test_predictions"] = write_test_predictions(
            out / rundir.PREDICTIONS, model, tokenizer, splits["test"], task, cfg.data.max_length,
            tc.eval_batch_size, accelerator,
        )  # fmt: skip
    if main:
        card = model_card(cfg, task, metrics, source, layers)
        metrics["merged_mb"] = rundir.save_outputs(out, accelerator.unwrap_model(model), tokenizer, tc.method, card)
        rundir.write_metrics(out, metrics)
    accelerator.wait_for_everyone()
    return {"status": "finished", **metrics}


LOSS_KEYS = ("train_loss", "train_loss_task", "train_loss_kd", "train_loss_hidden", "train_loss_attention")


def restore(out: Path, trainable: dict[str, torch.Tensor], optimizer: Any, scheduler: Any) -> Checkpoint | None:
    """Load the checkpoint of a killed run into the weights, optimizer and schedule; the RNG is set by the loop."""
    ckpt = load_checkpoint(out)
    if ckpt is None:
        return None
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(ckpt.trainable[n])
    optimizer.load_state_dict(ckpt.state["optimizer"])
    scheduler.load_state_dict(ckpt.state["scheduler"])
    for k in LOSS_KEYS:  # a checkpoint written before a feature term existed lacks its history
        ckpt.progress.history.setdefault(k, [0.0] * len(ckpt.progress.history["train_loss"]))
    say(f"resuming {out} at epoch {ckpt.progress.epoch + 1}, batch {ckpt.progress.batches_done}")
    return ckpt


def epoch_batches(
    loader: Any, sampler: Any, epoch: int, progress: Progress, ckpt: Checkpoint | None, accelerator: Any
) -> Any:
    """The epoch's batches: all of them, or those after the checkpoint's position when resuming in this epoch."""
    skip = progress.batches_done if epoch == progress.epoch else 0
    # accelerate's loader hands its own epoch counter to the sampler, so set it: a resumed run starts mid-count.
    sampler.set_epoch(epoch)  # directly too: with several processes accelerate's wrapper does not pass it on
    loader.set_epoch(epoch)
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    batches.set_epoch(epoch)
    if ckpt is not None:
        set_rng_state(ckpt.rng)
        accelerator.step = skip  # micro-batches already accumulated this epoch
    return batches


def label_counts(examples: list[Example], task: Task) -> dict[str, int]:
    """Labelled examples per class (regression: the count under "all")."""
    if task.is_regression:
        return {"all": len(examples)}
    names = task.label_names or tuple(map(str, range(task.num_labels)))
    return {names[c]: sum(e.label == c for e in examples) for c in range(task.num_labels)}


def run_record(
    cfg: RunConfig,
    task: Task,
    progress: Progress,
    params: dict[str, Any],
    train_seconds: float,
    memory: tuple[float, str],
    accelerator: Any,
    num_train_examples: int,
) -> dict[str, Any]:
    """metrics.json: the best epoch's scores, every epoch's, the loss history, costs, and where it ran."""
    best = {k: v for k, v in progress.epochs[progress.best_epoch - 1].items() if k != "epoch"}
    kept = ["train_loss"]
    if cfg.train.method in DISTILLED:
        kept += ["train_loss_task", "train_loss_kd"] + (["train_loss_hidden"] if cfg.kd.hidden_weight else [])
        kept += ["train_loss_attention"] if cfg.kd.attention_weight else []
    history = {k: progress.history[k] for k in kept}
    return {
        "task": task.name,
        "method": cfg.train.method,
        **best,
        "best_epoch": progress.best_epoch,
        "epochs": progress.epochs,
        **history,
        **params,
        "train_seconds": train_seconds,
        # On CPU: the process's peak RSS from the start of training (data, model, optimizer and activations).
        "peak_memory_mb": memory[0],
        "peak_memory_kind": memory[1],
        "num_train_examples": num_train_examples,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "kdlora_version": __version__,
    }
