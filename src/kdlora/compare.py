"""`kdlora compare`: the paper's three arms on the same splits and seed, for one or more tasks and seeds.

For each task and seed, in OUTPUT/<task>/seed-<seed>/:
- fft/      the teacher model fully fine-tuned: the FFT arm, and the teacher of the KD-LoRA arm;
- lora/     LoRA on the teacher's base model;
- kd-lora/  KD-LoRA on the student (--student-model, or --student-layers of the teacher), distilled from fft/, whose
            logits it caches there.
With --label-budget N,...: the label-scarce protocol, in OUTPUT/<task>/budget-<N>/seed-<seed>/. Each budget keeps N
labelled training rows (a stratified draw seeded by the seed) and five arms train on them: fft/ and lora/ (the full-size
models on the labels alone), student/ (the student alone: kd-lora with α = 1, the same schedule), kd-lora/ (distilled
on the labelled rows) and kd-lora-unlabeled/ (distilled on them and on the rest of the training split, its labels
dropped). With --teacher-arm best the student arms distil from whichever of fft/ and lora/ scored higher on dev.
A causal language model's data (--prompt-column and --completion-column, --messages-column or --text-column): four
arms, fft/, lora/, student/ (α = 1) and kd-lora/, scored by the validation NLL (or --best-metric); the teacher's top-k
cache is filled here, before the student arms' children start, and the arms are not timed (kdlora bench is).
Each arm runs as `kdlora train` in a child process, so the peak memory it reports is its own. An arm already finished
with the same config is reused, an unfinished one resumes; --arms trains only some arms, so that two processes can
split a compare (a student arm reads its teacher's finished run). The merged models of the three arms are then timed
on the validation set, interleaved, and the report of OUTPUT (report.md, CSVs, figures) is written.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlora.bench import BenchArgs, inference_batches, own_data, time_passes
from kdlora.config import LM_COLUMNS, RunConfig, arg, build_config, layered, preset_values
from kdlora.data import load_splits, load_task
from kdlora.env import default_device
from kdlora.errors import KdloraError
from kdlora.models import load_saved
from kdlora.report import write_report
from kdlora.rundir import merged_dir, read_inference, read_run, same_config, write_inference
from kdlora.tasks import glue_name
from kdlora.teacher import distil_examples, teacher_logits

ARMS = ("fft", "lora", "kd-lora")  # the paper's three arms
TEACHER_ARMS = ("fft", "lora")  # the arms a student can distil from
# The label-scarce protocol's arms: the three, the student alone and KD with the unlabelled rest. The student arms are
# kd-lora runs with the kd-lora arm's settings and these on top.
STUDENT_ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "student": {"kd": {"alpha": 1.0}},
    "kd-lora": {},
    "kd-lora-unlabeled": {"kd": {"unlabeled_rest": True}},
}
BUDGET_ARMS = (*TEACHER_ARMS, *STUDENT_ARMS)
LM_ARMS = (*TEACHER_ARMS, "student", "kd-lora")  # a language model's data: no labels to drop, no unlabelled rest
ERROR_FILE_ENV = "KDLORA_ERROR_FILE"  # a child `kdlora train` writes its one-line error here instead of stderr


@dataclass
class CompareArgs:
    tasks: list[str] = arg(MISSING, "comma-separated GLUE tasks, e.g. cola,mrpc,stsb,rte,wnli; or your data's name")
    teacher_model: str = arg(MISSING, "model of the fft arm, base of the lora arm, the teacher")
    student_model: str | None = arg(None, "kd-lora student: this checkpoint; or:")
    student_layers: list[int] | None = arg(None, "kd-lora student: these encoder layers of the teacher, e.g. 0,2,4")
    seeds: list[int] = arg([42], "comma-separated seeds; the table gives mean ± std (default 42)")
    output_dir: str = arg("runs/compare", "where the arms and the report go")
    common: dict[str, dict[str, Any]] = field(default_factory=dict)  # config sections for every arm
    arms: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # per arm: config sections
    preset: str | None = None  # a named preset (kdlora.config.PRESETS) below the common settings
    label_budgets: list[int] | None = arg(
        None,
        "the label-scarce protocol: per budget keep N labelled training rows (a stratified draw per seed) and add the "
        "arms student (alone) and kd-lora-unlabeled (the rest as unlabelled text), e.g. 500,1000,2000",
        flag="--label-budget",
    )
    teacher_arm: str = arg("fft", "fft | lora | best: the arm the students distil from (best: by its dev score)")
    only: list[str] | None = arg(
        None,
        "train only these arms, e.g. lora: another process can train the others into the same --output-dir at once "
        "(a student arm needs its teacher arm finished or among these)",
        flag="--arms",
    )
    inference_runs: int = arg(10, "timed passes over the validation set per arm (after one warm-up pass)")
    overwrite: bool = arg(False, "retrain finished arms whose config changed (same-config arms are always reused)")
    quiet: bool = arg(False, "no progress bars")

    def __post_init__(self) -> None:
        if not self.tasks or not all(t.strip() for t in self.tasks):
            raise KdloraError("--tasks is empty: give one or more GLUE tasks, e.g. --tasks cola,mrpc")
        if any("/" in t or "\\" in t or t.strip(".") == "" for t in self.tasks):
            raise KdloraError(f"--tasks {','.join(self.tasks)}: a task name is a directory name under --output-dir")
        self.tasks = [glue_name(t) or t for t in self.tasks]  # GLUE aliases; another name is the user's data
        if len(set(self.tasks)) != len(self.tasks) or len(set(self.seeds)) != len(self.seeds):
            raise KdloraError("--tasks and --seeds must not repeat an entry")
        if not self.seeds:
            raise KdloraError("--seeds is empty: give one or more integers, e.g. --seeds 1,2,3")
        if bool(self.student_model) == bool(self.student_layers):
            raise KdloraError("give the KD-LoRA student: --student-model NAME or --student-layers 0,2,4 (one of them)")
        if self.inference_runs < 0:
            raise KdloraError(f"--inference-runs must be >= 0, got {self.inference_runs}")
        if self.teacher_arm not in (*TEACHER_ARMS, "best"):
            raise KdloraError(f"--teacher-arm must be fft, lora or best, got {self.teacher_arm!r}")
        if self.label_budgets is not None:
            if not self.label_budgets or min(self.label_budgets) <= 0:
                raise KdloraError("--label-budget takes positive counts of labelled rows, e.g. --label-budget 500,1000")
            if len(set(self.label_budgets)) != len(self.label_budgets):
                raise KdloraError("--label-budget must not repeat a count")
            if self.generative:
                raise KdloraError("--label-budget draws labelled rows of a classifier's data: a language model's data "
                                  "has no labels to draw")  # fmt: skip
        if self.only is not None:
            wrong = set(self.only) - set(self.arm_names)
            if not self.only or wrong or len(set(self.only)) != len(self.only):
                raise KdloraError(f"--arms takes arms of this protocol without repeats: {', '.join(self.arm_names)}")
        unknown = set(self.arms) - set(self.arm_names)
        if unknown:
            raise KdloraError(
                f"unknown arm(s) {', '.join(sorted(unknown))} in the config: the arms are {', '.join(self.arm_names)}"
            )
        self.arms = {arm: self.arms.get(arm) or {} for arm in BUDGET_ARMS}
        for sections in (self.common, *self.arms.values()):
            if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
                raise KdloraError("each arm's settings must map sections (model, data, lora, kd, train) to mappings")
        for task in self.tasks:  # build every arm's config now: a bad value fails before hours of training
            for budget in self.budgets:
                for arm in self.arm_names:
                    arm_config(self, task, self.seeds[0], arm, budget)

    @property
    def generative(self) -> bool:
        """Whether the arms train causal language models (the common or any arm's data names an LM column)."""
        layers = (self.common, *(a for a in self.arms.values() if isinstance(a, dict)))
        return any(isinstance(s.get("data"), dict) and s["data"].get(c) for s in layers for c in LM_COLUMNS)

    @property
    def arm_names(self) -> tuple[str, ...]:
        return BUDGET_ARMS if self.label_budgets else LM_ARMS if self.generative else ARMS

    @property
    def budgets(self) -> list[int | None]:
        """The label budgets, or [None]: every labelled row."""
        return list(self.label_budgets) if self.label_budgets else [None]

    @property
    def selected(self) -> tuple[str, ...]:
        """The arms this process trains (--arms, default all); the others it only reads."""
        return tuple(a for a in self.arm_names if self.only is None or a in self.only)

    @property
    def students(self) -> list[str]:
        """The selected arms that distil from a teacher arm."""
        return [a for a in self.selected if a not in TEACHER_ARMS]


def arm_dir(args: CompareArgs, task: str, seed: int, arm: str, budget: int | None = None) -> Path:
    root = Path(args.output_dir) / task
    return (root / f"budget-{budget}" if budget else root) / f"seed-{seed}" / arm


def arm_config(
    args: CompareArgs, task: str, seed: int, arm: str, budget: int | None = None, teacher: str | None = None
) -> RunConfig:
    """defaults < the preset < common settings < the arm's own settings (a student arm: the kd-lora arm's, then its
    own) < what the arm is (method, models, task, seed, budget, directory). `teacher`: the arm it distils from
    (default: --teacher-arm, fft for best until the teacher arms are scored)."""
    method = arm if arm in TEACHER_ARMS else "kd-lora"
    own = [args.arms.get("kd-lora"), STUDENT_ARMS[arm]] if method == "kd-lora" and arm != "kd-lora" else []
    values = layered(preset_values(args.preset, method), args.common, *own, args.arms.get(arm))
    model = values.setdefault("model", {})
    if method == "kd-lora":
        teacher = teacher or (args.teacher_arm if args.teacher_arm in TEACHER_ARMS else "fft")
        model.update(teacher=str(arm_dir(args, task, seed, teacher, budget)), teacher_model=None)
        if args.student_model:
            model.update(name=args.student_model, student_layers=None)
        else:
            model.update(name=None, student_layers=args.student_layers)
    else:
        model.update(name=args.teacher_model, teacher=None, teacher_model=None, student_layers=None)
    data = values.setdefault("data", {})
    data["task"] = task
    if budget:
        data.update(label_budget=budget, label_seed=seed)
    train = values.setdefault("train", {})
    out = arm_dir(args, task, seed, arm, budget)
    train.update(method=method, seed=seed, output_dir=str(out), quiet=args.quiet)
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
    peak memory is then the student's training alone, as in the paper's setting of precomputed logits. A language
    model's: its top-k distribution on every learnt token (lm.cache_teacher)."""

    if cfg.data.generative:
        from kdlora.lm import cache_teacher

        cached = cache_teacher(cfg)
        print(f"{label}: teacher top-k {'found in the cache' if cached else 'computed and cached'}", flush=True)
        return
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
        models[arm], tokenizer = load_saved(merged)
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
    """Run every arm of every task, budget and seed, time the arms (the paper's protocol), write the report. Returns
    the report's path."""

    cells = [(task, budget, seed) for task in args.tasks for budget in args.budgets for seed in args.seeds]
    for cell in cells:  # --arms: a student arm whose teacher this process does not train needs it finished now
        check_teachers(args, *cell)
    for cell in cells:
        run_cell(args, *cell)
    return write_report(Path(args.output_dir), quiet=args.quiet)


def cell_name(task: str, budget: int | None, seed: int) -> str:
    return f"{task}{f' budget {budget}' if budget else ''} seed {seed}"


def finished_teacher(args: CompareArgs, task: str, budget: int | None, seed: int, arm: str) -> dict[str, Any] | None:
    """A teacher arm this process does not train (--arms): its metrics if it finished with this config, else None."""
    cfg = arm_config(args, task, seed, arm, budget)
    out = Path(cfg.train.output_dir)
    return read_run(out) if same_config(out, cfg) else None


def check_teachers(args: CompareArgs, task: str, budget: int | None, seed: int) -> None:
    students = args.students
    needed = TEACHER_ARMS if args.teacher_arm == "best" else (args.teacher_arm,)
    for teacher in needed:
        if students and teacher not in args.selected and finished_teacher(args, task, budget, seed, teacher) is None:
            raise KdloraError(
                f"[{cell_name(task, budget, seed)}] the {students[0]} arm distils from the {teacher} arm, which has "
                f"not finished with this config: add {teacher} to --arms, or train it first (--arms {teacher})"
            )


def run_cell(args: CompareArgs, task: str, budget: int | None, seed: int) -> None:
    """One task, budget and seed: the teacher arms, then the student arms distilled from the chosen teacher."""
    where = cell_name(task, budget, seed)
    done, trained = {}, {}
    for arm in TEACHER_ARMS:
        if arm in args.selected:
            cfg = arm_config(args, task, seed, arm, budget)
            done[arm], trained[arm] = run_arm(cfg, f"[{where}] {arm}", False, args.overwrite)
        else:
            done[arm], trained[arm] = finished_teacher(args, task, budget, seed, arm), False
    students = args.students
    if not students:
        return time_cell(args, task, budget, seed, trained)
    teacher = args.teacher_arm
    if teacher == "best":
        teacher = max(TEACHER_ARMS, key=lambda a: done[a]["score"])  # fft on a tie
        print(f"[{where}] teacher: the {teacher} arm (dev score {done[teacher]['score']:.2f})", flush=True)
    cfgs = {a: arm_config(args, task, seed, a, budget, teacher) for a in students}
    for arm, cfg in cfgs.items():
        # A student distilled from an earlier teacher is stale once the teacher is retrained.
        out = Path(cfg.train.output_dir)
        before = read_run(out) or {}
        moved = os.path.realpath(str(before.get("teacher"))) != os.path.realpath(cfg.model.teacher)
        stale = bool(before) and (trained[teacher] or moved or before.get("teacher_score") != done[teacher]["score"])
        if stale or not before or not same_config(out, cfg):
            cache_teacher_logits(cfg, f"[{where}] {arm}")
        _, trained[arm] = run_arm(cfg, f"[{where}] {arm}", stale, args.overwrite)
    time_cell(args, task, budget, seed, trained)


def time_cell(args: CompareArgs, task: str, budget: int | None, seed: int, trained: dict[str, bool]) -> None:
    """Time the three arms once all have finished (with --arms, in whichever process finishes the last one)."""
    # The label-scarce protocol measures scores, not inference time; a language model's costs are kdlora bench's.
    if budget or args.generative or not args.inference_runs:
        return
    if not all(read_run(arm_dir(args, task, seed, arm)) is not None for arm in ARMS):
        return
    timed = all(read_inference(arm_dir(args, task, seed, arm)) is not None for arm in ARMS)
    if any(trained.values()) or not timed:
        print(f"[{cell_name(task, budget, seed)}] timing the merged models on the validation set", flush=True)
        time_arms(args, task, seed, {"fft": arm_config(args, task, seed, "fft")})
