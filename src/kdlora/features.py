"""Feature distillation: the student's inner features matched to the live teacher's, beside the logits.

With --hidden-weight each student layer's output is matched to a teacher layer's (TinyBERT), with a learned width
projection where the widths differ; with --attention-weight the self-attention relations of the student's last layer
are matched to a teacher layer's (MiniLMv2), read by forward hooks on the query/key/value projections. Unlike the
logits, these targets are not cached: the fine-tuned teacher runs beside the student on every batch (eval mode, no
gradients). `FeatureKD.pair` gives the two models' features of a batch to the terms in `losses.TERMS`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kdlora.config import KDArgs, RunConfig
from kdlora.data import Batch
from kdlora.errors import KdloraError
from kdlora.models import (
    attention_projections,
    load_classifier,
    load_saved,
    load_tokenizer,
    model_config,
    resolve_model_path,
)
from kdlora.tasks import Task
from kdlora.teacher import teacher_model_dir


def paired_configs(cfg: RunConfig, task: Task, flag: str) -> tuple[str, Any, str, Any]:
    """The teacher's checkpoint and config, and the student's (a student cut by --student-layers: the teacher's
    architecture with fewer layers), for a loss that compares them token by token: so the student needs the teacher's
    vocabulary. Returns (teacher path, teacher config, student path, student config)."""
    m = cfg.model
    teacher = str(teacher_model_dir(Path(m.teacher), task)) if m.teacher else resolve_model_path(m.teacher_model)
    t_cfg = model_config(teacher, m.trust_remote_code)
    if m.student_layers:
        s_cfg = copy.deepcopy(t_cfg)
        s_cfg.num_hidden_layers = len(m.student_layers)
        return teacher, t_cfg, teacher, s_cfg
    student = resolve_model_path(m.name)
    s_cfg = model_config(student, m.trust_remote_code)
    vocab = [load_tokenizer(p, m.trust_remote_code).get_vocab() for p in (student, teacher)]
    if vocab[0] != vocab[1]:
        raise KdloraError(
            f"{flag} compares the two models token by token: the student needs the teacher's vocabulary, "
            f"and {m.name} has another (a student cut by --student-layers has the teacher's)"
        )
    return teacher, t_cfg, student, s_cfg


@dataclass
class HiddenMap:
    """Intermediate-layer distillation's pairing: the teacher layer (from 1, an index of its hidden_states) whose
    output each student layer's output is matched to, and the two widths."""

    layers: list[int]
    student_width: int
    teacher_width: int


def hidden_layer_map(cfg: RunConfig, task: Task) -> HiddenMap:
    """The pairing of --hidden-layers (default uniform: student layer i of M to teacher layer i*N/M of N). Another
    width is bridged by a learned projection (HiddenProjection)."""
    _, t_cfg, _, s_cfg = paired_configs(cfg, task, "--hidden-weight")
    n, count = t_cfg.num_hidden_layers, s_cfg.num_hidden_layers
    layers = cfg.kd.hidden_layers or [round((i + 1) * n / count) for i in range(count)]
    if len(layers) != count or max(layers) > n:
        raise KdloraError(
            f"--hidden-layers {','.join(map(str, layers))}: give {count} teacher layers, one per student layer, "
            f"each from 1 to {n}"
        )
    return HiddenMap(layers, s_cfg.hidden_size, t_cfg.hidden_size)


class HiddenProjection(torch.nn.Module):
    """A learned linear map per matched layer from the student's width to the teacher's (TinyBERT's W_h), for a
    student narrower or wider than its teacher. It trains with the student, serves only the loss, and is never saved
    with the model."""

    def __init__(self, count: int, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.maps = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width) for _ in range(count))

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(h) for m, h in zip(self.maps, states, strict=True)]


@dataclass
class AttentionPlan:
    """Self-attention relation distillation: the teacher layer (from 1) whose query/key/value relations the student's
    last layer learns, and the relation heads every projection is split into."""

    layer: int
    heads: int


def attention_plan(cfg: RunConfig, task: Task) -> AttentionPlan:
    """--attention-layer and --attention-heads, checked against both models' projections (built on the meta device):
    relations are compared head by head, so the heads must divide every query, key and value width."""
    teacher, t_cfg, student, s_cfg = paired_configs(cfg, task, "--attention-weight")
    kd, n = cfg.kd, t_cfg.num_hidden_layers
    layer, heads = kd.attention_layer or n, kd.attention_heads or t_cfg.num_attention_heads
    if layer > n:
        raise KdloraError(f"--attention-layer {layer}: the teacher has layers 1 to {n}")
    widths = []
    for path, layer_index in ((teacher, layer - 1), (student, s_cfg.num_hidden_layers - 1)):
        model, _ = load_classifier(path, task, cfg.model.trust_remote_code, weights=False)
        widths += [p.out_features for p in attention_projections(model, layer_index)]
    if any(w % heads for w in widths):
        raise KdloraError(
            f"--attention-heads {heads} must divide every query, key and value width of the two models "
            f"({', '.join(map(str, sorted(set(widths))))})"
        )
    return AttentionPlan(layer, heads)


class Capture:
    """The outputs of some modules at their latest forward call, kept by forward hooks."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        for i, module in enumerate(modules):
            module.register_forward_hook(self._keeper(i))

    def _keeper(self, i: int) -> Any:
        def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            self.outputs[i] = output

        return keep


class Paired(NamedTuple):
    """The student's and the teacher's features on one batch, paired for losses.TERMS' feature terms."""

    student_hidden: list[torch.Tensor] | None  # each student layer's output, projected to the teacher's width
    teacher_hidden: list[torch.Tensor] | None  # the teacher layer's output matched to each
    student_qkv: list[torch.Tensor | None] | None  # the student's last layer's query, key, value outputs
    teacher_qkv: list[torch.Tensor | None] | None  # the chosen teacher layer's
    heads: int | None  # relation heads


class FeatureKD:
    """Distillation of the models' inner features beside the logits: each student layer's output against a teacher
    layer's (--hidden-weight) and the self-attention relations of the student's last layer against a teacher layer's
    (--attention-weight, read by forward hooks on the query/key/value projections). The fine-tuned teacher runs beside
    the student on every batch (eval mode, no gradients); a width projection, when one is needed, trains with it."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        kd: KDArgs,
        hidden: HiddenMap | None,
        projection: torch.nn.Module | None,
        attention: AttentionPlan | None,
        student: torch.nn.Module,
    ) -> None:
        self.teacher, self.kind, self.hidden, self.projection = teacher, kd.hidden_loss, hidden, projection
        self.attention = attention
        if attention is not None:
            self.student_qkv = Capture(attention_projections(student, -1))
            self.teacher_qkv = Capture(attention_projections(teacher, attention.layer - 1))

    @classmethod
    def setup(
        cls, cfg: RunConfig, task: Task, teacher_run: Path | None, accelerator: Any, student: torch.nn.Module
    ) -> FeatureKD | None:
        kd = cfg.kd
        if teacher_run is None or not (kd.hidden_weight or kd.attention_weight):
            return None
        teacher, _ = load_saved(teacher_model_dir(teacher_run, task))
        teacher = teacher.requires_grad_(False).eval().to(accelerator.device)
        hidden = hidden_layer_map(cfg, task) if kd.hidden_weight else None
        projection = None
        if hidden is not None and hidden.student_width != hidden.teacher_width:
            projection = HiddenProjection(len(hidden.layers), hidden.student_width, hidden.teacher_width)
            projection = accelerator.prepare(projection.to(accelerator.device))
        attention = attention_plan(cfg, task) if kd.attention_weight else None
        return cls(teacher, kd, hidden, projection, attention, student)

    def trainable(self, accelerator: Any) -> dict[str, torch.nn.Parameter]:
        """The projection's parameters, named for the checkpoint (so a resumed run continues them)."""
        if self.projection is None:
            return {}
        return {f"hidden_projection.{n}": p for n, p in accelerator.unwrap_model(self.projection).named_parameters()}

    def pair(self, batch: Batch, student_states: tuple[torch.Tensor, ...] | None, accelerator: Any) -> Paired:
        """The two models' features on the batch the student has just seen (the teacher runs on it here); None for a
        term that is off."""
        with torch.no_grad(), accelerator.autocast():
            teacher_states = self.teacher(**batch.inputs, output_hidden_states=self.hidden is not None).hidden_states
        student_hidden = teacher_hidden = student_qkv = teacher_qkv = None
        if self.hidden is not None:
            student = list(student_states[1:])  # [0] is the embeddings' output
            student_hidden = self.projection(student) if self.projection is not None else student
            teacher_hidden = [teacher_states[i] for i in self.hidden.layers]
        if self.attention is not None:
            student_qkv, teacher_qkv = self.student_qkv.outputs, self.teacher_qkv.outputs
        heads = self.attention.heads if self.attention is not None else None
        return Paired(student_hidden, teacher_hidden, student_qkv, teacher_qkv, heads)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.hidden is not None:
            projection = sum(p.numel() for p in self.projection.parameters()) if self.projection is not None else 0
            out.update(hidden_layers=self.hidden.layers, hidden_projection_params=projection)
        if self.attention is not None:
            out.update(attention_layer=self.attention.layer, attention_heads=self.attention.heads)
        return out
