"""Command line: `kdlora train|demo|evaluate|predict|export|bench|compare|sweep|report`, also as `python -m kdlora`."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

from kdlora.bench import BenchArgs, run_bench, to_markdown
from kdlora.compare import BUDGET_ARMS, ERROR_FILE_ENV, CompareArgs, run_compare
from kdlora.config import (
    PRESETS,
    DataArgs,
    build_config,
    build_section,
    command_fields,
    field_flag,
    flags,
    from_flags,
    layered,
    preset_values,
    read_yaml,
)
from kdlora.data import load_task
from kdlora.env import is_main_process, say
from kdlora.errors import KdloraError
from kdlora.evaluate import (
    EvaluateArgs,
    PredictArgs,
    constant_notice,
    evaluate,
    predict,
    predict_file,
    split_loaders,
    write_submission,
)
from kdlora.export import ExportArgs, describe, run_export
from kdlora.io import atomic_write_json
from kdlora.kinds import CLASSIFICATION, kind_of, kind_of_model
from kdlora.models import load_saved
from kdlora.report import ReportArgs, write_report
from kdlora.rundir import LR_PLOT, artefacts, is_run, model_dir, read_config
from kdlora.sweep import SweepArgs, run_sweep
from kdlora.tasks import get_task
from kdlora.train import run

# The flags of `train` (and demo, sweep) are generated from the config fields' metadata (kdlora.config.flags).
# compare: flags that set one config value for every arm.
COMPARE_COMMON_FLAGS = (
    "--data-dir",
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
    "--prompt-column",
    "--completion-column",
    "--messages-column",
    "--text-column",
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

    for f in flags().values():
        if (sections and f.section not in sections) or f.flag in skip or (only and f.flag not in only):
            continue
        if f.is_bool:
            p.add_argument(f.flag, action="store_true", default=argparse.SUPPRESS, help=f.help)
        else:
            p.add_argument(f.flag, default=argparse.SUPPRESS, help=f.help)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in flags().values():
        dest = f.flag.lstrip("-").replace("-", "_")
        if dest in vars(args):
            out.setdefault(f.section, {})[f.name] = getattr(args, dest)
    return out


class _OldSpelling(argparse.Action):
    """An old spelling of a flag: still taken for a release, with a one-line notice naming the new one."""

    def __init__(self, *args: Any, new: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(f"kdlora: {option_string} is deprecated: use {self.new} (it means the same thing)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_fields(p: argparse.ArgumentParser, cls: type) -> None:
    """A command's flags, generated from its dataclass's field metadata (config.arg), as train's are from RunConfig.
    Their values land under '<Class>.<field>', apart from the config flags a command may also take."""
    for f, hint in command_fields(cls):
        dest, flag, help = f"{cls.__name__}.{f.name}", field_flag(f), f.metadata["help"]
        if f.metadata.get("positional"):
            p.add_argument(dest, metavar=f.name.upper(), help=help)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        metavar = flag.lstrip("-").replace("-", "_").upper()  # the flag's name: --arms ARMS, not the field's
        kind = {"action": "store_true"} if hint is bool else {"required": required, "metavar": metavar}
        p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help, **kind)
        for old in f.metadata.get("old", ()):
            p.add_argument(old, dest=dest, action=_OldSpelling, new=flag, help=argparse.SUPPRESS)


def _fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values given for `cls`'s flags, by field name."""
    prefix = f"{cls.__name__}."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


def _command(args: argparse.Namespace, cls: type, **extra: Any) -> Any:
    return from_flags(cls, _fields(args, cls), **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlora", description="KD-LoRA: LoRA + knowledge distillation for GLUE.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with fft, lora or kd-lora")
    _add_train_flags(p)

    p = sub.add_parser(
        "lr-find",
        help="the learning-rate range test of a run (train's flags) alone: prints the suggestion, draws the curve",
        description="Runs --lr auto's probe on the run's own model, data and objective, then stops. The run "
        "directory keeps the result: `kdlora train` with the same flags and --lr auto trains at it without probing.",
    )
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
    _add_fields(p, EvaluateArgs)
    _add_config_flags(p, ("data",), skip=("--max-train-samples", "--test-file"))

    _add_protocol_parsers(sub)

    p = sub.add_parser(
        "export",
        help="a finished run's merged model as ONNX (fp32, fp16 or int8), checked against PyTorch",
        description="Writes model.onnx (dynamic batch and sequence axes), config.json, the tokenizer and export.json "
        "(the parity check) in the layout optimum's ORTModelForSequenceClassification loads. Needs kdlora[export].",
    )
    _add_fields(p, ExportArgs)

    p = sub.add_parser("report", help="Table 1, Table 2, Figure 2 and CSVs from finished run directories")
    _add_fields(p, ReportArgs)

    p = sub.add_parser(
        "predict",
        help="label a raw file (--input-file) or write GLUE test-set submissions (--task, --output-dir)",
        description="--input-file F --output-file OUT.csv|.jsonl: every row of a CSV, TSV, JSONL, JSON, Parquet or "
        "plain-text file (one text a line), in input order, with its label and class probabilities. "
        "--task T --output-dir D: the GLUE leaderboard files of T's test split(s).",
    )
    _add_fields(p, PredictArgs)
    return parser


def _add_protocol_parsers(sub: Any) -> None:
    """bench, compare and sweep: the commands that run many trainings or time them."""
    p = sub.add_parser("bench", help="parameters per rank, size, peak training memory and inference time per method")
    _add_fields(p, BenchArgs)
    _add_config_flags(p, only=OWN_DATA_FLAGS)

    p = sub.add_parser(
        "compare",
        help="the paper's three arms (fft teacher, lora, kd-lora) on the same splits and seeds, with a report",
        description="Per task and seed: the fft teacher, LoRA on the teacher's model, KD-LoRA on the student "
        "distilled from that teacher. Finished arms with the same config are reused; a killed compare resumes.",
    )
    _add_fields(p, CompareArgs)
    _add_preset_flag(p)
    p.add_argument(
        "--config", help="YAML: `common:` sections for every arm, then one section per arm (fft:, lora:, ...)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ARM.SECTION.KEY=VALUE",
        help="one setting of one arm (or 'common'), e.g. --set kd-lora.train.lr=2e-3; repeatable",
    )
    _add_config_flags(p, only=(*COMPARE_COMMON_FLAGS, *OWN_DATA_FLAGS, "--student-init"))

    p = sub.add_parser(
        "sweep",
        help="a grid of configs for one method and task on Optuna (paper grids or YAML), resumable, shareable",
        description="The train flags give the base config; --grid the points tried on top of it. The study lives in "
        "OUTPUT/study.db unless --storage names a database that several workers share.",
    )
    _add_train_flags(p)
    _add_fields(p, SweepArgs)


def _train_values(args: argparse.Namespace, preset: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Config sections from the lowest layer up: --preset, a command's own preset, the --config YAML file, the
    flags."""

    values = layered(preset, read_yaml(args.config) if args.config else {}, _overrides(args))
    return layered(preset_values(args.preset, values.get("train", {}).get("method")), values)


def _train(args: argparse.Namespace, preset: dict[str, dict[str, Any]] | None = None) -> int:
    cfg = build_config(_train_values(args, preset))
    metrics = run(cfg)
    if is_main_process():
        _print_summary(metrics, Path(cfg.train.output_dir))
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    cfg = build_config(_train_values(args))
    record = run(cfg, probe_only=True)
    if is_main_process():
        probe, out = record["lr_probe"], Path(cfg.train.output_dir)
        clamped = f", clamped to {probe['lr']:.3g} (the {probe['band'][0]:g}..{probe['band'][1]:g} band)"
        print(
            f"suggested lr: {probe['suggestion']:.3g}{clamped if probe['lr'] != probe['suggestion'] else ''} "
            f"({probe['rule']}; {probe['steps']} steps, {probe['seconds']:.0f} s)\n"
            f"curve: {out / LR_PLOT}; `kdlora train` with these flags and --lr auto trains at it"
        )
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
    names = ("matthews_correlation", "accuracy", "f1", "pearson", "spearman", "nll", "perplexity", "kl", "agreement",
             "exact_match")  # a classifier's, a regressor's, a language model's  # fmt: skip
    named = {k: metrics[k] for k in names if k in metrics}
    print(
        f"\n{metrics['method']} on {metrics['task']}: score {metrics['score']:.2f} at epoch {metrics['best_epoch']} "
        f"({', '.join(f'{k} {v:.4f}' for k, v in named.items())})"
    )
    if metrics.get("teacher_score") is not None:
        print(
            f"teacher: score {metrics['teacher_score']:.2f}, {metrics['teacher_total_params']:,} parameters "
            f"({metrics['teacher']})"
        )
    lora = f" (LoRA {metrics['lora_params']:,})" if metrics["lora_params"] else ""
    print(
        f"parameters: {metrics['trainable_params']:,} trainable of {metrics['total_params']:,}{lora}; "
        f"trained in {metrics['train_seconds']:.0f} s, peak memory {metrics['peak_memory_mb']:.0f} MB"
    )

    if metrics.get("lr") is not None:
        restarts = metrics.get("lr_restarts") or []
        how = "chosen by the range test" if metrics.get("lr_chosen_by") == "auto" else "given"
        again = f"; lowered {len(restarts)} time(s) after a collapse" if restarts else ""
        print(f"lr: {metrics['lr']:.3g} ({how}{again})")
    print(f"artefacts: {', '.join(str(p) for p in artefacts(out))}")
    if metrics.get("collapsed"):
        print(
            f"the run ended collapsed: its best epoch predicts one {'value' if 'pearson' in metrics else 'class'}"
            " at the labels' entropy; try a lower --lr, more --epochs or more labelled rows"
        )


def _eval_data(args: argparse.Namespace) -> Any:
    """The data to score a saved model on: the data flags over, for a run directory, the data it was trained on; for
    the user's own data, the labels of the model itself (its id2label), so an evaluation file need not hold every
    class."""

    model = _fields(args, EvaluateArgs)["model_dir"]
    from kdlora import lm

    if lm.is_causal_lm(model):  # its figures per token are the run's own; a classifier's data would not fit it
        raise KdloraError(
            f"{model_dir(model)} is a causal language model, not a classifier: its validation figures are in the "
            "run's metrics.json, and `kdlora predict --input-file` completes prompts with it"
        )
    stored = ((read_config(model) or {}).get("data") or {}) if is_run(model) else {}
    values = {**stored, **_overrides(args).get("data", {})}
    data: DataArgs = build_section(
        DataArgs, {k: v for k, v in values.items() if k not in ("max_train_samples", "test_file")}, "data"
    )
    if data.custom and not data.labels:
        config = json.loads((model_dir(model) / "config.json").read_text())
        if kind_of_model(config) is CLASSIFICATION:
            data.labels = [str(config["id2label"][str(i)]) for i in range(len(config["id2label"]))]
        else:
            data.problem = "regression"
    return data


def _evaluate(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    cmd: EvaluateArgs = _command(args, EvaluateArgs)
    data = _eval_data(args)
    task = load_task(data)
    model, tokenizer = load_saved(cmd.model_dir, task)
    accelerator = Accelerator()
    loaders = split_loaders(task, tokenizer, data, task.eval_splits, cmd.batch_size)
    loaders = {s: accelerator.prepare(dl) for s, dl in loaders.items()}
    scores, constant = evaluate(accelerator.prepare(model), loaders, task, accelerator)
    if constant:
        say(constant_notice(constant, task))
    metrics = {"task": task.name, **scores}
    print(json.dumps(metrics, indent=2))
    if cmd.output:
        atomic_write_json(cmd.output, metrics)
    return 0


def _predict(args: argparse.Namespace) -> int:
    cmd: PredictArgs = _command(args, PredictArgs)
    if cmd.input_file or cmd.output_file:
        return _predict_file(cmd)
    if not (cmd.task and cmd.output_dir):
        raise KdloraError("predict needs --input-file and --output-file, or --task and --output-dir (GLUE test sets)")
    from accelerate import Accelerator

    task = get_task(cmd.task)
    data = DataArgs(task=task.name, data_dir=cmd.data_dir, dataset=cmd.dataset, max_length=cmd.max_length)
    model, tokenizer = load_saved(cmd.model_dir, task)
    accelerator = Accelerator()
    model = accelerator.prepare(model)
    for split, name in zip(task.test_splits, task.submission, strict=True):
        loader = split_loaders(task, tokenizer, data, (split,), cmd.batch_size)[split]
        out = predict(model, accelerator.prepare(loader), accelerator, kind_of(task))
        path = Path(cmd.output_dir) / name
        print(f"wrote {write_submission(task, split, out, path)} predictions to {path}")
    return 0


def _predict_file(cmd: PredictArgs) -> int:
    """`predict --input-file`: the text columns are the flag's, else those the run was trained on, else guessed."""
    if not (cmd.input_file and cmd.output_file):
        raise KdloraError("--input-file and --output-file go together")
    from kdlora import lm

    if lm.is_causal_lm(cmd.model_dir):  # a language model completes each row's prompt
        if cmd.text_columns and len(cmd.text_columns) > 1:
            raise KdloraError("a language model completes one prompt a row: give one --text-columns column")
        column = cmd.text_columns[0] if cmd.text_columns else None
        rows = lm.generate_file(cmd.model_dir, cmd.input_file, cmd.output_file, column, cmd.id_column,
                                cmd.batch_size, cmd.max_length, cmd.max_new_tokens)  # fmt: skip
        print(f"wrote {rows} completions to {cmd.output_file}")
        return 0
    stored = ((read_config(cmd.model_dir) or {}).get("data") or {}) if is_run(cmd.model_dir) else {}
    columns = cmd.text_columns or stored.get("text_columns")
    rows = predict_file(
        cmd.model_dir, cmd.input_file, cmd.output_file, columns, cmd.id_column, cmd.batch_size, cmd.max_length
    )
    print(f"wrote {rows} predictions to {cmd.output_file}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    own = _overrides(args).get("data", {})
    given = _fields(args, BenchArgs)
    if given.get("data_dir") is None and Path("../shared/glue").is_dir() and not own:
        given["data_dir"] = "../shared/glue"
    bench = from_flags(BenchArgs, given, data=own)
    print(to_markdown(run_bench(bench)))
    print(f"wrote {Path(bench.output_dir) / 'bench.json'} and bench.md")
    return 0


def _compare_layers(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The common and per-arm config sections of compare: the --config YAML, then the config flags (every arm;
    --student-init the student arms), then --set (one arm, or common)."""
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
    # Flags win over the YAML file, the arms' own sections included; --set wins over both.
    settings = []
    for section, items in _overrides(args).items():
        for key, value in items.items():
            settings.append(("kd-lora" if key == "student_init" else "common", section, key, value))
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
    return common, arms


def _compare(args: argparse.Namespace) -> int:
    common, arms = _compare_layers(args)
    run_compare(_command(args, CompareArgs, common=common, arms=arms, preset=args.preset))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    values = _train_values(args)
    values.setdefault("train", {}).setdefault("output_dir", "runs/sweep")
    run_sweep(_command(args, SweepArgs, base=values))
    return 0


def _export(args: argparse.Namespace) -> int:
    export: ExportArgs = _command(args, ExportArgs)
    print("".join(describe(run_export(export))))
    if export.format == "safetensors":
        print(f"wrote the merged model to {export.output_dir} with export.json")
    else:
        print(f"wrote {Path(export.output_dir) / 'model.onnx'} with its config, tokenizer and export.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    cmd: ReportArgs = _command(args, ReportArgs)
    output_dir = Path(cmd.output_dir) if cmd.output_dir else None
    write_report(Path(cmd.runs_dir), top_k=cmd.top_k, task=cmd.task, quiet=cmd.quiet, output_dir=output_dir)
    return 0


def _unfinished(args: argparse.Namespace) -> str:
    """What a failed write leaves: only the commands that train make runs that could look finished."""
    return "; the run was not marked finished" if args.command in ("train", "demo", "compare", "sweep") else ""


def _fail(args: argparse.Namespace, message: str) -> None:
    """One line on stderr; or, in a child run by `kdlora compare`, into the file it named, for it to report."""
    if args.debug:
        traceback.print_exc()

    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file:
        Path(error_file).write_text(message + "\n")
    else:
        print(f"kdlora: error: {message}", file=sys.stderr)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that it unwinds as on Ctrl-C (the lock released)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _close_bars() -> str:
    """Close the progress bars still open (so none is redrawn after the last line); the prefix that puts the next
    line on a line of its own."""
    from tqdm import tqdm

    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        bar.close()
    return "" if bars else "\n"


def _stop_on_signals() -> dict[int, Any]:
    """Handle SIGTERM and SIGHUP like SIGINT (a batch system's stop, a closed terminal); returns the handlers they
    replaced. Only in the main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    return {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}


def _out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    )


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
        "lr-find": _lr_find,
        "demo": _demo,
        "evaluate": _evaluate,
        "predict": _predict,
        "bench": _bench,
        "compare": _compare,
        "sweep": _sweep,
        "report": _report,
        "export": _export,
    }
    previous = _stop_on_signals()
    try:
        return commands[args.command](args)
    except KdloraError as exc:
        _fail(args, str(exc))
        return 2
    except OSError as exc:  # disk full, permissions, ...: say what and where, never leave it looking finished
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f" while writing {exc.filename}" if exc.filename else ""
        _fail(args, f"{reason}{where}{_unfinished(args)}")
        return 2
    except KeyboardInterrupt as exc:  # SIGINT, and SIGTERM/SIGHUP as Stopped: the lock is released on the way out
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        name = signal.Signals(signum).name
        print(
            f"{_close_bars()}kdlora: stopped by {name}; the run is unfinished (no metrics.json was written)",
            file=sys.stderr,
        )
        return 128 + signum
    except Exception as exc:
        if _out_of_memory(exc):
            hint = "lower --batch-size or --max-length, or add --gradient-checkpointing"
            _fail(args, f"out of memory: {hint}{_unfinished(args)}")
            return 2
        if type(exc).__name__ != "SafetensorError":  # safetensors' own error for a write that failed (a full disk)
            raise
        _fail(args, f"could not write a safetensors file ({str(exc).splitlines()[0]}){_unfinished(args)}")
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
