"""`kdlora compare`: the paper's three arms on the same splits and seed, for one or more tasks and seeds.

For each task and seed, in OUTPUT/<task>/seed-<seed>/:
- fft/      the teacher model fully fine-tuned: the FFT arm, and the teacher of the KD-LoRA arm;
- lora/     LoRA on the teacher's base model;
- kd-lora/  KD-LoRA on the student (--student-model, or --student-layers of the teacher), distilled from fft/, whose
            logits it caches there.
Each arm runs as `kdlora train` in a child process, so the peak memory it reports is its own. An arm already finished
with the same config is reused, an unfinished one resumes. The merged models of the three arms are then timed on the
validation set, interleaved, and the report of OUTPUT (report.md, CSVs, figures) is written.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlora.bench import own_data
from kdlora.config import RunConfig, build_config, layered, preset_values
from kdlora.errors import KdloraError
from kdlora.rundir import merged_dir, read_inference, read_run, same_config, write_inference
from kdlora.tasks import glue_name

ARMS = ("fft", "lora", "kd-lora")  # the paper's three arms
ERROR_FILE_ENV = "KDLORA_ERROR_FILE"  # a child `kdlora train` writes its one-line error here instead of stderr


@dataclass
class CompareArgs:
    tasks: list[str]  # GLUE tasks, each compared on its own splits
    teacher_model: str  # the FFT arm's model, the LoRA arm's base and the KD-LoRA teacher
    student_model: str | None = None  # the KD-LoRA student base; or:
    student_layers: list[int] | None = None  # build the student from these layers of the teacher
    seeds: list[int] = field(default_factory=lambda: [42])
    output_dir: str = "runs/compare"
    common: dict[str, dict[str, Any]] = field(default_factory=dict)  # config sections for every arm
    arms: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # per arm: config sections
    preset: str | None = None  # a named preset (kdlora.config.PRESETS) below the common settings
    inference_runs: int = 10  # timed passes over the validation set per arm (after one warm-up pass)
    overwrite: bool = False  # replace finished arms whose config changed (same-config arms are always reused)
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.tasks:
            raise KdloraError("--tasks is empty: give one or more GLUE tasks, e.g. --tasks cola,mrpc")
        self.tasks = [glue_name(t) or t for t in self.tasks]  # GLUE aliases; another name is the user's data
        if len(set(self.tasks)) != len(self.tasks) or len(set(self.seeds)) != len(self.seeds):
            raise KdloraError("--tasks and --seeds must not repeat an entry")
        if not self.seeds:
            raise KdloraError("--seeds is empty: give one or more integers, e.g. --seeds 1,2,3")
        if bool(self.student_model) == bool(self.student_layers):
            raise KdloraError("give the KD-LoRA student: --student-model NAME or --student-layers 0,2,4 (one of them)")
        if self.inference_runs < 0:
            raise KdloraError(f"--inference-runs must be >= 0, got {self.inference_runs}")
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise KdloraError(f"unknown arm(s) {', '.join(sorted(unknown))} in the config: the arms are {ARMS}")
        self.arms = {arm: self.arms.get(arm) or {} for arm in ARMS}
        for sections in (self.common, *self.arms.values()):
            if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
                raise KdloraError("each arm's settings must map sections (model, data, lora, kd, train) to mappings")
        for task in self.tasks:  # build every arm's config now: a bad value fails before hours of training
            for arm in ARMS:
                arm_config(self, task, self.seeds[0], arm)


def arm_dir(args: CompareArgs, task: str, seed: int, arm: str) -> Path:
    return Path(args.output_dir) / task / f"seed-{seed}" / arm


def arm_config(args: CompareArgs, task: str, seed: int, arm: str) -> RunConfig:
    """defaults < the preset < common settings < the arm's own settings < what the arm is (method, models, task, seed,
    directory)."""
    values = layered(preset_values(args.preset, arm), args.common, args.arms[arm])
    model = values.setdefault("model", {})
    if arm == "kd-lora":
        model.update(teacher=str(arm_dir(args, task, seed, "fft")), teacher_model=None)
        if args.student_model:
            model.update(name=args.student_model, student_layers=None)
        else:
            model.update(name=None, student_layers=args.student_layers)
    else:
        model.update(name=args.teacher_model, teacher=None, teacher_model=None, student_layers=None)
    values.setdefault("data", {})["task"] = task
    train = values.setdefault("train", {})
    train.update(method=arm, seed=seed, output_dir=str(arm_dir(args, task, seed, arm)), quiet=args.quiet)
    return build_config(values)


def run_arm(cfg: RunConfig, label: str, force: bool, overwrite: bool) -> tuple[dict[str, Any], bool]:
    """Train one arm in a child `kdlora train`, unless it already finished with this config. (metrics, trained?)"""
    out = Path(cfg.train.output_dir)
    finished = read_run(out)
    if finished is not None and not force:
        if same_config(out, cfg):
            print(f"{label}: reusing the finished run in {out}", flush=True)
            return finished, False
        if not overwrite:
            raise KdloraError(f"{out} holds a finished run with another config: pass --overwrite to retrain it")
    cfg = copy.deepcopy(cfg)
    cfg.train.overwrite = finished is not None  # an unfinished run of the same config resumes
    print(f"{label}: training {cfg.train.method} into {out}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_path, error_path = Path(tmp) / "arm.yaml", Path(tmp) / "error"
        config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        env = {**os.environ, ERROR_FILE_ENV: str(error_path)}
        cmd = [sys.executable, "-m", "kdlora", "train", "--config", str(config_path)]
        code = subprocess.run(cmd, env=env, preexec_fn=_die_with_parent).returncode
        if code != 0:
            reason = error_path.read_text().strip() if error_path.exists() else f"it exited with status {code}"
            raise KdloraError(f"{label} failed: {reason}")
    metrics = read_run(out)
    if metrics is None:
        raise KdloraError(f"{label} ended without finishing the run in {out}")
    return metrics, True


def _die_with_parent() -> None:
    """In the child: be killed when the parent dies (Linux), so a killed compare leaves no training behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cache_teacher_logits(cfg: RunConfig, label: str) -> None:
    """Compute the kd-lora arm's teacher logits here, in the parent, so that its child never loads the teacher: its
    peak memory is then the student's training alone, as in the paper's setting of precomputed logits."""
    from kdlora.data import load_splits, load_task
    from kdlora.env import default_device
    from kdlora.teacher import teacher_logits
    from kdlora.train import distil_examples

    task = load_task(cfg.data)
    train = distil_examples(cfg, task, Path(cfg.model.teacher), load_splits(cfg.data, ["train"])["train"])
    device = default_device()
    _, cached = teacher_logits(
        Path(cfg.model.teacher),
        train,
        task,
        cfg.data.max_length,
        batch_size=cfg.train.eval_batch_size,
        device=device,
        quiet=cfg.train.quiet,
    )
    print(f"{label}: teacher logits {'found in the cache' if cached else 'computed and cached'}", flush=True)


def time_arms(args: CompareArgs, task: str, seed: int, cfgs: dict[str, RunConfig]) -> None:
    """Time the merged models of the three arms on the validation set, interleaved; write inference.json to each."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from kdlora.bench import BenchArgs, inference_batches, time_passes
    from kdlora.models import load_tokenizer, prepare_tokenizer

    cfg = cfgs["fft"]
    bench = BenchArgs(
        task=task,
        data_dir=cfg.data.data_dir,
        max_eval_samples=cfg.data.max_eval_samples,
        max_length=cfg.data.max_length,
        eval_batch_size=cfg.train.eval_batch_size,
        data=own_data(cfg.data),
    )
    models, batches = {}, {}
    for arm in ARMS:
        merged = merged_dir(arm_dir(args, task, seed, arm))
        models[arm] = AutoModelForSequenceClassification.from_pretrained(merged)
        tokenizer = prepare_tokenizer(load_tokenizer(str(merged)), models[arm].config, str(merged))
        batches[arm] = inference_batches(bench, tokenizer)
    times = time_passes(models, batches, args.inference_runs, warmup=1)
    for arm in ARMS:
        write_inference(
            arm_dir(args, task, seed, arm),
            {
                **times[arm],
                "examples": sum(len(b["input_ids"]) for b in batches[arm]),
                "batch_size": bench.eval_batch_size,
                "model": "merged",
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "torch_threads": torch.get_num_threads(),
                "timed_with": list(ARMS),
            },
        )


def run_compare(args: CompareArgs) -> Path:
    """Run every arm of every task and seed, time the arms, write the report. Returns the report's path."""
    from kdlora.report import write_report

    for task in args.tasks:
        for seed in args.seeds:
            cfgs = {arm: arm_config(args, task, seed, arm) for arm in ARMS}
            where = f"{task} seed {seed}"
            fft, fft_trained = run_arm(cfgs["fft"], f"[{where}] fft", False, args.overwrite)
            _, lora_trained = run_arm(cfgs["lora"], f"[{where}] lora", False, args.overwrite)
            # A kd-lora run distilled from an earlier teacher is stale once the teacher is retrained.
            kd_done = read_run(arm_dir(args, task, seed, "kd-lora")) or {}
            stale = bool(kd_done) and (fft_trained or kd_done.get("teacher_score") != fft["score"])
            if stale or not kd_done:
                cache_teacher_logits(cfgs["kd-lora"], f"[{where}] kd-lora")
            _, kd_trained = run_arm(cfgs["kd-lora"], f"[{where}] kd-lora", stale, args.overwrite)
            timed = all(read_inference(arm_dir(args, task, seed, arm)) is not None for arm in ARMS)
            if args.inference_runs and (fft_trained or lora_trained or kd_trained or not timed):
                print(f"[{where}] timing the merged models on the validation set", flush=True)
                time_arms(args, task, seed, cfgs)
    return write_report(Path(args.output_dir), quiet=args.quiet)
