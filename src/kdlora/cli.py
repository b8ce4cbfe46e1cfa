"""Command line: `kdlora train|demo|evaluate|predict|export|bench|compare|sweep|report`, also as `python -m kdlora`."""

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

# The flags of `train` (and demo, sweep) are generated from the config fields' metadata (kdlora.config.flags).
# compare: flags that set one config value for every arm.
COMPARE_COMMON_FLAGS = (
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
# The flags that describe the user's own data (with --tasks naming it), for compare and bench.
OWN_DATA_FLAGS = (
    "--train-file",
    "--validation-file",
    "--dataset",
    "--dataset-config",
    "--validation-split",
    "--text-columns",
    "--label-column",
    "--id-column",
    "--labels",
    "--problem",
    "--metric",
)

# The offline default: KD-LoRA on CoLA with the packaged all-MiniLM-L6-v2 as teacher and its layers 0,2,4 as student,
# with kdlora's default config (the student starts from the fine-tuned teacher's layers: all-MiniLM-L6-v2 was trained
# for mean-pooled embeddings, and from its pretrained layers a LoRA student did worse on CoLA).
DEMO: dict[str, dict[str, Any]] = {
    "model": {"teacher_model": "all-MiniLM-L6-v2", "student_layers": [0, 2, 4]},
    "data": {"task": "cola"},
    "kd": {"teacher_epochs": 2},
    "train": {"method": "kd-lora", "output_dir": "runs/demo"},
}
# A few minutes on 2 CPU cores. Smaller batches give the teacher enough steps to leave the majority class.
DEMO_QUICK = {
    "data": {"max_train_samples": 3000, "max_eval_samples": 500},
    "train": {"epochs": 2, "batch_size": 16, "output_dir": "runs/demo-quick"},
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    _add_preset_flag(p)
    p.add_argument("--config", help="YAML file with model/data/lora/kd/train sections; flags override it")
    _add_config_flags(p)


def _add_preset_flag(p: argparse.ArgumentParser) -> None:
    from kdlora.config import PRESETS

    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="the settings below --config and the flags: default (kdlora's: LoRA on every linear layer, T 1, 5 "
        "epochs for the LoRA methods) or paper (the KD-LoRA paper's: query/value, T 2, 3 epochs)",
    )


def _add_config_flags(
    p: argparse.ArgumentParser, sections: tuple[str, ...] | None = None, skip: tuple = (), only: tuple = ()
) -> None:
    """Flags generated from the config fields of `sections` (all by default; or `only` these flags); unset flags stay
    out of the namespace."""
    from kdlora.config import flags

    for f in flags().values():
        if (sections and f.section not in sections) or f.flag in skip or (only and f.flag not in only):
            continue
        if f.is_bool:
            p.add_argument(f.flag, action="store_true", default=argparse.SUPPRESS, help=f.help)
        else:
            p.add_argument(f.flag, default=argparse.SUPPRESS, help=f.help)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from kdlora.config import flags

    out: dict[str, dict[str, Any]] = {}
    for f in flags().values():
        dest = f.flag.lstrip("-").replace("-", "_")
        if dest in vars(args):
            out.setdefault(f.section, {})[f.name] = getattr(args, dest)
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

    p = sub.add_parser(
        "evaluate",
        help="score a saved model on a task's validation split(s)",
        description="A run directory is scored on the data it was trained on unless data flags say otherwise.",
    )
    p.add_argument("--model-dir", required=True, help="a run directory (uses its merged/) or a model directory")
    _add_config_flags(p, ("data",), skip=("--max-train-samples", "--test-file"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="also write the metrics to this JSON file")

    _add_protocol_parsers(sub)

    p = sub.add_parser(
        "export",
        help="a finished run's merged model as ONNX (fp32, fp16 or int8), checked against PyTorch",
        description="Writes model.onnx (dynamic batch and sequence axes), config.json, the tokenizer and export.json "
        "(the parity check) in the layout optimum's ORTModelForSequenceClassification loads. Needs kdlora[export].",
    )
    p.add_argument(
        "--model-dir", required=True, help="a finished run directory (uses its merged/) or a model directory"
    )
    p.add_argument("--format", default="onnx", help="onnx (the one format so far)")
    p.add_argument("--quantize", default="none", help="none | fp16 | int8 (dynamic, per-channel weight scales)")
    p.add_argument("--per-tensor", action="store_true", help="int8 with one scale per tensor (measured worse)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-eval-samples", type=int, help="check parity on the first N validation examples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("report", help="Table 1, Table 2, Figure 2 and CSVs from finished run directories")
    p.add_argument("runs_dir", help="directory searched for run directories (train, demo, compare or sweep outputs)")
    p.add_argument("--top-k", type=int, default=6, help="configs in the median when a task and method has several")
    p.add_argument("--task", help="task of Table 2 and Figure 2 (default cola when present)")
    p.add_argument("--output-dir", help="write the report here instead of into RUNS_DIR")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser(
        "predict",
        help="label a raw file (--input-file) or write GLUE test-set submissions (--task, --output-dir)",
        description="--input-file F --output-file OUT.csv|.jsonl: every row of a CSV, TSV, JSONL, JSON, Parquet or "
        "plain-text file (one text a line), in input order, with its label and class probabilities. "
        "--task T --output-dir D: the GLUE leaderboard files of T's test split(s).",
    )
    p.add_argument("--model-dir", required=True, help="a run directory (uses its merged/) or a model directory")
    p.add_argument("--input-file", help="rows to label: .csv, .tsv, .jsonl, .json, .parquet or .txt")
    p.add_argument("--output-file", help="where the predictions go: .csv or .jsonl")
    p.add_argument("--text-columns", help="the input's text column(s) (default: the run's, or guessed)")
    p.add_argument("--id-column", help="an input column copied to the output as id (default: the row number)")
    p.add_argument("--task", help="GLUE task of the submission mode")
    p.add_argument("--data-dir")
    p.add_argument("--dataset", default="nyu-mll/glue")
    p.add_argument("--output-dir", help="directory for the submission TSV(s)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    return parser


def _add_protocol_parsers(sub: Any) -> None:
    """bench, compare and sweep: the commands that run many trainings or time them."""
    p = sub.add_parser("bench", help="parameters per rank, size, peak training memory and inference time per method")
    p.add_argument(
        "--teacher-model", default="all-MiniLM-L6-v2", help="teacher checkpoint (default: the packaged MiniLM)"
    )
    p.add_argument("--teacher", dest="deprecated_teacher", help=argparse.SUPPRESS)  # the old name of --teacher-model
    p.add_argument("--student-model", "--student", help="student checkpoint (default: --student-layers of the teacher)")
    p.add_argument("--student-layers", default="0,2,4")
    p.add_argument("--task", help="GLUE task (default cola), or the name of your own data")
    p.add_argument("--data-dir", help="GLUE data for the inference timing (default ../shared/glue when present)")
    _add_config_flags(p, only=OWN_DATA_FLAGS)
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument(
        "--target-modules",
        default="none",
        help="LoRA targets: none (query/value, as in the paper's Table 2; the default), all-linear, or names",
    )
    p.add_argument("--batch-size", type=int, default=32, help="training batch for the memory measurement")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length for the memory measurement")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="measure memory with each layer's activations recomputed"
    )
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
    p.add_argument(
        "--tasks", required=True, help="comma-separated GLUE tasks, e.g. cola,mrpc,stsb,rte,wnli; or your data's name"
    )
    p.add_argument("--seeds", default="42", help="comma-separated seeds; the table gives mean ± std (default 42)")
    p.add_argument("--teacher-model", required=True, help="model of the fft arm, base of the lora arm, the teacher")
    p.add_argument("--student-layers", help="kd-lora student: these encoder layers of the teacher, e.g. 0,2,4")
    p.add_argument("--student-model", help="kd-lora student: this checkpoint instead")
    p.add_argument("--student-init", help="pretrained | teacher: take --student-layers from which checkpoint")
    p.add_argument("--data-dir", help="GLUE TSV directory, e.g. ../shared/glue")
    p.add_argument("--output-dir", default="runs/compare")
    _add_preset_flag(p)
    p.add_argument("--config", help="YAML: `common:` sections for every arm, then `fft:`, `lora:`, `kd-lora:` sections")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ARM.SECTION.KEY=VALUE",
        help="one setting of one arm (or 'common'), e.g. --set kd-lora.train.lr=2e-3; repeatable",
    )
    from kdlora.config import flags

    for flag in COMPARE_COMMON_FLAGS + OWN_DATA_FLAGS:
        p.add_argument(flag, help=f"{flags()[flag].help} (every arm)")
    p.add_argument(
        "--label-budget",
        help="the label-scarce protocol: per budget keep N labelled training rows (a stratified draw per seed) and "
        "add the arms student (alone) and kd-lora-unlabeled (the rest as unlabelled text), e.g. 500,1000,2000",
    )
    p.add_argument("--teacher-arm", default="fft", help="fft | lora | best: the arm the students distil from")
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


def _train_values(args: argparse.Namespace, preset: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Config sections from the lowest layer up: --preset, a command's own preset, the --config YAML file, the
    flags."""
    from kdlora.config import layered, preset_values, read_yaml

    values = layered(preset, read_yaml(args.config) if args.config else {}, _overrides(args))
    return layered(preset_values(args.preset, values.get("train", {}).get("method")), values)


def _train(args: argparse.Namespace, preset: dict[str, dict[str, Any]] | None = None) -> int:
    from kdlora.config import build_config
    from kdlora.env import is_main_process
    from kdlora.train import run

    cfg = build_config(_train_values(args, preset))
    metrics = run(cfg)
    if is_main_process():
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
    from kdlora.rundir import artefacts

    print(f"artefacts: {', '.join(str(p) for p in artefacts(out))}")


def _eval_data(args: argparse.Namespace) -> Any:
    """The data to score a saved model on: the data flags over, for a run directory, the data it was trained on; for
    the user's own data, the labels of the model itself (its id2label), so an evaluation file need not hold every
    class."""
    from kdlora.config import DataArgs, build_section
    from kdlora.rundir import is_run, model_dir, read_config

    stored = ((read_config(args.model_dir) or {}).get("data") or {}) if is_run(args.model_dir) else {}
    values = {**stored, **_overrides(args).get("data", {})}
    data: DataArgs = build_section(
        DataArgs, {k: v for k, v in values.items() if k not in ("max_train_samples", "test_file")}, "data"
    )
    if data.custom and not data.labels:
        config = json.loads((model_dir(args.model_dir) / "config.json").read_text())
        if config.get("problem_type") != "regression" and config.get("num_labels", 2) > 1:
            data.labels = [str(config["id2label"][str(i)]) for i in range(len(config["id2label"]))]
        else:
            data.problem = "regression"
    return data


def _evaluate(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from kdlora.data import load_task
    from kdlora.evaluate import evaluate, split_loaders
    from kdlora.io import atomic_write_json
    from kdlora.models import load_saved

    data = _eval_data(args)
    task = load_task(data)
    model, tokenizer = load_saved(args.model_dir, task)
    accelerator = Accelerator()
    loaders = split_loaders(task, tokenizer, data, task.eval_splits, args.batch_size)
    loaders = {s: accelerator.prepare(dl) for s, dl in loaders.items()}
    metrics = {"task": task.name, **evaluate(accelerator.prepare(model), loaders, task, accelerator)}
    print(json.dumps(metrics, indent=2))
    if args.output:
        atomic_write_json(args.output, metrics)
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.input_file or args.output_file:
        return _predict_file(args)
    if not (args.task and args.output_dir):
        raise KdloraError("predict needs --input-file and --output-file, or --task and --output-dir (GLUE test sets)")
    from accelerate import Accelerator

    from kdlora.config import DataArgs
    from kdlora.evaluate import predict, split_loaders, write_submission
    from kdlora.models import load_saved
    from kdlora.tasks import get_task

    task = get_task(args.task)
    data = DataArgs(task=task.name, data_dir=args.data_dir, dataset=args.dataset, max_length=args.max_length)
    model, tokenizer = load_saved(args.model_dir, task)
    accelerator = Accelerator()
    model = accelerator.prepare(model)
    for split, name in zip(task.test_splits, task.submission, strict=True):
        loader = split_loaders(task, tokenizer, data, (split,), args.batch_size)[split]
        out = predict(model, accelerator.prepare(loader), accelerator, task.is_regression)
        path = Path(args.output_dir) / name
        print(f"wrote {write_submission(task, split, out, path)} predictions to {path}")
    return 0


def _predict_file(args: argparse.Namespace) -> int:
    """`predict --input-file`: the text columns are the flag's, else those the run was trained on, else guessed."""
    from kdlora.evaluate import predict_file
    from kdlora.rundir import is_run, read_config

    if not (args.input_file and args.output_file):
        raise KdloraError("--input-file and --output-file go together")
    if args.batch_size <= 0 or args.max_length < 8:
        raise KdloraError("--batch-size must be > 0 and --max-length at least 8")
    stored = ((read_config(args.model_dir) or {}).get("data") or {}) if is_run(args.model_dir) else {}
    columns = args.text_columns.split(",") if args.text_columns else stored.get("text_columns")
    rows = predict_file(
        args.model_dir, args.input_file, args.output_file, columns, args.id_column, args.batch_size, args.max_length
    )
    print(f"wrote {rows} predictions to {args.output_file}")
    return 0


def ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise KdloraError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _bench(args: argparse.Namespace) -> int:
    from kdlora.bench import BenchArgs, run_bench, to_markdown

    data_dir = args.data_dir
    from kdlora.config import flags

    given = {flags()[f].name: getattr(args, f.lstrip("-").replace("-", "_"), None) for f in OWN_DATA_FLAGS}
    own = {k: v for k, v in given.items() if v is not None}
    if data_dir is None and Path("../shared/glue").is_dir() and not own:
        data_dir = "../shared/glue"
    teacher = args.teacher_model
    if args.deprecated_teacher:
        print(
            "kdlora: bench --teacher is deprecated: it is --teacher-model (a checkpoint), as in train", file=sys.stderr
        )
        teacher = args.deprecated_teacher
    bench = BenchArgs(
        teacher=teacher,
        student=args.student_model,
        student_layers=ints(args.student_layers, "--student-layers"),
        task=args.task,
        data_dir=data_dir,
        data=own,
        ranks=ints(args.ranks, "--ranks"),
        target_modules=None if args.target_modules.lower() == "none" else args.target_modules.split(","),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
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
    from kdlora.compare import BUDGET_ARMS, CompareArgs, run_compare
    from kdlora.config import flags, read_yaml

    raw = read_yaml(args.config) if args.config else {}

    def sections(value: Any, where: str) -> dict[str, dict[str, Any]]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
            raise KdloraError(f"{args.config}: '{where}' must map sections (model, data, lora, kd, train) to mappings")
        return {k: dict(v or {}) for k, v in value.items()}

    common = {k: dict(v or {}) for k, v in raw.items() if k not in (*BUDGET_ARMS, "common")}
    for section, items in sections(raw.get("common"), "common").items():
        common.setdefault(section, {}).update(items)
    arms = {arm: sections(raw.get(arm), arm) for arm in BUDGET_ARMS if raw.get(arm) is not None}
    if args.data_dir:
        common.setdefault("data", {})["data_dir"] = args.data_dir
    # Flags win over the YAML file, the arms' own sections included; --set wins over both.
    settings = []
    for flag in COMPARE_COMMON_FLAGS + OWN_DATA_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            settings.append(("common", flags()[flag].section, flags()[flag].name, value))
    if args.student_init:
        settings.append(("kd-lora", "model", "student_init", args.student_init))
    for item in args.set:
        target, sep, value = item.partition("=")
        parts = target.split(".")
        if not sep or len(parts) != 3 or parts[0] not in (*BUDGET_ARMS, "common"):
            raise KdloraError(
                f"--set {item!r}: expected ARM.SECTION.KEY=VALUE with ARM one of common, {', '.join(BUDGET_ARMS)}"
            )
        settings.append((parts[0], parts[1], parts[2], value))
    for arm, section, key, value in settings:
        for layer in (common, *arms.values()) if arm == "common" else (arms.setdefault(arm, {}),):
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
        preset=args.preset,
        label_budgets=ints(args.label_budget, "--label-budget") if args.label_budget else None,
        teacher_arm=args.teacher_arm,
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


def _export(args: argparse.Namespace) -> int:
    from kdlora.export import ExportArgs, describe, run_export

    export = ExportArgs(
        model_dir=args.model_dir,
        output_dir=args.output_dir,
        format=args.format,
        quantize=args.quantize,
        per_channel=not args.per_tensor,
        max_eval_samples=args.max_eval_samples,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print("".join(describe(run_export(export))))
    print(f"wrote {Path(args.output_dir) / 'model.onnx'} with its config, tokenizer and export.json")
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
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # nor for `datasets` reading a file
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
        "export": _export,
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
