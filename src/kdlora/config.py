"""Typed run configuration: defaults < YAML file < command-line flags, validated on construction.

The YAML file mirrors the dataclasses, one mapping per section:

    model: {teacher_model: all-MiniLM-L6-v2, student_layers: [0, 2, 4]}
    data: {task: cola, data_dir: ../shared/glue}
    lora: {r: 8, lora_alpha: 16}
    kd: {alpha: 0.5, temperature: 2.0}
    train: {method: kd-lora, epochs: 3, output_dir: runs/cola}

Each field says everything about itself in its metadata: its help text, its command-line flag (the CLI is generated
from it) and whether it changes results (settings that do not, such as where a run is written, are left out when two
runs' configs are compared).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdlora.errors import KdloraError
from kdlora.io import atomic_write_text, load_yaml, require_file
from kdlora.losses import TERMS
from kdlora.tasks import get_task, glue_name, metric_name

Method = Literal["fft", "lora", "kd-lora", "kd-fft"]
METHODS: tuple[str, ...] = typing.get_args(Method)  # the one list of methods; everything else reads it from here
DISTILLED = ("kd-lora", "kd-fft")  # trained on a teacher's logits: they need a teacher and a student
LORA_METHODS = ("lora", "kd-lora")  # train LoRA matrices and the head; the others train every parameter
# Default learning rates and epochs per method: full fine-tuning wants a small step, LoRA a larger one. The LoRA
# methods adapt every linear layer by default and need more passes; on all-MiniLM-L6-v2 LoRA on every linear layer
# collapses to the majority class on CoLA at 2e-3, while the distilled student, which starts from the fine-tuned
# teacher's layers, is best there (docs/results.md).
DEFAULT_LR: dict[str, float | str] = {"fft": 5e-5, "lora": "auto", "kd-lora": "auto", "kd-fft": 5e-5}
DEFAULT_EPOCHS: dict[str, int] = {"fft": 3, "lora": 5, "kd-lora": 5, "kd-fft": 3}
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")  # accelerate's log_with names
ALL_LINEAR = "all-linear"  # peft's name for every linear layer; kdlora leaves out the head, which trains in full

# Named starting points below a YAML file and flags: per method (a "common" entry for every method).
# paper: the KD-LoRA paper's settings (LoRA on the query and value projections, T = 2, 3 epochs) with the learning
# rate that docs/results.md used for them.
PRESETS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "default": {},
    "paper": {
        "common": {"lora": {"target_modules": None}, "kd": {"temperature": 2.0}, "train": {"epochs": 3}},
        "lora": {"train": {"lr": 2e-3}},
        "kd-lora": {"train": {"lr": 2e-3}},
    },
}


def arg(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    results: bool = True,
    old: tuple[str, ...] = (),
    positional: bool = False,
) -> Any:
    """A config or command field: its default (dataclasses.MISSING: a required flag), one line of help, its flag
    (default --field-name), whether it changes results, its old spellings (still taken, with a notice), or a
    positional argument. The command line is generated from this metadata."""
    metadata = {"help": help, "flag": flag, "results": results, "old": old, "positional": positional}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def command_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of each field of a command's dataclass that is on the command line: those with help."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("help")]


def from_flags(cls: type, given: dict[str, Any], **extra: Any) -> Any:
    """A command's dataclass from the raw values of its flags (command-line strings), each converted to its field's
    type as config values are, or a one-line error naming the flag; `extra` sets fields that are not flags."""
    kwargs = {f.name: _coerce(given[f.name], hint, field_flag(f)) for f, hint in command_fields(cls) if f.name in given}
    return cls(**kwargs, **extra)


@dataclass
class ModelArgs:
    name: str | None = arg(
        None, "model to train (fft, lora) or the student base (kd-lora): local path or hub id", flag="--model"
    )
    teacher: str | None = arg(
        None, "kd-lora: a finished run directory to distil from (fft, lora, kd-lora or kd-fft: its merged model)"
    )
    teacher_model: str | None = arg(
        None, "kd-lora: fine-tune this checkpoint first (--teacher-method), then distil from it"
    )
    student_layers: list[int] | None = arg(
        None, "kd-lora: build the student from these encoder layers of the teacher checkpoint, e.g. 0,2,4"
    )
    student_init: Literal["pretrained", "teacher"] = arg(
        "teacher",
        "teacher | pretrained: take --student-layers from the fine-tuned teacher or from the pretrained model",
    )
    trust_remote_code: bool = arg(False, "let model repositories run their own code")

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


GLUE_DATASETS = ("nyu-mll/glue", "glue")
LM_COLUMNS = ("prompt_column", "completion_column", "messages_column", "text_column")  # a causal LM's data
CUSTOM_ONLY = (
    *LM_COLUMNS,
    "text_columns",
    "id_column",
    "labels",
    "metric",
    "validation_file",
    "test_file",
    "dataset_config",
)


@dataclass
class DataArgs:
    task: str | None = arg(
        None,
        "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; default cola), or a name for your own data",
    )
    data_dir: str | None = arg(
        None,
        "GLUE TSV directory (e.g. ../shared/glue) or a save_to_disk directory; without it `datasets` loads --dataset",
    )
    dataset: str = arg(
        "nyu-mll/glue", "Hugging Face dataset name or save_to_disk directory; another than GLUE is your own data"
    )
    dataset_config: str | None = arg(None, "configuration (subset) of --dataset")
    train_file: str | None = arg(None, "your own training data: .csv, .tsv, .json, .jsonl or .parquet")
    validation_file: str | None = arg(None, "your own validation data, the same format; picks the best epoch")
    test_file: str | None = arg(None, "unlabelled rows to predict after training, into the run's predictions.csv")
    validation_split: str = arg("validation", "the --dataset split to validate on (e.g. test when it has none)")
    text_columns: list[str] | None = arg(
        None, "your data's text column, or two for a pair (default: text, sentence, or sentence1,sentence2)"
    )
    label_column: str = arg("label", "your data's label column: strings, integers, or floats for regression")
    id_column: str | None = arg(None, "your data's id column, unique per split, kept in predictions")
    labels: list[str] | None = arg(None, "the class labels in id order (default: those of the training split, sorted)")
    problem: Literal["auto", "classification", "regression"] = arg(
        "auto", "auto | classification | regression (auto: float labels mean regression)"
    )
    metric: str | None = arg(
        None, "your data's metric: accuracy, macro_f1, f1, mcc, pearson_spearman, pearson, spearman, accuracy_f1"
    )
    prompt_column: str | None = arg(
        None, "a language model's data: the prompt column (with --completion-column; the loss on the completion only)"
    )
    completion_column: str | None = arg(None, "a language model's data: the completion column, the text it learns")
    messages_column: str | None = arg(
        None, "a language model's data: a chat column (a list of role/content turns) rendered with the chat template"
    )
    text_column: str | None = arg(None, "a language model's data: a plain text column, every token learnt")
    max_length: int = arg(128, "truncate inputs to this many tokens; batches are padded to their own longest")
    max_train_samples: int | None = arg(None, "use only the first N training examples")
    label_budget: int | None = arg(
        None,
        "keep the labels of only N training examples, drawn at random within each class (regression: each score "
        "quintile) by --label-seed; --unlabeled-rest distils on the others' text",
    )
    label_seed: int = arg(0, "the seed of the --label-budget draw (the same draw for every method and --seed)")
    max_eval_samples: int | None = arg(None, "use only the first N examples of each evaluation split")

    @property
    def custom(self) -> bool:
        """Whether this is the user's own data rather than a GLUE task."""
        return bool(self.train_file) or self.dataset not in GLUE_DATASETS

    @property
    def generative(self) -> bool:
        """Whether this is a causal language model's data (prompt and completion, chat messages, or text)."""
        return any(getattr(self, n) for n in LM_COLUMNS)

    def __post_init__(self) -> None:
        _require(self.max_length >= 8, f"max_length must be at least 8, got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"{name} must be >= 0, got {value}")
        _require(
            self.label_budget is None or self.label_budget > 0, f"label_budget must be > 0, got {self.label_budget}"
        )
        _require(0 <= self.label_seed < 2**32, f"label_seed must be in 0..{2**32 - 1}, got {self.label_seed}")
        if not self.custom:
            given = [f"--{n.replace('_', '-')}" for n in CUSTOM_ONLY if getattr(self, n)]
            defaults = {"label_column": "label", "problem": "auto", "validation_split": "validation"}
            given += [f"--{n.replace('_', '-')}" for n, d in defaults.items() if getattr(self, n) != d]
            _require(not given, f"{', '.join(given)} describe your own data: add --train-file or --dataset NAME")
            self.task = get_task(self.task or "cola").name
            return
        _require(not self.data_dir, "--data-dir is for GLUE; your own data comes with --train-file or --dataset")
        if self.train_file:
            _require(self.dataset in GLUE_DATASETS, "give --train-file or --dataset, not both")
            _require(bool(self.validation_file), "--train-file needs --validation-file: it picks the best epoch")
        else:
            _require(not self.validation_file, "--validation-file goes with --train-file")
        if self.task:
            _require(
                glue_name(self.task) is None,
                f"'{self.task}' is a GLUE task: name your own data's task otherwise, or drop --train-file/--dataset",
            )
        else:
            self.task = _task_name(self.train_file or self.dataset)
        if self.generative:
            forms = [bool(self.prompt_column or self.completion_column), bool(self.messages_column),
                     bool(self.text_column)]  # fmt: skip
            _require(sum(forms) == 1, "give one form of a language model's data: --prompt-column with "
                     "--completion-column, --messages-column, or --text-column")  # fmt: skip
            _require(
                bool(self.prompt_column) == bool(self.completion_column),
                "--prompt-column and --completion-column go together: the loss is on the completion",
            )
            classifier = [
                n for n in ("text_columns", "id_column", "labels", "metric", "label_budget") if getattr(self, n)
            ]
            _require(not classifier and self.problem == "auto",
                     f"{', '.join('--' + n.replace('_', '-') for n in classifier) or '--problem'} describe a "
                     "classifier's data, not a language model's")  # fmt: skip
        if self.text_columns is not None:
            _require(
                1 <= len(self.text_columns) <= 2, f"text_columns takes one or two columns, got {self.text_columns}"
            )
        if self.labels is not None:
            _require(len(self.labels) >= 2, f"labels needs at least two classes, got {self.labels}")
            _require(len(set(self.labels)) == len(self.labels), f"labels {self.labels} repeats a class")
            _require(all(str(c).strip() for c in self.labels), f"labels {self.labels} has an empty class name")
            _require(self.problem != "regression", "--labels names classes: it does not go with --problem regression")
        if self.metric:
            self.metric = metric_name(self.metric)


def _task_name(source: str) -> str:
    """A task name for the user's data: the file's stem, or its directory's name when the stem says only 'train'."""
    path = Path(source)
    stem = path.name.split(".")[0] if path.suffix else path.name
    if stem.lower() in ("train", "training", "data", "") and path.parent.name:
        stem = path.parent.name
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem.lower()).strip("-") or "custom"

    return f"{name}-data" if glue_name(name) else name


@dataclass
class LoraArgs:
    r: int = arg(8, "LoRA rank r", flag="--rank")
    lora_alpha: int = arg(16, "LoRA scale numerator: the update is scaled by lora_alpha / r")
    lora_dropout: float = arg(0.1, "dropout on the LoRA input")
    target_modules: list[str] | None = arg(
        [ALL_LINEAR],
        "module names or dotted suffixes to adapt; all-linear (default): every linear layer but the head; none: the "
        "architecture's query/value (the paper's)",
    )
    use_dora: bool = arg(False, "DoRA: LoRA on the weights' direction and a trained magnitude (peft use_dora)")
    use_rslora: bool = arg(False, "rsLoRA: scale the update by lora_alpha / sqrt(r) (peft use_rslora)")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora", "orthogonal"] = arg(
        "default", "LoRA initialisation (peft init_lora_weights): default (B = 0), gaussian, pissa, olora, orthogonal"
    )

    def __post_init__(self) -> None:
        _require(self.r > 0, f"rank (r) must be > 0, got {self.r}")
        _require(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        _require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class KDArgs:
    alpha: float = arg(0.5, "weight of the task loss; 1 - alpha weighs the distillation loss")
    temperature: float = arg(1.0, "softmax temperature T of the distillation loss (the paper's is 2)")
    teacher_method: Literal["fft", "lora", "none"] = arg(
        "fft",
        "how --teacher-model is fine-tuned: fft (the paper's), lora (merged; often better with few labels), or none "
        "(a language model used as it is)",
    )
    teacher_lr: float | Literal["auto"] | None = arg(
        None, "learning rate of the teacher trained by --teacher-model (default: its method's: 5e-5 fft, auto lora)"
    )
    teacher_epochs: int | None = arg(None, "epochs of that teacher (default: its method's, 3 for fft, 5 for lora)")
    no_recompute: bool = arg(False, "fail instead of recomputing when no cached teacher logits match", results=False)
    teacher_top_k: int = arg(
        64, "a language model's teacher: the most probable tokens cached per learnt token (the rest is one bucket)"
    )
    divergence: Literal["forward", "reverse", "jsd"] = arg(
        "forward", "a language model's KD divergence: forward KL (the paper's), reverse KL, or generalized JSD"
    )
    jsd_beta: float = arg(0.5, "--divergence jsd: the teacher's weight beta in the mixture (0.5: symmetric)")
    augment: int = arg(
        0,
        "transfer set: this many teacher-labelled variants of each training example (word pieces swapped for their "
        "nearest neighbours in the teacher's input embeddings), distilled only",
    )
    augment_prob: float = arg(0.3, "transfer set: the chance that a word piece is swapped")
    augment_neighbours: int = arg(
        15, "transfer set: a swapped piece becomes one of N candidates (nearest neighbours, or --augment-mlm's top N)"
    )
    augment_mlm: str | None = arg(
        None,
        "transfer set: a masked LM (path or hub id, saved with its masked-LM head) whose top predictions at the "
        "masked pieces replace them, as in TinyBERT, instead of the teacher's embedding neighbours",
    )
    unlabeled_file: str | None = arg(
        None,
        "transfer set: your unlabelled in-domain text, labelled by the teacher and distilled only (.txt, one text a "
        "line, or .csv/.tsv/.jsonl/.json/.parquet with the training data's text columns)",
    )
    unlabeled_rest: bool = arg(
        False, "transfer set: the training rows that --label-budget leaves out, labels dropped, distilled only"
    )
    transfer_ratio: float | None = arg(
        None,
        "transfer rows per labelled row in each epoch, drawn anew every epoch (default: every transfer row in every "
        "epoch), so a large transfer set costs its share and not its size",
    )
    transfer_weight: Literal["uniform", "confidence"] = arg(
        "uniform",
        "how the KD term weighs a transfer row: uniform, or confidence (the teacher's top-class probability, rescaled "
        "so a uniform guess weighs 0 and a sure one 1; labelled rows weigh 1; classification only)",
    )
    student_noise: float = arg(
        0.0,
        "Noisy Student: the chance that a word piece of a transfer row is swapped, in the student's view only, for one "
        "of --augment-neighbours nearest neighbours in the teacher's input embeddings; the teacher labels the clean "
        "text, and the labelled rows stay clean (0: off)",
    )
    hidden_weight: float = arg(
        0.0,
        "weight of intermediate-layer distillation added to the loss (0: off); the teacher then runs beside the "
        "student at every step, so training costs its forward pass and memory",
    )
    hidden_loss: Literal["mse", "cosine"] = arg("mse", "the hidden-state distance: mse (TinyBERT) or cosine")
    hidden_layers: list[int] | None = arg(
        None,
        "the teacher layer (from 1) each student layer's output is matched to (default: uniform, student layer i of "
        "M to teacher layer i*N/M of N)",
    )
    attention_weight: float = arg(
        0.0,
        "weight of self-attention relation distillation (MiniLMv2: the student's last layer's query, key and value "
        "relations matched to a teacher layer's; 0: off); the teacher then runs beside the student at every step",
    )
    attention_layer: int | None = arg(
        None, "the teacher layer (from 1) whose relations the student's last layer learns (default: its last)"
    )
    attention_heads: int | None = arg(
        None,
        "relation heads the projections are split into; must divide every query, key and value width (default: the "
        "teacher's attention heads)",
    )

    def __post_init__(self) -> None:
        _require(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        _require(self.augment >= 0, f"augment must be >= 0, got {self.augment}")
        _require(0 < self.augment_prob <= 1, f"augment_prob must be in (0, 1], got {self.augment_prob}")
        _require(0 <= self.student_noise < 1, f"student_noise must be in [0, 1), got {self.student_noise}")
        _require(self.augment_neighbours >= 1, f"augment_neighbours must be >= 1, got {self.augment_neighbours}")
        _require(not self.augment_mlm or self.augment > 0, "--augment-mlm makes the variants of --augment N: give N")
        _require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _require(self.teacher_top_k >= 1, f"teacher_top_k must be >= 1, got {self.teacher_top_k}")
        _require(0 < self.jsd_beta < 1, f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.teacher_lr is None:
            self.teacher_lr = DEFAULT_LR.get(self.teacher_method, "auto")
        _require(self.teacher_lr == "auto" or self.teacher_lr > 0, f"teacher_lr must be > 0, got {self.teacher_lr}")
        _require(self.teacher_epochs is None or self.teacher_epochs > 0, "teacher_epochs must be > 0")
        _require(self.transfer_ratio is None or self.transfer_ratio > 0, "transfer_ratio must be > 0")
        _require(self.hidden_weight >= 0, f"hidden_weight must be >= 0, got {self.hidden_weight}")
        _require(
            self.hidden_layers is None or (bool(self.hidden_layers) and min(self.hidden_layers) >= 1),
            f"hidden_layers {self.hidden_layers}: give one teacher layer per student layer, counted from 1",
        )
        _require(self.attention_weight >= 0, f"attention_weight must be >= 0, got {self.attention_weight}")
        _require(self.attention_layer is None or self.attention_layer >= 1, "attention_layer counts from 1")
        _require(self.attention_heads is None or self.attention_heads >= 1, "attention_heads must be >= 1")


@dataclass
class TrainArgs:
    method: Method = arg(
        "kd-lora",
        "fft (every parameter) | lora (LoRA + head) | kd-lora (LoRA + head, distilled) | kd-fft (every parameter of "
        "the student, distilled)",
    )
    output_dir: str = arg("runs/kdlora", "the run directory", results=False)
    epochs: int | None = arg(
        None, "passes over the training set (default 3 for fft and kd-fft, 5 for the LoRA methods)"
    )
    max_steps: int | None = arg(
        None,
        "train this many optimizer steps in all, whatever --epochs says (as transformers' max_steps): as many epochs "
        "as they take, the last cut short, each evaluated at its end",
    )
    lr: float | Literal["auto"] | None = arg(
        None,
        "peak learning rate, or auto: a short range test on the run's own model, data and objective picks it "
        "(default auto for lora and kd-lora, 5e-5 for fft and kd-fft)",
    )
    batch_size: int = arg(32, "examples per optimizer step (per process, before accumulation)")
    best_metric: Literal["nll", "exact_match", "agreement", "kl"] = arg(
        "nll", "a language model: the validation metric that picks the best epoch (nll and kl: lower is better)"
    )
    generate_rows: int = arg(
        64, "a language model: greedy completions of the first N validation rows per epoch, scored by exact match"
    )
    max_new_tokens: int = arg(32, "a language model: the most tokens a greedy completion may add")
    eval_batch_size: int = arg(64, "examples per evaluation batch")
    weight_decay: float = arg(0.01, "AdamW weight decay, not applied to biases and LayerNorm")
    warmup_ratio: float = arg(0.06, "fraction of steps with linear warmup")
    grad_accum_steps: int = arg(1, "micro-batches per optimizer step")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 disables)")
    seed: int = arg(42, "fixes data order, dropout, head and LoRA initialisation")
    mixed_precision: Literal["no", "bf16", "fp16"] = arg(
        "no", "no | bf16 | fp16 autocast (bf16 on CUDA is the fast path)"
    )
    gradient_checkpointing: bool = arg(
        False,
        "recompute each layer's activations in the backward pass: less memory, about a third more time",
        results=False,
    )
    overwrite: bool = arg(False, "replace a finished run in --output-dir", results=False)
    resume: bool = arg(
        False, "insist on resuming the unfinished run in --output-dir (the same command resumes anyway)", results=False
    )
    save_steps: int = arg(
        500, "checkpoint every N optimizer steps and at each epoch end (0: epoch ends only)", results=False
    )
    on_collapse: Literal["retry", "stop"] = arg(
        "retry",
        "retry: a run that collapses (one class predicted at the labels' entropy) or whose loss becomes non-finite "
        "restarts from its initial weights at a quarter of the lr, at most twice; stop: it goes on (or stops) as is",
    )
    quiet: bool = arg(False, "no progress bars", results=False)
    report_to: list[str] | None = arg(
        None,
        "report per-step losses, lr and per-epoch metrics to accelerate's trackers: tensorboard, wandb, mlflow, "
        "comet_ml, aim, clearml, dvclive (logs under --output-dir; default none)",
        results=False,
    )

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS[self.method]
        _require(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _require(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        _require(self.lr == "auto" or self.lr > 0, f"lr must be > 0 or auto, got {self.lr}")
        _require(self.batch_size > 0 and self.eval_batch_size > 0, "batch sizes must be > 0")
        _require(self.generate_rows >= 0, f"generate_rows must be >= 0, got {self.generate_rows}")
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _require(self.grad_accum_steps > 0, f"grad_accum_steps must be > 0, got {self.grad_accum_steps}")
        _require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _require(self.save_steps >= 0, f"save_steps must be >= 0, got {self.save_steps}")
        _require(0 <= self.seed < 2**32, f"seed must be in 0..{2**32 - 1}, got {self.seed}")
        if self.report_to is not None:
            self.report_to = [t for t in self.report_to if t and t != "none"] or None
            unknown = sorted(set(self.report_to or ()) - set(TRACKERS))
            _require(not unknown, f"report_to: unknown tracker(s) {', '.join(unknown)}; use {', '.join(TRACKERS)}")


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    kd: KDArgs = field(default_factory=KDArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        m, method = self.model, self.train.method
        if method in DISTILLED:
            if not (m.teacher or m.teacher_model):
                raise KdloraError(
                    f"{method} needs a teacher: --teacher RUN_DIR (a finished run) or --teacher-model NAME"
                )
            if m.teacher and m.teacher_model:
                raise KdloraError("give either --teacher or --teacher-model, not both")
            if not (m.name or m.student_layers):
                raise KdloraError(f"{method} needs a student: --model NAME or --student-layers 0,2,4")
            if m.name and m.student_layers:
                raise KdloraError("give either --model (student base) or --student-layers, not both")
        elif not m.name:
            raise KdloraError(f"{method} needs --model NAME_OR_PATH")
        kd = self.kd
        # The transfer set and the terms of losses.TERMS that read the teacher and are turned on by a weight of
        # their own (--<name>-weight) need a teacher.
        weighted = [f"{t.name}_weight" for t in TERMS if t.needs and f"{t.name}_weight" in KDArgs.__dataclass_fields__]
        distil_only = ["augment", "unlabeled_file", "unlabeled_rest", *weighted]
        if method not in DISTILLED and any(getattr(kd, name) for name in distil_only):
            flags = ", ".join("--" + name.replace("_", "-") for name in distil_only)
            raise KdloraError(f"{flags} distil from a teacher: {method} has none (use kd-lora or kd-fft)")
        if kd.teacher_method == "none" and not self.data.generative:
            raise KdloraError("--teacher-method none uses a language model as it is; a classifier's teacher is "
                              "fine-tuned first (fft or lora)")  # fmt: skip
        if self.data.generative:
            extra = [n for n in ("augment", "augment_mlm", "unlabeled_file", "unlabeled_rest", "transfer_ratio",
                                 "student_noise", "hidden_weight", "attention_weight") if getattr(kd, n)]  # fmt: skip
            if extra:
                raise KdloraError(f"{', '.join('--' + n.replace('_', '-') for n in extra)} distil a classifier; a "
                                  "language model is distilled token by token on its own data")  # fmt: skip
        if kd.student_noise and not (kd.augment or kd.unlabeled_file or kd.unlabeled_rest):
            raise KdloraError("--student-noise swaps pieces of the transfer rows: give a transfer set "
                              "(--unlabeled-file, --unlabeled-rest or --augment)")  # fmt: skip
        if kd.transfer_weight != "uniform" and not (kd.augment or kd.unlabeled_file or kd.unlabeled_rest):
            raise KdloraError(f"--transfer-weight {kd.transfer_weight} weighs transfer rows: give a transfer set "
                              "(--unlabeled-file, --unlabeled-rest or --augment)")  # fmt: skip
        if kd.unlabeled_rest and not self.data.label_budget:
            raise KdloraError("--unlabeled-rest distils on the rows that --label-budget N leaves out: give N")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "lora": LoraArgs, "kd": KDArgs, "train": TrainArgs}


@dataclass(frozen=True)
class Flag:
    """A command-line flag generated from a config field."""

    flag: str  # e.g. --rank
    section: str  # e.g. lora
    name: str  # e.g. r
    help: str
    is_bool: bool  # a bool field is a switch: the flag sets it true


def flags() -> dict[str, Flag]:
    """Every config field's flag, in section order."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            out[flag] = Flag(flag, section, f.name, f.metadata.get("help", ""), hints[f.name] is bool)
    return out


def comparable(config: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as nested dicts without the settings that leave results alone (metadata results=False), and
    without the sections that its method does not read (LoRA settings of an fft run, KD settings of a lora run)."""
    d = config.to_dict() if isinstance(config, RunConfig) else copy.deepcopy(config)
    method = d.get("train", {}).get("method")
    if method in METHODS:
        if method not in LORA_METHODS:
            d.pop("lora", None)
        if method not in DISTILLED:
            d.pop("kd", None)
    if not d.get("model", {}).get("student_layers"):
        d.get("model", {}).pop("student_init", None)  # it says where --student-layers come from
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("results", True):
                d.get(section, {}).pop(f.name, None)
    return d


def layered(*layers: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Merge config sections from the lowest layer up (a preset, a YAML file, flags): later layers win per key."""
    values: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, items in (layer or {}).items():
            values.setdefault(section, {}).update(copy.deepcopy(items) or {})
    return values


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
        if len(inner) == 1:
            return _coerce(value, inner[0], where)
        errors = []
        for option in inner:  # e.g. float | Literal["auto"]: the first that takes the value
            try:
                return _coerce(value, option, where)
            except KdloraError as exc:
                errors.append(str(exc))
        if float in inner and "finite" in errors[inner.index(float)]:
            raise KdloraError(errors[inner.index(float)])  # a number, but inf or nan: say that
        kinds = [("a number" if a is float else "one of " + ", ".join(map(str, typing.get_args(a)))) for a in inner]
        raise KdloraError(f"{where} must be {' or '.join(kinds)}; got {value!r}")
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
        try:
            return [_coerce(item.strip() if isinstance(item, str) else item, args[0], where) for item in items]
        except KdloraError:
            if isinstance(value, str) and args[0] in (int, float):  # a flag's comma-separated list
                kind = "integers" if args[0] is int else "numbers"
                raise KdloraError(f"{where} must be comma-separated {kind}, got {value!r}") from None
            raise
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise KdloraError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(number):  # inf and nan only break a later step (or train a model of NaNs)
            raise KdloraError(f"{where} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise KdloraError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} for {where}")


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise KdloraError(f"unknown config key '{section}.{key}'{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def preset_values(name: str | None, method: str | None) -> dict[str, dict[str, Any]]:
    """The sections a named preset sets for `method` (default kd-lora): its common entry, then the method's own."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise KdloraError(f"unknown preset '{name}': the presets are {', '.join(PRESETS)}{_suggest(name, PRESETS)}")
    preset = PRESETS[name]
    return layered(preset.get("common"), preset.get(method or TrainArgs.method))


def build_config(values: dict[str, dict[str, Any]], preset: str | None = None) -> RunConfig:
    """Build a validated RunConfig from nested {section: {key: value}} values on top of a named preset."""
    values = layered(preset_values(preset, (values.get("train") or {}).get("method")), values)
    for section in values:
        if section not in SECTIONS:
            raise KdloraError(f"unknown config section '{section}'{_suggest(section, SECTIONS)}")
    sections = {name: build_section(cls, values.get(name) or {}, name) for name, cls in SECTIONS.items()}
    return RunConfig(**sections)


def read_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    path = require_file(path, "config file ")
    data = load_yaml(path, "config file") or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        raise KdloraError(f"config file {path} must map sections (model, data, lora, kd, train) to key: value mappings")
    return data


def load_config(
    path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None, preset: str | None = None
) -> RunConfig:
    """Defaults, then a named preset, then the YAML file at `path`, then `overrides` (from command-line flags)."""
    return build_config(layered(read_yaml(path) if path else {}, overrides), preset)


def save_config(config: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
