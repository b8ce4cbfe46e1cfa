"""The run directory: the only module that knows its file names and its rules.

    OUTPUT/
      config.yaml      the resolved config, written first
      checkpoint/      resume state of an unfinished run (removed when it finishes)
      teacher/         kd-lora with --teacher-model: the fft teacher's own run directory
      logits/          in a teacher's run: its cached logits, one file per fingerprint
      student_base/    kd-lora with --student-layers: the student before LoRA
      adapter/         lora, kd-lora: the peft adapter with the head
      merged/          a plain transformers model and tokenizer (LoRA folded in)
      metrics.json     written last: its "status": "finished" marks a finished run
      inference.json   `kdlora compare`: timings of the merged model
      predictions.csv  with --test-file: the test rows' predicted labels and probabilities
      .lock            while a run uses the directory: its process id and host

A directory with a config.yaml is a run; a run with a finished metrics.json is finished. Nothing else counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdlora.config import DISTILLED, RunConfig, build_config, comparable, save_config
from kdlora.env import process_alive
from kdlora.errors import KdloraError
from kdlora.io import atomic_write_dir, atomic_write_json, load_yaml

CONFIG = "config.yaml"
METRICS = "metrics.json"
INFERENCE = "inference.json"
CHECKPOINT = "checkpoint"
TEACHER = "teacher"
LOGITS = "logits"
STUDENT_BASE = "student_base"
ADAPTER = "adapter"
MERGED = "merged"
PREDICTIONS = "predictions.csv"
LR = "lr.json"  # the lr plan: given or probed (--lr auto), and the collapse guard's restarts
LR_PLOT = "lr_find.png"  # the range test's curve
LOGS = "logs"  # --report-to: the trackers' files (TensorBoard event files)
LOCK = ".lock"
# What `kdlora report` reads of a run: everything but the weights (the architecture is merged/config.json).
GENERATIONS = "generations.jsonl"  # a language model's greedy completions of the first validation rows
SMALL_FILES = (CONFIG, METRICS, INFERENCE, LR, GENERATIONS, f"{MERGED}/config.json")  # a run without its weights


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def is_run(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The metrics of a finished run in `run_dir`, or None if there is none (or it is unfinished)."""
    try:
        metrics = json.loads((Path(run_dir) / METRICS).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("status") == "finished" else None


def read_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's config as written (nested dicts), or None when there is none or it is not a kdlora config."""
    try:
        values = load_yaml(Path(run_dir) / CONFIG, "run config")
    except (OSError, KdloraError):
        return None
    ok = isinstance(values, dict) and isinstance(values.get("train"), dict) and "method" in values["train"]
    return values if ok else None


def read_inference(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / INFERENCE).read_text())
    except (OSError, ValueError):
        return None


def result_config(values: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """A config as compared between runs: rebuilt with today's defaults (so a field added since is its default, not a
    difference), without the settings that leave results alone, a teacher reached through a link resolved."""
    if isinstance(values, dict):
        try:
            values = build_config(values)
        except KdloraError:
            pass  # a config this version cannot build is compared as written, and so differs
    d = comparable(values)
    if d.get("model", {}).get("teacher"):
        d["model"]["teacher"] = os.path.realpath(d["model"]["teacher"])
    return d


def same_config(run_dir: str | Path, cfg: RunConfig) -> bool:
    """Whether the run in `run_dir` was made with `cfg`, up to settings that leave results alone."""
    stored = read_config(run_dir)
    return stored is not None and result_config(stored) == result_config(cfg)


def model_dir(path: str | Path) -> Path:
    """The model directory behind `path`: a finished run's merged/, or `path` itself if it is a model directory."""
    path = Path(path)
    if not path.is_dir():
        raise KdloraError(f"--model-dir {path} does not exist")
    if is_run(path) or (path / METRICS).exists():
        if read_run(path) is None:
            raise KdloraError(f"{path} is an unfinished run: it has no finished {METRICS}")
        path = path / MERGED
    if not (path / "config.json").is_file():
        raise KdloraError(f"{path} is not a model directory (no config.json)")
    return path


def merged_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / MERGED


def teacher_dir(out: str | Path) -> Path:
    """Where `--teacher-model` trains the fft teacher of a kd-lora run."""
    return Path(out) / TEACHER


def logits_path(teacher_run: str | Path, fingerprint: str) -> Path:
    return Path(teacher_run) / LOGITS / f"train-{fingerprint[:16]}.safetensors"


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT


def artefacts(out: str | Path) -> list[Path]:
    """What a finished run offers the user, in the order worth reading."""
    return [Path(out) / p for p in (ADAPTER, MERGED, METRICS, CONFIG) if (Path(out) / p).exists()]


# ---------------------------------------------------------------------------------------------------------------------
# Preparing


def check(cfg: RunConfig) -> bool:
    """Whether output_dir holds a checkpointed unfinished run of this config to resume; raise if it may not be used.

    Read-only, so every process of a distributed run reaches the same verdict. A finished run or foreign files are only
    replaced with --overwrite; an unfinished run with another config too.
    """
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise KdloraError(f"--output-dir {out} is a file, not a directory")
    # A distilled run killed while its --teacher-model trained holds only teacher/: its own, to resume
    own = {LOCK, TEACHER} if cfg.train.method in DISTILLED else {LOCK}
    if out.exists() and any(p.name not in own for p in out.iterdir()) and not cfg.train.overwrite:
        if read_run(out) is not None:
            raise KdloraError(f"{out} already holds a finished run: pass --overwrite to replace it")
        if not is_run(out):
            raise KdloraError(f"{out} is not empty and holds no kdlora run: use another --output-dir or --overwrite")
        if checkpoint_dir(out).is_dir() or (out / LR).is_file():  # a probed lr is kept: resumed, never re-probed
            if not same_config(out, cfg):
                raise KdloraError(
                    f"{out} holds an unfinished run with another config: rerun it as it was to resume, or --overwrite"
                )
            return True
    if cfg.train.resume:
        raise KdloraError(f"--resume: {out} holds no checkpointed unfinished run to resume")
    return False


def input_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    """(flag, path) of every local path a run reads: models, the teacher run, the data files and directories."""
    m, d, kd = cfg.model, cfg.data, cfg.kd
    named = [("--model", m.name), ("--teacher", m.teacher), ("--teacher-model", m.teacher_model),
             ("--data-dir", d.data_dir), ("--dataset", d.dataset), ("--train-file", d.train_file),
             ("--validation-file", d.validation_file), ("--test-file", d.test_file),
             ("--unlabeled-file", kd.unlabeled_file), ("--augment-mlm", kd.augment_mlm)]  # fmt: skip
    return [(flag, path) for flag, path in named if path and Path(path).expanduser().exists()]


def refuse_own_inputs(
    out: str | Path, inputs: list[tuple[str, str]], flag: str = "--output-dir", kept: tuple[str, ...] = ()
) -> None:
    """The one rule: a command never deletes or writes over a path it reads. Refuse, in one line naming both flags,
    an output that is an input, holds one, or lies inside one (real paths: links and `..` resolved). `kept`: names
    in the output that the command leaves as they are (a distilled run's teacher/)."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    for name, path in inputs:
        source = Path(os.path.realpath(Path(path).expanduser()))
        if any(source == target / k or target / k in source.parents for k in kept):
            continue
        if target == source:
            how = "is"
        elif target in source.parents:
            how = "holds"
        elif source.is_dir() and source in target.parents:
            how = "lies inside"
        else:
            continue
        raise KdloraError(
            f"{flag} {out} {how} {name} {path}: a command never writes over what it reads; choose another {flag}"
        )


def clear(cfg: RunConfig) -> None:
    """Empty output_dir for a new run, keeping a kd-lora run's teacher/ (reused when its config matches)."""
    out = Path(cfg.train.output_dir)
    if out.is_dir():
        for child in out.iterdir():
            if child.name != LOCK and not (child.name == TEACHER and cfg.train.method in DISTILLED):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def locked(out: str | Path) -> Iterator[None]:
    """Hold OUT/.lock while a run uses the directory, so that a second run into it stops at once instead of clearing
    the first one's files. A lock left by a process that is gone (on this host) is taken over."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KdloraError(f"--output-dir {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    path, me = out / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and not _alive(holder):
                path.unlink(missing_ok=True)  # a stale lock: its process died without removing it
                continue
            who = f"process {holder['pid']} on {holder['host']}" if holder else "another process"
            raise KdloraError(
                f"{out} is in use by {who}: wait for that run to end or use another --output-dir "
                f"(if no run is alive there, delete {path})"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        if _lock_holder(path) == me:
            path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or being written this instant
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process still runs; one on another host is taken to."""
    return holder.get("host") != socket.gethostname() or process_alive(holder["pid"])


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def write_config(cfg: RunConfig) -> None:
    save_config(cfg, Path(cfg.train.output_dir) / CONFIG)


def _save_model(path: Path, model: Any, tokenizer: Any, card: str | None = None) -> None:
    def write(d: Path) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        if card is not None:  # after save_pretrained: peft writes a README.md of its own
            (d / "README.md").write_text(card)

    atomic_write_dir(path, write)


def student_base_dir(out: str | Path) -> Path:
    return (Path(out) / STUDENT_BASE).resolve()


def save_student_base(out: str | Path, model: Any, tokenizer: Any) -> Path:
    """Save a student cut from a teacher's layers, so that its adapter names a base that exists."""
    _save_model(student_base_dir(out), model, tokenizer)
    return student_base_dir(out)


def save_adapter(out: str | Path, model: Any, tokenizer: Any, card: str | None = None) -> None:
    """adapter/: the peft adapter with the head (the LoRA methods), the model card as README.md."""
    _save_model(Path(out) / ADAPTER, model, tokenizer, card)


def save_merged(out: str | Path, model: Any, tokenizer: Any, card: str | None = None) -> float:
    """merged/: a plain transformers model (LoRA folded in) and its tokenizer, the model card as README.md. Returns
    the weights' size in MB."""
    _save_model(Path(out) / MERGED, model, tokenizer, card)
    return sum(f.stat().st_size for f in (Path(out) / MERGED).glob("*.safetensors")) / 2**20


def write_metrics(out: str | Path, metrics: dict[str, Any]) -> None:
    """Write the metrics record last, marking the run finished; then drop the checkpoint, needed no more."""
    atomic_write_json(Path(out) / METRICS, {"status": "finished", **metrics})
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


def write_inference(run_dir: str | Path, timings: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / INFERENCE, timings)
