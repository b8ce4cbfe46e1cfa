"""The pipeline of one run: the paper's three steps, and the run built from its config for the loop.

    kdlora train --method kd-lora --task cola --teacher-model all-MiniLM-L6-v2 --student-layers 0,2,4

`run` checks everything (`preflight`), holds the output directory, gets the teacher (fine-tunes it, or reuses a
finished run), then `fit`s: `build` makes the loop's parts from the config (data, the teacher's cached targets, the
model, loaders, optimizer, schedule, a killed run's state), `loop.loop` trains, and `finish` writes the outputs and
the metrics record that marks the run finished.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdlora import __version__, rundir
from kdlora.card import model_card
from kdlora.checkpoint import Progress
from kdlora.config import DEFAULT_EPOCHS, DISTILLED, LORA_METHODS, RunConfig, TrainArgs
from kdlora.data import (
    Example,
    Loaders,
    build_loaders,
    data_fingerprint,
    load_splits,
    load_task,
    read_unlabeled,
)
from kdlora.env import peak_memory, process_state, reset_peak_memory, say
from kdlora.errors import KdloraError
from kdlora.evaluate import write_test_predictions
from kdlora.features import FeatureKD, attention_plan, hidden_layer_map
from kdlora.kinds import kind_of
from kdlora.loop import Parts, Record, TrainStep, build_accelerator, build_optimizer, loop, loss_keys, restore
from kdlora.losses import Term, active_terms
from kdlora.lrfind import (
    BANDS,
    MAX_RESTARTS,
    RULE,
    Collapse,
    Guard,
    Plan,
    Probe,
    plot,
    probe_steps,
    range_test,
)
from kdlora.models import (
    add_lora,
    build_model,
    check_model,
    count_parameters,
    deployed_parameters,
    enable_gradient_checkpointing,
    load_masked_lm,
    lora_targets,
    merge,
)
from kdlora.tasks import Task
from kdlora.teacher import distil_examples, distil_targets, noisy_view, teacher_model_dir

# ---------------------------------------------------------------------------------------------------------------------
# The paper's three steps


def run(cfg: RunConfig, probe_only: bool = False) -> dict[str, Any]:
    """`kdlora train`: check everything, hold the output directory, get a teacher when distilling, fit. Returns the
    metrics record. `probe_only` (`kdlora lr-find`): stop after the lr range test, its plan kept in the run."""
    if probe_only:
        cfg = copy.deepcopy(cfg)
        cfg.train.lr = "auto"
    state = process_state()
    pipe = pipeline(cfg)
    task = pipe.preflight(cfg)
    kept = (rundir.TEACHER,) if cfg.train.method in DISTILLED else ()  # rundir.clear keeps a distilled run's teacher/
    rundir.refuse_own_inputs(cfg.train.output_dir, rundir.input_paths(cfg), kept=kept)
    with rundir.locked(cfg.train.output_dir) if state.is_main_process else contextlib.nullcontext():
        resume = rundir.check(cfg)
        state.wait_for_everyone()  # all processes have looked before the main one changes anything
        if state.is_main_process and not resume:
            rundir.clear(cfg)
        state.wait_for_everyone()
        teacher_run = None
        if cfg.train.method in DISTILLED and cfg.kd.teacher_method != "none":  # none: --teacher-model as it is
            teacher_run = Path(cfg.model.teacher) if cfg.model.teacher else ensure_teacher(cfg)
            pipe.check_teacher_run(teacher_run, task)
        if probe_only:
            return pipe.build(cfg, teacher_run, resume).plan.record()
        return fit(cfg, teacher_run, resume)


def pipeline(cfg: RunConfig) -> Any:
    """What builds, checks and finishes a run of this data: this module's functions for a classifier or a regressor,
    lm's for a causal language model (which builds on this module's lr plan and optimizer, so it is imported here)."""
    if cfg.data.generative:
        from kdlora import lm

        return lm
    return sys.modules[__name__]


def check_teacher_run(run_dir: Path, task: Task) -> None:
    teacher_model_dir(run_dir, task)


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
    if cfg.kd.transfer_weight == "confidence" and task.kind != "classification":
        raise KdloraError(f"--transfer-weight confidence reads a teacher's class probabilities: {task.name} is a "
                          f"{task.kind} task")  # fmt: skip
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
    t.train.max_steps = None  # the student's --max-steps is the student's
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
# The run, built from its config


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


# ---------------------------------------------------------------------------------------------------------------------
# build -> loop -> finish


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


def schedule(tc: TrainArgs, loaders: Loaders) -> tuple[int, int]:
    """(epochs, optimizer steps) of the run: --epochs whole passes, or with --max-steps as many epochs as those
    steps take (the loop stops the last one at the step)."""
    per_epoch = math.ceil(len(loaders.train) / tc.grad_accum_steps)
    if tc.max_steps:
        return math.ceil(tc.max_steps / per_epoch), tc.max_steps
    return tc.epochs, per_epoch * tc.epochs


def prepare_training(
    tc: TrainArgs, lr: float, model: Any, loaders: Loaders, accelerator: Any, extra: torch.nn.Module | None
) -> tuple[Any, Any, Any, dict[str, Any], int]:
    """AdamW over the (prepared) model and `extra`, a module that trains beside it, at `lr` with a linear warm-up
    schedule, handed to accelerate with the loaders. Returns (optimizer, scheduler, train loader, eval loaders,
    optimizer steps)."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = build_optimizer(model, lr, tc.weight_decay, extra)
    _, total_steps = schedule(tc, loaders)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    optimizer, train_loader, scheduler = accelerator.prepare(optimizer, loaders.train, scheduler)
    eval_loaders = {s: accelerator.prepare(loader) for s, loader in loaders.eval.items()}
    return optimizer, scheduler, train_loader, eval_loaders, total_steps


def lr_plan(cfg: RunConfig, out: Path, resume: bool, probe: Any) -> Plan:
    """The lr this attempt trains at: a resumed run's plan (no second probe), the given --lr, or the range test's
    (`probe()`); `build` writes it to the run directory before the first step."""
    plan = Plan.load(out) if resume else None
    if plan is None:
        if cfg.train.lr == "auto":
            result = probe()
            plan = Plan(given="auto", lr=result.lr, probe=result)
            say(f"lr auto: {result.lr:.3g} ({result.steps}-step range test in {result.seconds:.0f} s; {RULE})")
        else:
            plan = Plan(given=cfg.train.lr, lr=float(cfg.train.lr))
    return plan


@dataclass
class Built:
    """A run built from its config: the loop's parts, and what the run's outputs need beside them."""

    cfg: RunConfig
    parts: Parts
    terms: tuple[Term, ...]
    tokenizer: Any
    splits: dict[str, list[Example]]  # splits["train"]: the labelled rows, then the transfer set
    labelled: int  # how many of splits["train"] carry labels
    source: str  # the checkpoint the model starts from
    layers: list[int] | None  # the layers kept of it (a student)
    params: dict[str, Any]  # parameter counts, the modules LoRA adapts
    teacher: dict[str, Any]  # what the record says of the teacher
    features: FeatureKD | None
    plan: Plan  # the lr: given, probed or lowered by the collapse guard


def build(cfg: RunConfig, teacher_run: Path | None = None, resume: bool = False, plan: Plan | None = None) -> Built:
    """Everything the loop runs, from the config: data, then the teacher's logits (by example id), then the model (the
    teacher is gone before the student loads), loaders, the live teacher for feature terms, optimizer and schedule,
    and a killed run's state restored."""
    tc, task, out = cfg.train, load_task(cfg.data), Path(cfg.train.output_dir)
    accelerator = build_accelerator(tc, tc.report_to or (), logging_dir=str(out / rundir.LOGS))
    main, quiet = accelerator.is_main_process, tc.quiet or not accelerator.is_main_process
    if main:
        rundir.write_config(cfg)
    splits = load_splits(cfg.data, data_splits(cfg, task))
    labelled = len(splits["train"])
    splits["train"] = distil_examples(cfg, task, teacher_run, splits["train"])
    logits, teacher = distil_targets(cfg, task, teacher_run, splits["train"], accelerator, quiet)
    if cfg.kd.student_noise and teacher_run is not None:  # after the teacher has labelled the clean text
        splits["train"] = noisy_view(
            teacher_run, splits["train"], task, labelled, cfg.kd.student_noise, cfg.kd.augment_neighbours, tc.seed
        )
    model, tokenizer, source, layers = build_trained_model(cfg, task, teacher_run, out, main)
    params: dict[str, Any] = {**count_parameters(model), "total_params": deployed_parameters(model)}
    if cfg.train.method in LORA_METHODS:  # what LoRA adapts, spelled out: reports group runs by it
        params["lora_target_modules"] = lora_targets(model)
    transfer, ratio = len(splits["train"]) - labelled, cfg.kd.transfer_ratio
    per_epoch = min(transfer, round(ratio * labelled)) if ratio and transfer else None
    loaders = build_loaders(
        splits, tokenizer, task, cfg.data.max_length, tc.batch_size, tc.eval_batch_size, tc.seed,
        logits.rows_for if logits is not None else None, labelled, per_epoch,
    )  # fmt: skip
    features = FeatureKD.setup(cfg, task, teacher_run, accelerator, model)
    extra = features.projection if features else None
    model = accelerator.prepare(model.to(accelerator.device))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainable.update(features.trainable(accelerator) if features else {})  # checkpointed, never saved with the model
    terms = active_terms(cfg.kd, teacher_run is not None)
    epochs, steps = schedule(tc, loaders)

    def make_step(optimizer: Any, scheduler: Any) -> TrainStep:
        return TrainStep(
            model, optimizer, scheduler, accelerator, cfg.kd, kind_of(task), tc.max_grad_norm, features, terms
        )

    def probe() -> Probe:  # --lr auto: the range test on this very model, data and objective
        return range_test(
            model, make_step, lambda lr: build_optimizer(model, lr, tc.weight_decay, extra), loaders.train,
            loaders.sampler, accelerator, trainable, probe_steps(steps),
            BANDS["lora" if tc.method in LORA_METHODS else "full"],
        )  # fmt: skip

    if plan is None:  # a restart's plan is the pipeline's, already written
        plan = lr_plan(cfg, out, resume, probe)
        if main:
            plan.save(out)  # rewritten unchanged on a resume: cheap, and the file is the plan
            if plan.probe is not None and not (out / rundir.LR_PLOT).is_file():
                plot(plan.probe, out / rundir.LR_PLOT, f"{tc.method} {task.name}: lr range test")
    accelerator.wait_for_everyone()
    optimizer, scheduler, train_loader, eval_loaders, total_steps = prepare_training(
        tc, plan.lr, model, loaders, accelerator, extra
    )
    step = make_step(optimizer, scheduler)
    keys = loss_keys(terms)
    # A killed run continues where its checkpoint left it: weights, optimizer, schedule, position and RNG.
    ckpt = restore(out, trainable, optimizer, scheduler, keys) if resume else None
    prior = kind_of(task).prior_loss([e.label for e in splits["train"][:labelled]])
    retry = tc.on_collapse == "retry" and len(plan.restarts) < MAX_RESTARTS
    guard = Guard(prior, "train_loss_task", math.ceil(len(loaders.train) / tc.grad_accum_steps), epochs, retry)
    parts = Parts(
        accelerator, model, step, train_loader, loaders.sampler, eval_loaders, trainable, task, epochs,
        total_steps, keys, out, tc.save_steps, ckpt, quiet, f"{tc.method} {task.name}", trackers(cfg, accelerator),
        guard,
    )  # fmt: skip
    return Built(cfg, parts, terms, tokenizer, splits, labelled, source, layers, params, teacher, features, plan)


def trackers(cfg: RunConfig, accelerator: Any) -> Any:
    """--report-to: start accelerate's trackers with the resolved config; returns the loop's on_log (or None)."""
    if not cfg.train.report_to:
        return None
    flat = {f"{s}.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
            for s, section in cfg.to_dict().items() for k, v in section.items()}  # fmt: skip
    accelerator.init_trackers(Path(cfg.train.output_dir).name or "kdlora", config=flat)
    return lambda values, step: accelerator.log(values, step=step)


def fit(cfg: RunConfig, teacher_run: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train one run into cfg.train.output_dir and write its outputs; returns the metrics record. A run that
    collapses (or whose loss becomes non-finite) restarts from its initial weights at a lower lr (--on-collapse)."""
    out, plan, pipe = Path(cfg.train.output_dir), None, pipeline(cfg)
    while True:
        built = pipe.build(cfg, teacher_run, resume, plan)
        reset_peak_memory(built.parts.accelerator.device)  # the peak covers training only: not a teacher before it
        t0 = time.perf_counter()
        try:
            return pipe.finish(built, loop(built.parts))
        except Collapse as collapse:
            plan = built.plan
            if cfg.train.on_collapse == "stop" or len(plan.restarts) >= MAX_RESTARTS:
                raise
            lower = plan.restart(collapse, time.perf_counter() - t0)
            say(f"{collapse}: restarting from the initial weights at lr {lower:.3g} "
                f"(restart {len(plan.restarts)} of at most {MAX_RESTARTS})")  # fmt: skip
            if built.parts.accelerator.is_main_process:
                shutil.rmtree(rundir.checkpoint_dir(out), ignore_errors=True)  # the failed attempt's: never resumed
                plan.save(out)
            built.parts.accelerator.wait_for_everyone()
            resume = False


def finish(built: Built, record: Record) -> dict[str, Any]:
    """The outputs of a trained run (the best epoch's weights are in the model): test predictions, adapter/ and
    merged/ with the model card, then metrics.json, which marks the run finished."""
    cfg, parts, out = built.cfg, built.parts, Path(built.cfg.train.output_dir)
    accelerator, task, tc = parts.accelerator, parts.task, cfg.train
    bad = [n for n, p in parts.trainable.items() if not torch.isfinite(p).all()]
    if bad:  # never saved as finished: a model of non-finite weights answers nothing
        raise KdloraError(f"the trained weights are not finite ({bad[0]}): lower --lr; the run is not marked finished")
    memory = peak_memory(accelerator.device)
    metrics = run_record(cfg, task, record, built, memory, accelerator)
    if "test" in built.splits:
        metrics["num_test_predictions"] = write_test_predictions(
            out / rundir.PREDICTIONS, parts.model, built.tokenizer, built.splits["test"], task, cfg.data.max_length,
            tc.eval_batch_size, accelerator,
        )  # fmt: skip
    card = model_card(cfg, task, metrics, built.source, built.layers) if accelerator.is_main_process else ""
    return write_outputs(cfg, accelerator, accelerator.unwrap_model(parts.model), built.tokenizer, card, metrics)


def write_outputs(cfg: RunConfig, accelerator: Any, model: Any, tokenizer: Any, card: str,
                  metrics: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """adapter/ (the LoRA methods) and merged/, each with the model card, then metrics.json, which marks the run
    finished (the main process writes; the others wait). Returns the record."""
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        if cfg.train.method in LORA_METHODS:
            rundir.save_adapter(out, model, tokenizer, card)
            model = merge(model)
        metrics["merged_mb"] = rundir.save_merged(out, model, tokenizer, card)
        rundir.write_metrics(out, metrics)
    if cfg.train.report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {"status": "finished", **metrics}


def run_record(
    cfg: RunConfig, task: Task, record: Record, built: Built, memory: tuple[float, str], accelerator: Any
) -> dict[str, Any]:
    """metrics.json: the best epoch's scores, every epoch's, the loss history (the total, and each term's when there
    are several), costs, the data and teacher, and where it ran."""
    progress: Progress = record.progress
    best = {k: v for k, v in progress.epochs[progress.best_epoch - 1].items() if k != "epoch"}
    kept = built.parts.keys if len(built.terms) > 1 else ["train_loss"]
    metrics = {
        "task": task.name,
        "method": cfg.train.method,
        **best,
        "best_epoch": progress.best_epoch,
        "epochs": progress.epochs,
        **{k: progress.history[k] for k in kept},
        **built.params,
        "train_seconds": record.train_seconds,
        # On CPU: the process's peak RSS from the start of training (data, model, optimizer and activations).
        "peak_memory_mb": memory[0],
        "peak_memory_kind": memory[1],
        "num_train_examples": built.labelled,
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "kdlora_version": __version__,
        "num_transfer_examples": len(built.splits["train"]) - built.labelled,
        "rows_per_epoch": built.parts.sampler.rows,  # fewer with --transfer-ratio: transfer rows drawn per epoch
        "optimizer_steps": len(progress.history["train_loss"]),
    }
    if cfg.data.label_budget:  # the draw, recorded: which rows kept their labels is in data_fingerprint
        counts = kind_of(task).label_counts([e.label for e in built.splits["train"][: built.labelled]], task)
        metrics["label_budget"] = {"budget": cfg.data.label_budget, "seed": cfg.data.label_seed, "counts": counts}
    metrics.update(built.plan.record())
    # The guard's verdict: the epochs from the first on that predicted one constant at the prior's loss; the run
    # ended collapsed when every epoch did (no restart left, or --on-collapse stop).
    metrics["collapsed_epochs"] = built.parts.guard.collapsed if built.parts.guard else []
    metrics["collapsed"] = len(metrics["collapsed_epochs"]) == len(progress.epochs)
    metrics.update(built.features.record() if built.features else {})
    metrics.update(built.teacher, num_eval_examples={s: len(dl.dataset) for s, dl in built.parts.eval_loaders.items()})
    metrics["data_fingerprint"] = data_fingerprint(built.splits["train"], task)
    return metrics
