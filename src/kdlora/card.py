"""The model card (README.md) saved with a run's merged model and adapter, in the Hugging Face convention: YAML
metadata first (base model, library, tags, metrics), then how the model was made, on which data, and how it scores."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from kdlora.config import DISTILLED, LORA_METHODS, RunConfig
from kdlora.kinds import kind_of
from kdlora.losses import active_terms
from kdlora.tasks import Task


def model_card(cfg: RunConfig, task: Task, metrics: dict[str, Any], source: str, layers: list[int] | None) -> str:
    """The card of one finished run: `source` is the checkpoint the model starts from, `layers` those kept of it."""
    method, m = cfg.train.method, cfg.model
    # The named checkpoint it comes from: a student cut from a fine-tuned teacher comes from the teacher's checkpoint.
    origin = m.name or m.teacher_model or source
    meta = {
        "base_model": origin,
        "library_name": "peft" if method in LORA_METHODS else "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["kdlora", method, *(["lora"] if method in LORA_METHODS else [])]
        + (["knowledge-distillation"] if method in DISTILLED else []),
        "datasets": ["nyu-mll/glue"] if not task.custom else [],
        "metrics": [k for k in metrics.get("epochs", [{}])[0] if k not in ("epoch", "score")],
    }
    how = _how(cfg, metrics, origin, source, layers)
    scores = {k: v for k, v in metrics.items() if k in meta["metrics"] or k == "score"}
    command = shlex.join(["kdlora", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("kdlora", "__main__.py") else None
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {task.name}: {method} of {Path(origin).name}",
        "",
        f"A sequence classifier made with kdlora: {how}."
        + (
            " The run's merged/ holds LoRA folded into the weights; its adapter/, the peft adapter with the head."
            if method in LORA_METHODS
            else ""
        ),
        "",
        "## Data",
        "",
        *_data_lines(cfg, task, metrics),
        f"- {_length(cfg, metrics)}, batch {cfg.train.batch_size}, {_lr(metrics)}",
        "",
        f"## Scores (validation, epoch {metrics.get('best_epoch')} of {len(metrics.get('epochs') or [1])})",
        "",
        "| metric | value |",
        "|---|---:|",
        *[f"| {k} | {_num(v)} |" for k, v in scores.items()],
        "",
        "## Size",
        "",
        f"{metrics.get('total_params', 0):,} parameters; {metrics.get('trainable_params', 0):,} trained"
        + (f" ({metrics.get('lora_params', 0):,} of them LoRA)" if metrics.get("lora_params") else ""),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'classifier = pipeline("text-classification", model="PATH/TO/THIS/DIRECTORY")',
        "```",
        "",
        "## Reproduce",
        "",
        "The resolved config is the run directory's config.yaml: `kdlora train --config config.yaml`."
        + (f" This model was made by `{command}`." if command else ""),
        "",
    ]
    return "\n".join(lines)


def _how(cfg: RunConfig, metrics: dict[str, Any], origin: str, source: str, layers: list[int] | None) -> str:
    """How the model was made: the method on its starting point, and the distillation terms it used."""
    method, lora, kd = cfg.train.method, cfg.lora, cfg.kd
    student = f"encoder layers {','.join(map(str, layers))} of {origin}" if layers else origin
    how = {
        "fft": f"every parameter of {source} fine-tuned",
        "lora": f"LoRA (r={lora.r}, alpha={lora.lora_alpha}) on {source}, with its head",
        "kd-lora": f"LoRA (r={lora.r}, alpha={lora.lora_alpha}) on {student}, with its head, distilled from the "
        f"fine-tuned teacher {metrics.get('teacher')} (score {_num(metrics.get('teacher_score'))}) with "
        f"alpha={kd.alpha} on the task loss and temperature {kd.temperature}",
        "kd-fft": f"every parameter of {student} fine-tuned, distilled from the fine-tuned teacher "
        f"{metrics.get('teacher')} (score {_num(metrics.get('teacher_score'))}) with alpha={kd.alpha} on the task "
        f"loss and temperature {kd.temperature}",
    }[method]
    if method in DISTILLED:
        how += "".join(f", and {t.card(kd, metrics)}" for t in active_terms(kd, True) if t.card is not None)
    return how


def _data_lines(cfg: RunConfig, task: Task, metrics: dict[str, Any]) -> list[str]:
    """The card's data section: where the data came from, its columns and labels, the examples and transfer set."""
    data = cfg.data
    where = (
        f"files {data.train_file} (train) and {data.validation_file} (validation)"
        if data.train_file
        else (f"dataset {data.dataset}" if task.custom else f"GLUE {task.name} ({data.data_dir or data.dataset})")
    )
    labels = kind_of(task).describe(task)
    return [
        f"- {where}; text column(s) {', '.join(task.text_columns)}; labels: {labels}",
        f"- {metrics.get('num_train_examples')} training examples"
        + (
            f" and a transfer set of {metrics['num_transfer_examples']} teacher-labelled rows"
            + (f" from {cfg.kd.unlabeled_file}" if cfg.kd.unlabeled_file else "")
            + (" weighed by the teacher's confidence" if cfg.kd.transfer_weight == "confidence" else "")
            + (
                f", the student seeing them with {cfg.kd.student_noise:.0%} of their pieces swapped (Noisy Student)"
                if cfg.kd.student_noise
                else ""
            )
            + (
                f" ({cfg.kd.augment} variants of each training example"
                + (f", pieces proposed by the masked LM {cfg.kd.augment_mlm}" if cfg.kd.augment_mlm else "")
                + ")"
                if cfg.kd.augment
                else ""
            )
            if metrics.get("num_transfer_examples")
            else ""
        )
        + ", fingerprint sha256 "
        f"{metrics.get('data_fingerprint', '')[:16]}; max length {data.max_length} tokens",
    ]


def _length(cfg: RunConfig, metrics: dict[str, Any]) -> str:
    """How long it trained: epochs, or --max-steps and the epochs they took."""
    if cfg.train.max_steps:
        return f"{cfg.train.max_steps} optimizer steps over {len(metrics.get('epochs') or [])} epochs"
    return f"{cfg.train.epochs} epochs"


def _lr(metrics: dict[str, Any]) -> str:
    """The lr and how it was reached: given, or the range test's (--lr auto), and the collapse guard's restarts."""
    lr, probe = metrics.get("lr"), metrics.get("lr_probe")
    text = f"lr {lr:.3g}" if isinstance(lr, float) else "lr -"
    if probe:
        text += f" (--lr auto: {probe['rule']}, from a {probe['steps']}-step range test"
        text += (
            f", clamped to {probe['band'][0]:g}..{probe['band'][1]:g})" if probe["lr"] != probe["suggestion"] else ")"
        )
    for r in metrics.get("lr_restarts") or []:
        text += f"; restarted at {r['to']:.3g} after {r['why']}"
    return text


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
