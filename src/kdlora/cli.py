"""Command line: `kdlora train | demo | evaluate | predict` (also `python -m kdlora`)."""

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

    p = sub.add_parser("predict", help="write GLUE test-set submission files (CoLA.tsv, ...)")
    p.add_argument("--model-dir", required=True, help="a run directory (uses its merged/) or a model directory")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--output-dir", required=True, help="directory for the submission TSV(s)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    return parser


def _train(args: argparse.Namespace, preset: dict[str, dict[str, Any]] | None = None) -> int:
    from kdlora.config import load_config, read_yaml
    from kdlora.train import process_state, run

    values: dict[str, dict[str, Any]] = {}
    layers = [preset or {}, read_yaml(args.config) if args.config else {}, _overrides(args)]
    for layer in layers:
        for section, items in layer.items():
            values.setdefault(section, {}).update(items or {})
    cfg = load_config(None, values)
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


def _bench(args: argparse.Namespace) -> int:
    from kdlora.bench import BenchArgs, run_bench, to_markdown

    def ints(text: str, flag: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",")]
        except ValueError:
            raise KdloraError(f"{flag} must be comma-separated integers, got {text!r}") from None

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # keep "newly initialized weights" notices out of the user's way
        hub_logging.set_verbosity_error()  # and the hub client's retry chatter when offline: our error says it
        hf_logging.disable_progress_bar()  # one progress bar per stage is ours; no bars for loading and saving
        warnings.filterwarnings("ignore", category=FutureWarning)
    commands = {"train": _train, "demo": _demo, "evaluate": _evaluate, "predict": _predict, "bench": _bench}
    try:
        return commands[args.command](args)
    except KdloraError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"kdlora: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, ...: say what and where, never leave it looking finished
        if args.debug:
            traceback.print_exc()
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(f"kdlora: error: {reason}{where}; the run was not marked finished", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdlora: interrupted; the run is unfinished (no metrics.json was written)", file=sys.stderr)
        return 130
