"""Command line: `kdlora train|demo|evaluate|predict|bench|compare|sweep|report`, also as `python -m kdlora`."""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from kdlora.errors import KdloraError

# flag -> config field; every flag is optional and overrides the YAML file, which overrides the defaults.
TRAIN_FLAGS: dict[str, tuple[str, str, str]] = {
    "--method": ("train", "method", "fft | lora | kd-lora"),
    "--task": ("data", "task", "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"),
    "--model": ("model", "name", "model to train (fft, lora) or student base (kd-lora): path or hub id"),
    "--output-dir": ("train", "output_dir", "run directory"),
    "--data-dir": ("data", "data_dir", "GLUE TSV directory (e.g. ../shared/glue) or save_to_disk directory"),
    "--dataset": ("data", "dataset", "Hugging Face dataset used without --data-dir (default nyu-mll/glue)"),
    "--max-length": ("data", "max_length", "truncate inputs to this many tokens (default 128)"),
    "--max-train-samples": ("data", "max_train_samples", "use only the first N training examples"),
    "--max-eval-samples": ("data", "max_eval_samples", "use only the first N examples of each eval split"),
    "--epochs": ("train", "epochs", "training epochs"),
    "--lr": ("train", "lr", "peak learning rate (default 5e-5 for fft, 5e-4 for LoRA methods)"),
    "--batch-size": ("train", "batch_size", "training batch size"),
    "--eval-batch-size": ("train", "eval_batch_size", "evaluation batch size"),
    "--weight-decay": ("train", "weight_decay", "AdamW weight decay"),
    "--warmup-ratio": ("train", "warmup_ratio", "fraction of steps with linear warmup"),
    "--grad-accum-steps": ("train", "grad_accum_steps", "micro-batches per optimizer step"),
    "--max-grad-norm": ("train", "max_grad_norm", "gradient clipping norm (0 disables)"),
    "--seed": ("train", "seed", "random seed"),
    "--mixed-precision": ("train", "mixed_precision", "no | bf16 | fp16"),
    "--rank": ("lora", "r", "LoRA rank r"),
    "--lora-alpha": ("lora", "lora_alpha", "LoRA alpha (scale = alpha / r)"),
    "--lora-dropout": ("lora", "lora_dropout", "LoRA dropout"),
    "--target-modules": ("lora", "target_modules", "comma-separated module names (default: query/value)"),
    "--teacher": ("model", "teacher", "kd-lora: a finished fft run directory"),
    "--teacher-model": ("model", "teacher_model", "kd-lora: fine-tune this model as the teacher first"),
    "--student-layers": ("model", "student_layers", "kd-lora: build the student from these teacher layers, e.g. 0,2,4"),
    "--student-init": ("model", "student_init", "pretrained | teacher: take those layers from which checkpoint"),
    "--alpha": ("kd", "alpha", "weight of the task loss (1-alpha weighs the KD loss)"),
    "--temperature": ("kd", "temperature", "distillation temperature T"),
    "--teacher-lr": ("kd", "teacher_lr", "learning rate of the teacher trained by --teacher-model"),
    "--teacher-epochs": ("kd", "teacher_epochs", "epochs of that teacher (default: --epochs)"),
    "--save-steps": ("train", "save_steps", "checkpoint every N optimizer steps and at each epoch end (default 500)"),
}
BOOL_FLAGS: dict[str, tuple[str, str, str]] = {
    "--overwrite": ("train", "overwrite", "replace a finished run in --output-dir"),
    "--resume": ("train", "resume", "continue the unfinished run in --output-dir (the same command does it too)"),
    "--no-recompute": (
        "kd",
        "no_recompute",
        "fail instead of recomputing teacher logits when the cache does not match",
    ),
    "--quiet": ("train", "quiet", "no progress bars"),
    "--trust-remote-code": ("model", "trust_remote_code", "let model repositories run their own code"),
}

# compare: flags that set one config value for every arm.
COMPARE_COMMON_FLAGS = {
    f: TRAIN_FLAGS[f]
    for f in (
        "--epochs",
        "--batch-size",
        "--max-train-samples",
        "--max-eval-samples",
        "--max-length",
        "--rank",
        "--lora-alpha",
        "--alpha",
        "--temperature",
        "--mixed-precision",
        "--save-steps",
    )
}

# The offline default: KD-LoRA on CoLA with the packaged all-MiniLM-L6-v2 as teacher and its layers 0,2,4 as student.
# The student starts from the fine-tuned teacher's layers: all-MiniLM-L6-v2 was trained for mean-pooled embeddings, and
# from its pretrained layers a LoRA student did worse on CoLA in both single-seed runs so far (MCC 0.06 vs 0.14,
# 0.10 vs 0.12).
DEMO: dict[str, dict[str, Any]] = {
    "model": {"teacher_model": "all-MiniLM-L6-v2", "student_layers": [0, 2, 4], "student_init": "teacher"},
    "data": {"task": "cola"},
    "kd": {"teacher_epochs": 2},
    "train": {"method": "kd-lora", "epochs": 3, "output_dir": "runs/demo", "lr": 2e-3},
}
# A few minutes on 2 CPU cores. Smaller batches give the teacher enough steps to leave the majority class.
DEMO_QUICK = {
    "data": {"max_train_samples": 3000, "max_eval_samples": 500},
    "train": {"epochs": 2, "batch_size": 16, "output_dir": "runs/demo-quick"},
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with model/data/lora/kd/train sections; flags override it")
    for flag, (_, _, help_text) in TRAIN_FLAGS.items():
        p.add_argument(flag, default=argparse.SUPPRESS, help=help_text)
    for flag, (_, _, help_text) in BOOL_FLAGS.items():
        p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, key, _) in {**TRAIN_FLAGS, **BOOL_FLAGS}.items():
        dest = flag.lstrip("-").replace("-", "_")
        if dest in vars(args):
            out.setdefault(section, {})[key] = getattr(args, dest)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlora", description="KD-LoRA: LoRA + knowledge distillation for GLUE.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with fft, lora or kd-lora")
    _add_train_flags(p)

    p = sub.add_parser("demo", help="the offline default: KD-LoRA on CoLA, MiniLM-L6 teacher, 3-layer student")
    p.add_argument(
        "--quick",
        action="store_true",
        help="3000 training examples, 500 dev, batch 16, 2 epochs: about 4 minutes on 2 CPU cores",
    )
    _add_train_flags(p)

    p = sub.add_parser("evaluate", help="score a saved model on a task's validation split(s)")
    p.add_argument("--model-dir", required=True, help="a run directory (uses its merged/) or a model directory")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="also write the metrics to this JSON file")

    p = sub.add_parser("bench", help="parameters per rank, size, peak training memory and inference time per method")
    p.add_argument("--teacher", default="all-MiniLM-L6-v2", help="teacher checkpoint (default: the packaged MiniLM)")
    p.add_argument("--student", help="student checkpoint (default: --student-layers of the teacher)")
    p.add_argument("--student-layers", default="0,2,4")
    p.add_argument("--task", default="cola")
    p.add_argument("--data-dir", help="GLUE data for the inference timing (default ../shared/glue when present)")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--batch-size", type=int, default=32, help="training batch for the memory measurement")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length for the memory measurement")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=100, help="timed passes over the validation set (default 100)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--output-dir", default="runs/bench")

    p = sub.add_parser(
        "compare",
        help="the paper's three arms (fft teacher, lora, kd-lora) on the same splits and seeds, with a report",
        description="Per task and seed: the fft teacher, LoRA on the teacher's model, KD-LoRA on the student "
        "distilled from that teacher. Finished arms with the same config are reused; a killed compare resumes.",
    )
    p.add_argument("--tasks", required=True, help="comma-separated GLUE tasks, e.g. cola,mrpc,stsb,rte,wnli")
    p.add_argument("--seeds", default="42", help="comma-separated seeds; the table gives mean ± std (default 42)")
    p.add_argument("--teacher-model", required=True, help="model of the fft arm, base of the lora arm, the teacher")
    p.add_argument("--student-layers", help="kd-lora student: these encoder layers of the teacher, e.g. 0,2,4")
    p.add_argument("--student-model", help="kd-lora student: this checkpoint instead")
    p.add_argument("--student-init", help="pretrained | teacher: take --student-layers from which checkpoint")
    p.add_argument("--data-dir", help="GLUE TSV directory, e.g. ../shared/glue")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--config", help="YAML: `common:` sections for every arm, then `fft:`, `lora:`, `kd-lora:` sections")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ARM.SECTION.KEY=VALUE",
        help="one setting of one arm (or 'common'), e.g. --set kd-lora.train.lr=2e-3; repeatable",
    )
    for flag, (_, _, help_text) in COMPARE_COMMON_FLAGS.items():
        p.add_argument(flag, help=f"{help_text} (every arm)")
    p.add_argument("--inference-runs", type=int, default=10, help="timed passes over the validation set per arm")
    p.add_argument("--overwrite", action="store_true", help="retrain finished arms whose config changed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "sweep",
        help="a grid of configs for one method and task on Optuna (paper grids or YAML), resumable, shareable",
        description="The train flags give the base config; --grid the points tried on top of it. The study lives in "
        "OUTPUT/study.db unless --storage names a database that several workers share.",
    )
    _add_train_flags(p)
    p.add_argument("--grid", default="paper", help="'paper' (the paper's grid for --method) or a YAML grid file")
    p.add_argument("--storage", help="SQLAlchemy URL of the study, e.g. postgresql://user@host/db (default SQLite)")
    p.add_argument("--study-name", help="default: kdlora-<task>-<method>")
    p.add_argument("--top-k", type=int, default=6, help="summarise by the median of the top k configs (default 6)")
    p.add_argument("--max-trials", type=int, help="this worker stops after N trials")
    p.add_argument(
        "--retry-failed", action="store_true", help="run again the points that failed with an error (once each)"
    )

    p = sub.add_parser("report", help="Table 1, Table 2, Figure 2 and CSVs from finished run directories")
    p.add_argument("runs_dir", help="directory searched for run directories (train, demo, compare or sweep outputs)")
    p.add_argument("--top-k", type=int, default=6, help="configs in the median when a task and method has several")
    p.add_argument("--task", help="task of Table 2 and Figure 2 (default cola when present)")
    p.add_argument("--output-dir", help="write the report here instead of into RUNS_DIR")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help="write GLUE test-set submission files (CoLA.tsv, ...)")
    p.add_argument("--model-dir", required=True, help="a run directory (uses its merged/) or a model directory")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--output-dir", required=True, help="directory for the submission TSV(s)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    return parser


def _train_values(args: argparse.Namespace, preset: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Config sections from the lowest layer up: a preset, the --config YAML file, the flags."""
    from kdlora.config import read_yaml

    values: dict[str, dict[str, Any]] = {}
    for layer in (preset or {}, read_yaml(args.config) if args.config else {}, _overrides(args)):
        for section, items in layer.items():
            values.setdefault(section, {}).update(items or {})
    return values


def _train(args: argparse.Namespace, preset: dict[str, dict[str, Any]] | None = None) -> int:
    from kdlora.config import load_config
    from kdlora.train import process_state, run

    cfg = load_config(None, _train_values(args, preset))
    metrics = run(cfg)
    if process_state().is_main_process:
        _print_summary(metrics, Path(cfg.train.output_dir))
    return 0


def _demo(args: argparse.Namespace) -> int:
    preset = copy.deepcopy(DEMO)
    if args.quick:
        for section, items in DEMO_QUICK.items():
            preset.setdefault(section, {}).update(items)
    glue = Path(os.environ.get("KDLORA_GLUE_DIR", "../shared/glue"))
    if glue.is_dir():  # the lowest layer: --data-dir or a --config file still win
        preset["data"]["data_dir"] = str(glue)
    return _train(args, preset)


def _print_summary(metrics: dict[str, Any], out: Path) -> None:
    named = {k: metrics[k] for k in ("matthews_correlation", "accuracy", "f1", "pearson", "spearman") if k in metrics}
    print(
        f"\n{metrics['method']} on {metrics['task']}: score {metrics['score']:.2f} at epoch {metrics['best_epoch']} "
        f"({', '.join(f'{k} {v:.4f}' for k, v in named.items())})"
    )
    if metrics.get("teacher_score") is not None:
        print(
            f"teacher (fft): score {metrics['teacher_score']:.2f}, {metrics['teacher_total_params']:,} parameters "
            f"({metrics['teacher']})"
        )
    lora = f" (LoRA {metrics['lora_params']:,})" if metrics["lora_params"] else ""
    print(
        f"parameters: {metrics['trainable_params']:,} trainable of {metrics['total_params']:,}{lora}; "
        f"trained in {metrics['train_seconds']:.0f} s, peak memory {metrics['peak_memory_mb']:.0f} MB"
    )
    parts = ", ".join(str(out / p) for p in ("adapter", "merged", "metrics.json", "config.yaml") if (out / p).exists())
    print(f"artefacts: {parts}")


def _load_saved(model_dir: str, task_name: str) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForSequenceClassification

    from kdlora.io import read_run
    from kdlora.models import load_tokenizer
    from kdlora.tasks import get_task

    task, path = get_task(task_name), Path(model_dir)
    if not path.is_dir():
        raise KdloraError(f"--model-dir {path} does not exist")
    if (path / "metrics.json").exists() or (path / "config.yaml").exists():
        if read_run(path) is None:
            raise KdloraError(f"{path} is an unfinished run: it has no finished metrics.json")
        path = path / "merged"
    if not (path / "config.json").is_file():
        raise KdloraError(f"{path} is not a model directory (no config.json)")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if model.config.num_labels != task.num_labels:
        raise KdloraError(f"{path} has {model.config.num_labels} labels; {task.name} has {task.num_labels}")
    return task, model, load_tokenizer(str(path))


def _loaders(task: Any, tokenizer: Any, args: argparse.Namespace, splits: tuple[str, ...]) -> dict[str, Any]:
    from kdlora.config import DataArgs
    from kdlora.data import TokenizedDataset, load_splits
    from kdlora.train import eval_loader

    data = DataArgs(
        task=task.name,
        data_dir=args.data_dir,
        dataset=args.dataset,
        max_length=args.max_length,
        max_eval_samples=getattr(args, "max_eval_samples", None),
    )
    examples = load_splits(data, splits)
    return {
        s: eval_loader(TokenizedDataset(ex, tokenizer, args.max_length), tokenizer, args.batch_size, task.is_regression)
        for s, ex in examples.items()
    }


def _evaluate(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from kdlora.io import atomic_write_json
    from kdlora.train import evaluate

    task, model, tokenizer = _load_saved(args.model_dir, args.task)
    accelerator = Accelerator()
    loaders = {s: accelerator.prepare(dl) for s, dl in _loaders(task, tokenizer, args, task.eval_splits).items()}
    metrics = {"task": task.name, **evaluate(accelerator.prepare(model), loaders, task, accelerator)}
    print(json.dumps(metrics, indent=2))
    if args.output:
        atomic_write_json(args.output, metrics)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from kdlora.io import atomic_write_text
    from kdlora.train import predict

    task, model, tokenizer = _load_saved(args.model_dir, args.task)
    accelerator = Accelerator()
    model = accelerator.prepare(model)
    for split, name in zip(task.test_splits, task.submission, strict=True):
        loader = accelerator.prepare(_loaders(task, tokenizer, args, (split,))[split])
        out = predict(model, loader, accelerator, task.is_regression)
        rows = sorted(zip(out["ids"].tolist(), out["preds"].tolist(), strict=True))
        if task.is_regression:  # STS-B scores live in [0, 5]
            lines = [f"{i}\t{min(max(p, 0.0), 5.0):.3f}" for i, p in rows]
        else:
            lines = [f"{i}\t{task.labels[int(p)]}" for i, p in rows]
        path = Path(args.output_dir) / name
        atomic_write_text(path, "index\tprediction\n" + "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {path}")
    return 0


def ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise KdloraError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _bench(args: argparse.Namespace) -> int:
    from kdlora.bench import BenchArgs, run_bench, to_markdown

    data_dir = args.data_dir
    if data_dir is None and Path("../shared/glue").is_dir():
        data_dir = "../shared/glue"
    bench = BenchArgs(
        teacher=args.teacher,
        student=args.student,
        student_layers=ints(args.student_layers, "--student-layers"),
        task=args.task,
        data_dir=data_dir,
        ranks=ints(args.ranks, "--ranks"),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_batch_size=args.eval_batch_size,
        runs=args.runs,
        warmup=args.warmup,
        max_eval_samples=args.max_eval_samples,
        output_dir=args.output_dir,
        skip_memory=args.skip_memory,
    )
    if min(bench.ranks) <= 0 or bench.runs <= 0 or bench.batch_size <= 0 or bench.seq_len <= 0:
        raise KdloraError("--ranks, --runs, --batch-size and --seq-len must be positive")
    print(to_markdown(run_bench(bench)))
    print(f"wrote {Path(args.output_dir) / 'bench.json'} and bench.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from kdlora.compare import ARMS, CompareArgs, run_compare
    from kdlora.config import read_yaml

    raw = read_yaml(args.config) if args.config else {}

    def sections(value: Any, where: str) -> dict[str, dict[str, Any]]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
            raise KdloraError(f"{args.config}: '{where}' must map sections (model, data, lora, kd, train) to mappings")
        return {k: dict(v or {}) for k, v in value.items()}

    common = {k: dict(v or {}) for k, v in raw.items() if k not in (*ARMS, "common")}
    for section, items in sections(raw.get("common"), "common").items():
        common.setdefault(section, {}).update(items)
    arms = {arm: sections(raw.get(arm), arm) for arm in ARMS}
    if args.data_dir:
        common.setdefault("data", {})["data_dir"] = args.data_dir
    # Flags win over the YAML file, the arms' own sections included; --set wins over both.
    settings = []
    for flag, (section, key, _) in COMPARE_COMMON_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            settings.append(("common", section, key, value))
    if args.student_init:
        settings.append(("kd-lora", "model", "student_init", args.student_init))
    for item in args.set:
        target, sep, value = item.partition("=")
        parts = target.split(".")
        if not sep or len(parts) != 3 or parts[0] not in (*ARMS, "common"):
            raise KdloraError(
                f"--set {item!r}: expected ARM.SECTION.KEY=VALUE with ARM one of common, {', '.join(ARMS)}"
            )
        settings.append((parts[0], parts[1], parts[2], value))
    for arm, section, key, value in settings:
        for layer in (common, *arms.values()) if arm == "common" else (arms[arm],):
            layer.setdefault(section, {})[key] = value
    compare = CompareArgs(
        tasks=args.tasks.split(","),
        teacher_model=args.teacher_model,
        student_model=args.student_model,
        student_layers=ints(args.student_layers, "--student-layers") if args.student_layers else None,
        seeds=ints(args.seeds, "--seeds"),
        output_dir=args.output_dir,
        common=common,
        arms=arms,
        inference_runs=args.inference_runs,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    run_compare(compare)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from kdlora.sweep import SweepArgs, run_sweep

    values = _train_values(args)
    values.setdefault("train", {}).setdefault("output_dir", "runs/sweep")
    sweep = SweepArgs(
        base=values,
        grid=args.grid,
        storage=args.storage,
        study_name=args.study_name,
        top_k=args.top_k,
        max_trials=args.max_trials,
        retry_failed=args.retry_failed,
    )
    run_sweep(sweep)
    return 0


def _report(args: argparse.Namespace) -> int:
    from kdlora.report import write_report

    if args.top_k <= 0:
        raise KdloraError(f"--top-k must be > 0, got {args.top_k}")
    output_dir = Path(args.output_dir) if args.output_dir else None
    write_report(Path(args.runs_dir), top_k=args.top_k, task=args.task, quiet=args.quiet, output_dir=output_dir)
    return 0


def _fail(args: argparse.Namespace, message: str) -> None:
    """One line on stderr; or, in a child run by `kdlora compare`, into the file it named, for it to report."""
    if args.debug:
        traceback.print_exc()
    from kdlora.compare import ERROR_FILE_ENV

    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file:
        Path(error_file).write_text(message + "\n")
    else:
        print(f"kdlora: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # keep "newly initialized weights" notices out of the user's way
        hub_logging.set_verbosity_error()  # and the hub client's retry chatter when offline: our error says it
        hf_logging.disable_progress_bar()  # one progress bar per stage is ours; no bars for loading and saving
        warnings.filterwarnings("ignore", category=FutureWarning)
    commands = {
        "train": _train,
        "demo": _demo,
        "evaluate": _evaluate,
        "predict": _predict,
        "bench": _bench,
        "compare": _compare,
        "sweep": _sweep,
        "report": _report,
    }
    try:
        return commands[args.command](args)
    except KdloraError as exc:
        _fail(args, str(exc))
        return 2
    except OSError as exc:  # disk full, permissions, ...: say what and where, never leave it looking finished
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f" while writing {exc.filename}" if exc.filename else ""
        _fail(args, f"{reason}{where}; the run was not marked finished")
        return 2
    except KeyboardInterrupt:
        print("kdlora: interrupted; the run is unfinished (no metrics.json was written)", file=sys.stderr)
        return 130
