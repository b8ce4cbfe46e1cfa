"""One training loop for fft, lora and kd-lora, on accelerate (CPU now, CUDA when present).

    kdlora train --method kd-lora --task cola --teacher-model all-MiniLM-L6-v2 --student-layers 0,2,4

runs the three steps of KD-LoRA: fine-tune the teacher (fft) into OUTPUT/teacher, cache its logits on the training
set, then train the student's LoRA matrices and head on α·L_task + (1-α)·L_KD.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from kdlora import __version__
from kdlora.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    Progress,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kdlora.config import RunConfig, save_config
from kdlora.data import Collator, LengthGroupedBatchSampler, TokenizedDataset, eval_batches, load_splits
from kdlora.errors import KdloraError
from kdlora.io import atomic_write_dir, atomic_write_json, read_run
from kdlora.losses import distillation_loss, task_loss
from kdlora.metrics import combine_splits, compute_metrics
from kdlora.models import add_lora, count_parameters, deployed_parameters, keep_layers, load_classifier, merge
from kdlora.tasks import Task, get_task
from kdlora.teacher import teacher_logits, teacher_model_dir

# ---------------------------------------------------------------------------------------------------------------------
# Setup


def check_output_dir(cfg: RunConfig) -> bool:
    """Whether output_dir holds a checkpointed unfinished run of this config to resume; raise if it may not be used.

    Read-only, so every process of a distributed run reaches the same verdict. A finished run or foreign files are only
    replaced with --overwrite; an unfinished run with another config too.
    """
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise KdloraError(f"--output-dir {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not cfg.train.overwrite:
        if read_run(out) is not None:
            raise KdloraError(f"{out} already holds a finished run: pass --overwrite to replace it")
        if not (out / "config.yaml").is_file():
            raise KdloraError(f"{out} is not empty and holds no kdlora run: use another --output-dir or --overwrite")
        if (out / CHECKPOINT_DIR).is_dir():
            if _comparable(yaml.safe_load((out / "config.yaml").read_text())) != _comparable(cfg):
                raise KdloraError(
                    f"{out} holds an unfinished run with another config: rerun it as it was to resume, or --overwrite"
                )
            return True
    if cfg.train.resume:
        raise KdloraError(f"--resume: {out} holds no checkpointed unfinished run to resume")
    return False


def clear_output_dir(cfg: RunConfig) -> None:
    """Empty output_dir for a new run, keeping a kd-lora run's teacher/ (reused when its config matches)."""
    out = Path(cfg.train.output_dir)
    if out.is_dir():
        for child in out.iterdir():
            if not (child.name == "teacher" and cfg.train.method == "kd-lora"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def distributed_cpu() -> bool:
    """True in CPU processes started by `accelerate launch`: accelerate then joins them in a gloo process group."""
    return not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1


def process_state() -> Any:
    from accelerate import PartialState

    return PartialState(cpu=distributed_cpu())


def say(message: str) -> None:
    """Print once, from the main process."""
    if process_state().is_main_process:
        print(message, flush=True)


def teacher_config(cfg: RunConfig, output_dir: Path) -> RunConfig:
    """The fft run that --teacher-model asks for: same task, data and seed; the teacher's own lr and epochs."""
    t = copy.deepcopy(cfg)
    t.model = type(cfg.model)(name=cfg.model.teacher_model, trust_remote_code=cfg.model.trust_remote_code)
    t.train.method = "fft"
    t.train.lr = cfg.kd.teacher_lr
    t.train.epochs = cfg.kd.teacher_epochs or cfg.train.epochs
    t.train.output_dir = str(output_dir)
    t.train.overwrite = t.train.resume = False  # an unfinished teacher resumes; a finished one is reused or replaced
    t.lora, t.kd = type(cfg.lora)(), type(cfg.kd)()
    return t


def _comparable(cfg: RunConfig | dict) -> dict:
    d = copy.deepcopy(cfg if isinstance(cfg, dict) else cfg.to_dict())
    for key in ("output_dir", "overwrite", "quiet", "resume", "save_steps"):  # settings that leave results alone
        d["train"].pop(key, None)
    d["kd"].pop("no_recompute", None)
    if d["model"].get("teacher"):  # one teacher reached through a link (a variant's tree) is still the same teacher
        d["model"]["teacher"] = os.path.realpath(d["model"]["teacher"])
    return d


def same_config(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run in `run_dir` was made with `cfg`, up to settings that leave results alone."""
    return _comparable(yaml.safe_load((run_dir / "config.yaml").read_text())) == _comparable(cfg)


def ensure_teacher(cfg: RunConfig, out: Path) -> Path:
    """Train the fft teacher into OUTPUT/teacher, or reuse the finished one there if it was trained the same way."""
    tdir = out / "teacher"
    tcfg = teacher_config(cfg, tdir)
    if (tdir / "config.yaml").is_file():
        same = same_config(tdir, tcfg)
        if same and read_run(tdir) is not None:
            say(f"reusing the finished teacher in {tdir}")
            return tdir
        tcfg.train.overwrite = not same  # the same teacher, unfinished, resumes from its checkpoint
    say(f"training the fft teacher ({cfg.model.teacher_model}) into {tdir}")
    run(tcfg)
    return tdir


def build_model(cfg: RunConfig, task: Task, teacher_run: Path | None, out: Path) -> tuple[torch.nn.Module, Any]:
    """The model to train and its tokenizer: the whole model (fft), or a base with LoRA and a trainable head."""
    m = cfg.model
    if cfg.train.method == "kd-lora" and m.student_layers:
        # The student keeps some layers of the teacher's pretrained checkpoint (as in the paper) or of the teacher.
        if m.student_init == "teacher":
            source = str(teacher_model_dir(teacher_run, task))
        else:
            source = yaml.safe_load((teacher_run / "config.yaml").read_text())["model"]["name"]
        model, tokenizer = load_classifier(source, task, m.trust_remote_code)
        keep_layers(model, m.student_layers)
        base = (out / "student_base").resolve()
        if process_state().is_main_process:
            atomic_write_dir(base, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
        model.name_or_path = model.config._name_or_path = str(base)  # so the adapter points at a base that exists
    else:
        model, tokenizer = load_classifier(m.name, task, m.trust_remote_code)
    if cfg.train.method != "fft":
        model = add_lora(model, cfg.lora)
    return model, tokenizer


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights take no decay
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        from kdlora.bench import reset_peak_rss

        reset_peak_rss()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from kdlora.bench import peak_rss_mb

    return peak_rss_mb()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: DataLoader, accelerator: Any, regression: bool) -> dict[str, torch.Tensor]:
    """Predictions over a loader: example ids, logits, predicted class (or value), and labels where present."""
    model.eval()
    ids, logits, labels = [], [], []
    for batch in loader:
        idx, y = batch.pop("idx"), batch.pop("labels", None)
        batch.pop("teacher_logits", None)
        out = model(**batch).logits.float()
        ids.append(accelerator.gather_for_metrics(idx).cpu())
        logits.append(accelerator.gather_for_metrics(out).cpu())
        if y is not None:
            labels.append(accelerator.gather_for_metrics(y).cpu())
    result = {"ids": torch.cat(ids), "logits": torch.cat(logits)}
    result["preds"] = result["logits"].squeeze(-1) if regression else result["logits"].argmax(-1)
    if labels:
        result["labels"] = torch.cat(labels)
    return result


def eval_loader(dataset: TokenizedDataset, tokenizer: Any, batch_size: int, regression: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=eval_batches(dataset.lengths, batch_size), collate_fn=Collator(tokenizer, regression)
    )


def evaluate(model: torch.nn.Module, loaders: dict[str, DataLoader], task: Task, accelerator: Any) -> dict[str, Any]:
    """Task metrics on every evaluation split, flattened, with the 0-100 `score`."""
    per_split = {}
    for split, loader in loaders.items():
        out = predict(model, loader, accelerator, task.is_regression)
        per_split[split] = compute_metrics(task, out["preds"].numpy(), out["labels"].numpy())
    return combine_splits(task, per_split)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run `kdlora train`: prepare the output directory, get a teacher when distilling, train, save. Returns metrics."""
    state, out = process_state(), Path(cfg.train.output_dir)
    resume = check_output_dir(cfg)
    state.wait_for_everyone()  # all processes have looked before the main one changes anything
    if state.is_main_process and not resume:
        clear_output_dir(cfg)
    state.wait_for_everyone()
    teacher_run = None
    if cfg.train.method == "kd-lora":
        teacher_run = Path(cfg.model.teacher) if cfg.model.teacher else ensure_teacher(cfg, out)
        teacher_model_dir(teacher_run, get_task(cfg.data.task))  # fail now, not after loading data
    return train(cfg, out, teacher_run, resume)


def train(cfg: RunConfig, out: Path, teacher_run: Path | None = None, resume: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    tc, task = cfg.train, get_task(cfg.data.task)
    # accelerate keeps one global state; forget the previous run's precision (the process group is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum_steps, cpu=distributed_cpu()
    )
    quiet = tc.quiet or not accelerator.is_main_process
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")

    # Data, then the teacher's logits (looked up by example id), then the model: the teacher is gone before the student.
    splits = load_splits(cfg.data, ["train", *task.eval_splits])
    cached, t_logits_seconds = None, 0.0
    if teacher_run is not None:
        t0 = time.perf_counter()
        with accelerator.main_process_first():  # the main process computes and caches, the others read the cache
            logits, cached = teacher_logits(
                teacher_run,
                splits["train"],
                task,
                cfg.data.max_length,
                batch_size=tc.eval_batch_size,
                device=accelerator.device,
                quiet=quiet,
                recompute=not cfg.kd.no_recompute,
            )
        t_logits_seconds = time.perf_counter() - t0
    set_seed(tc.seed)  # the head and LoRA initialisation depend on the seed and nothing else
    model, tokenizer = build_model(cfg, task, teacher_run, out)
    params = count_parameters(model)
    total_params = deployed_parameters(model)

    train_ds = TokenizedDataset(splits["train"], tokenizer, cfg.data.max_length)
    if teacher_run is not None:
        train_ds.teacher_logits = logits.rows_for(train_ds.ids)
    sampler = LengthGroupedBatchSampler(train_ds.lengths, tc.batch_size, tc.seed)
    # The loader's own generator keeps it from drawing on the global RNG, which drives dropout and is checkpointed.
    train_loader = DataLoader(
        train_ds,
        batch_sampler=sampler,
        collate_fn=Collator(tokenizer, task.is_regression),
        generator=torch.Generator().manual_seed(tc.seed),
    )
    eval_loaders = {
        s: eval_loader(
            TokenizedDataset(splits[s], tokenizer, cfg.data.max_length),
            tokenizer,
            tc.eval_batch_size,
            task.is_regression,
        )
        for s in task.eval_splits
    }
    optimizer = _optimizer(model, tc.lr, tc.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / tc.grad_accum_steps)
    total_steps = steps_per_epoch * tc.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {s: accelerator.prepare(loader) for s, loader in eval_loaders.items()}
    reset_peak_memory(accelerator.device)  # the peak covers training only: not a teacher trained or run before it

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ckpt = load_checkpoint(out) if resume else None
    progress = (
        ckpt.progress if ckpt else Progress(history={"train_loss": [], "train_loss_task": [], "train_loss_kd": []})
    )
    history, epochs = progress.history, progress.epochs
    best_state = ckpt.best if ckpt else None
    if ckpt:  # continue a killed run: weights, optimizer, schedule and position; the RNG is set below
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(ckpt.trainable[n])
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        say(f"resuming {out} at epoch {progress.epoch + 1}, batch {progress.batches_done}")

    def checkpoint() -> None:
        progress.train_seconds = seconds_before + time.perf_counter() - start
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if accelerator.is_main_process:
            save_checkpoint(out, Checkpoint(progress, dict(trainable), best_state, state, rng_state()))

    kd = cfg.kd
    bar = tqdm(total=total_steps, initial=len(history["train_loss"]), desc=f"{tc.method} {task.name}", disable=quiet)
    seconds_before, start = progress.train_seconds, time.perf_counter()
    for epoch in range(progress.epoch, tc.epochs):
        model.train()
        skip = progress.batches_done if epoch == progress.epoch else 0
        # accelerate's loader hands its own epoch counter to the sampler, so set it: a resumed run starts mid-count.
        sampler.set_epoch(epoch)  # directly too: with several processes accelerate's wrapper does not pass it on
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        batches.set_epoch(epoch)
        if ckpt:
            set_rng_state(ckpt.rng)
            accelerator.step = skip  # micro-batches already accumulated this epoch
        ckpt = None
        acc: list[torch.Tensor] = []
        for batch in batches:
            with accelerator.accumulate(model):
                batch.pop("idx")
                labels, t = batch.pop("labels"), batch.pop("teacher_logits", None)
                logits = model(**batch).logits
                if t is None:
                    loss = hard = task_loss(logits, labels, task.is_regression)
                    soft = torch.zeros((), device=loss.device)
                else:
                    loss, hard, soft = distillation_loss(
                        logits, t, labels, alpha=kd.alpha, temperature=kd.temperature, regression=task.is_regression
                    )
                if not torch.isfinite(loss):  # stop before a bad step reaches the weights or a checkpoint
                    kept = out / CHECKPOINT_DIR
                    saved = f"; the last good checkpoint is kept in {kept}" if kept.exists() else ""
                    raise KdloraError(
                        f"the loss became {loss.item()} at step {len(history['train_loss']) + 1}{saved}: "
                        "lower --lr, or turn off --mixed-precision"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            acc.append(torch.stack([loss.detach(), hard.detach(), soft.detach()]))
            progress.batches_done += 1
            if accelerator.sync_gradients:
                step_loss = accelerator.reduce(torch.stack(acc).mean(0), reduction="mean")  # over processes
                for key, value in zip(history, step_loss.tolist(), strict=True):
                    history[key].append(value)
                acc = []
                bar.update(1)
                bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}")
                if tc.save_steps and len(history["train_loss"]) % tc.save_steps == 0:
                    checkpoint()
        result = evaluate(model, eval_loaders, task, accelerator)
        epochs.append({"epoch": epoch + 1, **result})
        if not quiet:
            bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if progress.best_score is None or result["score"] > progress.best_score:
            # Keep the best epoch's weights: only the trainable ones can differ between epochs.
            progress.best_epoch, progress.best_score = epoch + 1, result["score"]
            best_state = {n: p.detach().to("cpu", copy=True) for n, p in trainable}
        progress.epoch, progress.batches_done = epoch + 1, 0
        checkpoint()
    bar.close()
    train_seconds = seconds_before + time.perf_counter() - start
    peak_mb = peak_memory_mb(accelerator.device)
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(best_state[n])

    best_metrics = epochs[progress.best_epoch - 1]
    metrics = {
        "status": "finished",
        "task": task.name,
        "method": tc.method,
        **{k: v for k, v in best_metrics.items() if k != "epoch"},
        "best_epoch": progress.best_epoch,
        "epochs": epochs,
        **(history if tc.method == "kd-lora" else {"train_loss": history["train_loss"]}),
        **params,
        "total_params": total_params,
        "train_seconds": train_seconds,
        "peak_memory_mb": peak_mb,
        # On CPU: the process's peak RSS from the start of training (data, model, optimizer and activations).
        "peak_memory_kind": "cuda_max_allocated" if accelerator.device.type == "cuda" else "process_peak_rss",
        "num_train_examples": len(train_ds),
        "num_eval_examples": {s: len(loader.dataset) for s, loader in eval_loaders.items()},
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "kdlora_version": __version__,
    }
    if teacher_run is not None:
        teacher = read_run(teacher_run) or {}
        metrics.update(
            teacher=str(teacher_run),
            teacher_score=teacher.get("score"),
            teacher_total_params=teacher.get("total_params"),
            teacher_logits_cached=cached,
            teacher_logits_seconds=t_logits_seconds,
        )
    if accelerator.is_main_process:
        save_outputs(accelerator.unwrap_model(model), tokenizer, out, tc.method)
        metrics["merged_mb"] = sum(f.stat().st_size for f in (out / "merged").glob("*.safetensors")) / 2**20
        atomic_write_json(out / "metrics.json", metrics)  # written last: its presence marks the run finished
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # a finished run needs no checkpoint
    accelerator.wait_for_everyone()
    return metrics


def save_outputs(model: torch.nn.Module, tokenizer: Any, out: Path, method: str) -> None:
    """adapter/ (peft adapter with the head) for LoRA methods, and merged/: a plain transformers model + tokenizer."""
    if method != "fft":
        atomic_write_dir(out / "adapter", lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
        model = merge(model)
    atomic_write_dir(out / "merged", lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
