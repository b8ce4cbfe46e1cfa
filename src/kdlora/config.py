"""Typed run configuration: defaults < YAML file < command-line flags, validated on construction.

The YAML file mirrors the dataclasses, one mapping per section:

    model: {teacher_model: all-MiniLM-L6-v2, student_layers: [0, 2, 4]}
    data: {task: cola, data_dir: ../shared/glue}
    lora: {r: 8, lora_alpha: 16}
    kd: {alpha: 0.5, temperature: 2.0}
    train: {method: kd-lora, epochs: 3, output_dir: runs/cola}
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdlora.errors import KdloraError

Method = Literal["fft", "lora", "kd-lora"]
# Default learning rates: full fine-tuning wants a small step, LoRA a larger one (as in the LoRA and KD-LoRA papers).
DEFAULT_LR: dict[str, float] = {"fft": 5e-5, "lora": 5e-4, "kd-lora": 5e-4}


@dataclass
class ModelArgs:
    name: str | None = None  # model to train (fft, lora) or the student base (kd-lora); local path or hub id
    teacher: str | None = None  # kd-lora: a finished fft run directory to distil from
    teacher_model: str | None = None  # kd-lora: fine-tune this checkpoint with fft first, then distil from it
    student_layers: list[int] | None = (
        None  # kd-lora: derive the student from these encoder layers of the teacher checkpoint
    )
    student_init: Literal["pretrained", "teacher"] = (
        "pretrained"  # layers from the pretrained or the fine-tuned teacher
    )
    trust_remote_code: bool = False  # allow model repositories to run their own code

    def __post_init__(self) -> None:
        if self.student_layers is not None:
            if not self.student_layers:
                raise KdloraError(
                    "student_layers is empty: give the encoder layers to keep, e.g. --student-layers 0,2,4"
                )
            if len(set(self.student_layers)) != len(self.student_layers):
                raise KdloraError(f"student_layers {self.student_layers} repeats a layer: list each layer once")
            if min(self.student_layers) < 0:
                raise KdloraError(f"student_layers {self.student_layers} has a negative index: layers count from 0")


@dataclass
class DataArgs:
    task: str = "cola"  # GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli
    data_dir: str | None = None  # GLUE TSV directory or a save_to_disk directory; None loads `dataset` with `datasets`
    dataset: str = "nyu-mll/glue"  # Hugging Face dataset name used when data_dir is not given
    max_length: int = 128  # truncate inputs to this many tokens; padding is per batch
    max_train_samples: int | None = None  # keep only the first N training examples
    max_eval_samples: int | None = None  # keep only the first N examples of each evaluation split

    def __post_init__(self) -> None:
        from kdlora.tasks import get_task

        self.task = get_task(self.task).name
        _require(self.max_length >= 8, f"max_length must be at least 8, got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"{name} must be >= 0, got {value}")


@dataclass
class LoraArgs:
    r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator: the update is scaled by lora_alpha / r
    lora_dropout: float = 0.1  # dropout on the LoRA input
    target_modules: list[str] | None = None  # module names to adapt; None picks query/value for the architecture

    def __post_init__(self) -> None:
        _require(self.r > 0, f"rank (r) must be > 0, got {self.r}")
        _require(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        _require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class KDArgs:
    alpha: float = 0.5  # weight of the task loss; 1 - alpha weighs the distillation loss
    temperature: float = 2.0  # softmax temperature of the distillation loss
    teacher_lr: float = 5e-5  # learning rate of the fft teacher trained by --teacher-model
    teacher_epochs: int | None = None  # epochs of that teacher; None uses train.epochs
    no_recompute: bool = False  # fail instead of recomputing when no cached teacher logits match

    def __post_init__(self) -> None:
        _require(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        _require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _require(self.teacher_lr > 0, f"teacher_lr must be > 0, got {self.teacher_lr}")
        _require(self.teacher_epochs is None or self.teacher_epochs > 0, "teacher_epochs must be > 0")


@dataclass
class TrainArgs:
    method: Method = "kd-lora"  # fft: every parameter; lora: LoRA + head; kd-lora: LoRA + head with distillation
    output_dir: str = "runs/kdlora"  # where the run writes config.yaml, metrics.json, adapter/ and merged/
    epochs: int = 3  # passes over the training set
    lr: float | None = None  # peak learning rate; None picks the method's default
    batch_size: int = 32  # examples per optimizer step (per process, before accumulation)
    eval_batch_size: int = 64  # examples per evaluation batch
    weight_decay: float = 0.01  # AdamW weight decay, not applied to biases and LayerNorm
    warmup_ratio: float = 0.06  # fraction of steps with linear warmup
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping threshold; 0 disables
    seed: int = 42  # fixes data order, dropout, head and LoRA initialisation
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast dtype (bf16 on CUDA is the fast path)
    overwrite: bool = False  # replace an existing run in output_dir
    resume: bool = False  # require a checkpointed unfinished run in output_dir (one is resumed anyway when present)
    save_steps: int = 500  # checkpoint every N optimizer steps (and at every epoch end); 0: epoch ends only
    quiet: bool = False  # no progress bars

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        _require(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(self.batch_size > 0 and self.eval_batch_size > 0, "batch sizes must be > 0")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _require(self.grad_accum_steps > 0, f"grad_accum_steps must be > 0, got {self.grad_accum_steps}")
        _require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _require(self.save_steps >= 0, f"save_steps must be >= 0, got {self.save_steps}")


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    kd: KDArgs = field(default_factory=KDArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        m, method = self.model, self.train.method
        if method == "kd-lora":
            if not (m.teacher or m.teacher_model):
                raise KdloraError(
                    "kd-lora needs a teacher: --teacher RUN_DIR (a finished fft run) or --teacher-model NAME"
                )
            if m.teacher and m.teacher_model:
                raise KdloraError("give either --teacher or --teacher-model, not both")
            if not (m.name or m.student_layers):
                raise KdloraError("kd-lora needs a student: --model NAME or --student-layers 0,2,4")
            if m.name and m.student_layers:
                raise KdloraError("give either --model (student base) or --student-layers, not both")
        elif not m.name:
            raise KdloraError(f"{method} needs --model NAME_OR_PATH")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "lora": LoraArgs, "kd": KDArgs, "train": TrainArgs}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KdloraError(message)


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value or a command-line string to the field's declared type, or raise a one-line error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise KdloraError(
                f"{where} must be one of {', '.join(map(str, args))}; got {value!r}{_suggest(str(value), args)}"
            )
        return value
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise KdloraError(f"{where} must be a list, got {value!r}")
        return [_coerce(item.strip() if isinstance(item, str) else item, args[0], where) for item in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise KdloraError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise KdloraError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise KdloraError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise KdloraError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} for {where}")


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise KdloraError(f"unknown config key '{section}.{key}'{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def build_config(values: dict[str, dict[str, Any]]) -> RunConfig:
    """Build a validated RunConfig from nested {section: {key: value}} values."""
    for section in values:
        if section not in SECTIONS:
            raise KdloraError(f"unknown config section '{section}'{_suggest(section, SECTIONS)}")
    sections = {name: _build_section(cls, values.get(name) or {}, name) for name, cls in SECTIONS.items()}
    return RunConfig(**sections)


def read_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise KdloraError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise KdloraError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        raise KdloraError(f"config file {path} must map sections (model, data, lora, kd, train) to key: value mappings")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (from command-line flags)."""
    values: dict[str, dict[str, Any]] = {}
    for layer in (read_yaml(path) if path else {}, overrides or {}):
        for section, items in layer.items():
            values.setdefault(section, {}).update(items or {})
    return build_config(values)


def save_config(config: RunConfig, path: str | Path) -> None:
    from kdlora.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
