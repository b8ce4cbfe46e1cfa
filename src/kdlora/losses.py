"""Distillation losses as pure functions, computed in fp32.

Shapes: B = batch size, C = number of classes, S = sequence length, H = hidden width, R = relation heads.
Regression tasks have C = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the class id of a row without a label (a transfer-set row: distilled only), as in transformers


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)), the forward KL, averaged over the batch (each row times its weight
    when `weights` [B] is given: the mean of w·KL, so a down-weighted row weakens the term, not only its share).

    student_logits, teacher_logits: [B, C]. Returns a scalar. The T² factor keeps the gradient scale independent of
    T (Hinton et al. 2015). This is the true KL, so it is 0 when the two distributions agree.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(dim=-1)  # [B]
    return (kl if weights is None else kl * weights).mean() * temperature**2


def regression_kd_loss(
    student_pred: torch.Tensor, teacher_pred: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between the student's and the teacher's predictions (the mean of w·squared error with `weights` [B]).
    student_pred, teacher_pred: [B] or [B, 1]."""
    err = (student_pred.float().reshape(-1) - teacher_pred.float().reshape(-1)) ** 2
    return (err if weights is None else err * weights).mean()


def confidence_weights(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, how much the KD term trusts the teacher: 1 on a labelled row; on a transfer row (label IGNORE) the
    teacher's top-class probability rescaled so that a uniform guess weighs 0 and a sure one 1, (p_max - 1/C) /
    (1 - 1/C). teacher_logits: [B, C] (C ≥ 2); labels: [B]. Returns [B], no gradient."""
    p_max = F.softmax(teacher_logits.float().detach(), dim=-1).max(dim=-1).values
    c = teacher_logits.shape[-1]
    confidence = ((p_max - 1 / c) / (1 - 1 / c)).clamp(0.0, 1.0)
    return torch.where(labels != IGNORE, torch.ones_like(confidence), confidence)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy over [B, C] logits and [B] class ids, or MSE for a [B, 1] regression output and [B] targets,
    averaged over the labelled rows. Rows without a label (class IGNORE, or a NaN target) are left out, and a batch
    with none gives 0, so transfer-set rows shape only the distillation term."""
    if regression:
        target = labels.float().reshape(-1)
        labelled = ~torch.isnan(target)
        per_row = (logits.float().reshape(-1) - target.nan_to_num()) ** 2
    else:
        labelled = labels != IGNORE
        per_row = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    return (per_row * labelled).sum() / labelled.sum().clamp(min=1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    regression: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD-LoRA's objective, α·L_task + (1-α)·L_KD (the paper's Eq. 3). Returns (total, task part, KD part).

    student_logits, teacher_logits: [B, C]; labels: [B]. For regression L_KD is the MSE to the teacher's prediction.
    """
    hard = task_loss(student_logits, labels, regression)
    soft = (
        regression_kd_loss(student_logits, teacher_logits)
        if regression
        else kd_loss(student_logits, teacher_logits, temperature)
    )
    return alpha * hard + (1 - alpha) * soft, hard, soft


def hidden_state_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """Intermediate-layer distillation: the mean over matched layer pairs of a per-token distance between the
    student's hidden states and the teacher's, averaged over the real (unpadded) tokens.

    student[i], teacher[i]: [B, S, H], pair i matched; mask: [B, S], 1 for a real token. kind "mse": the mean squared
    difference per token (TinyBERT's hidden-state loss); "cosine": 1 - cosine similarity per token. Returns a scalar.
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"unknown hidden-state loss {kind!r}")
    real = mask.float()
    total = torch.zeros((), device=real.device)
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.float()
        per_token = ((s - t) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1)  # [B, S]
        total = total + (per_token * real).sum() / real.sum().clamp(min=1)
    return total / max(len(student), 1)


def self_relations(x: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax of scaled dot products of a projection with itself, per relation head (MiniLMv2's self-attention
    relations; with x the queries and keys it would be the attention map itself). x: [B, S, H], H divisible by heads;
    mask: [B, S], 1 for a real token. Returns [B, R, S, S]; padded key positions have probability 0."""
    b, s, h = x.shape
    d = h // heads
    x = x.float().reshape(b, s, heads, d).transpose(1, 2)  # [B, R, S, d]
    scores = x @ x.transpose(-1, -2) / math.sqrt(d)
    keys = mask.bool()[:, None, None, :]
    return F.log_softmax(scores.masked_fill(~keys, torch.finfo(scores.dtype).min), dim=-1)


def attention_relation_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Self-attention relation distillation (MiniLMv2, Wang et al. 2021): for each projection pair (the queries,
    keys and values of one student layer and of one teacher layer), KL(teacher's relations ‖ student's) per query
    token, averaged over heads and real query tokens, then over the pairs.

    student[i]: [B, S, Hs], teacher[i]: [B, S, Ht], both divisible by `heads`, so the widths may differ; mask: [B, S].
    Relations are token by token, so both must see the same tokens. Returns a scalar, 0 when the relations agree.
    """
    keys = mask.bool()[:, None, None, :]
    real = mask.float()
    total = torch.zeros((), device=real.device)
    for s, t in zip(student, teacher, strict=True):
        log_s, log_t = self_relations(s, heads, mask), self_relations(t, heads, mask)
        kl = (log_t.exp() * (log_t - log_s)).masked_fill(~keys, 0.0).sum(-1).mean(1)  # [B, S]
        total = total + (kl * real).sum() / real.sum().clamp(min=1)
    return total / max(len(student), 1)


class View(NamedTuple):
    """What a term reads of one batch: the student's logits [B, C], the labels [B] (IGNORE or NaN on transfer rows),
    the teacher's cached logits [B, C] (None without a teacher), the attention mask [B, S], and the two models'
    paired inner features (features.Paired: hidden states, attention projections) when a feature term is on."""

    logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    features: Any = None


@dataclass(frozen=True)
class Term:
    """One named part of the objective: a pure function of the batch's View (and the run's KD settings, and the task
    kind, kinds.Kind, which gives the task loss and the logit divergence) to a scalar, and its weight in the total.
    Its name keys the loss log (train_loss_<name>), the metrics record and the checkpoint's history.

    on(kd): whether a distilled run computes it; needs: what it reads beyond the student's logits and the labels
    ("logits": the teacher's cached logits; "features": the live teacher beside the student, which --<name>-weight
    turns on and which only a distilled method has); card(kd, metrics): the model card's clause for it."""

    name: str
    fn: Callable[[View, Any, Any], torch.Tensor]
    weight: Callable[[Any], float]
    on: Callable[[Any], bool] = lambda kd: True
    needs: str | None = None
    card: Callable[[Any, dict[str, Any]], str] | None = None


def _task_term(v: View, kd: Any, kind: Any) -> torch.Tensor:
    return kind.task_loss(v.logits, v.labels)


def _kd_term(v: View, kd: Any, kind: Any) -> torch.Tensor:
    weights = confidence_weights(v.teacher_logits, v.labels) if kd.transfer_weight == "confidence" else None
    return kind.kd_loss(v.logits, v.teacher_logits, kd.temperature, weights)


def _hidden_term(v: View, kd: Any, kind: Any) -> torch.Tensor:
    return hidden_state_loss(v.features.student_hidden, v.features.teacher_hidden, v.mask, kd.hidden_loss)


def _attention_term(v: View, kd: Any, kind: Any) -> torch.Tensor:
    return attention_relation_loss(v.features.student_qkv, v.features.teacher_qkv, v.mask, v.features.heads)


# The objective's terms, in the order the total adds them. A new distillation term: a function of the View above and
# one entry here (with its weight's field in config.KDArgs, which gives it a flag).
TERMS: tuple[Term, ...] = (
    Term("task", _task_term, weight=lambda kd: kd.alpha),
    Term("kd", _kd_term, weight=lambda kd: 1 - kd.alpha, needs="logits"),
    Term(
        "hidden",
        _hidden_term,
        weight=lambda kd: kd.hidden_weight,
        on=lambda kd: kd.hidden_weight > 0,
        needs="features",
        card=lambda kd, m: (
            f"its layers' outputs matched to the teacher's layers "
            f"{','.join(map(str, m['hidden_layers']))} ({kd.hidden_loss}, weight {kd.hidden_weight})"
        ),
    ),
    Term(
        "attention",
        _attention_term,
        weight=lambda kd: kd.attention_weight,
        on=lambda kd: kd.attention_weight > 0,
        needs="features",
        card=lambda kd, m: (
            f"its last layer's self-attention relations matched to the teacher's layer "
            f"{m['attention_layer']} ({m['attention_heads']} relation heads, weight {kd.attention_weight})"
        ),
    ),
)
TASK_ONLY = (Term("task", _task_term, weight=lambda kd: 1.0),)  # fft and lora: the task loss alone


def active_terms(kd: Any, distilled: bool) -> tuple[Term, ...]:
    """The terms a run computes: the task loss alone without a teacher, else every term that is on."""
    return tuple(t for t in TERMS if t.on(kd)) if distilled else TASK_ONLY


def objective(terms: Sequence[Term], view: View, kd: Any, kind: Any) -> dict[str, torch.Tensor]:
    """The training objective of every method: each term's value by name, and under "total" their weighted sum
    (KD-LoRA's α·L_task + (1-α)·L_KD with a teacher, plus the weighted feature terms that are on). Scalars. `kind`
    is the task's kinds.Kind (this module imports nothing of kdlora)."""
    parts = {t.name: t.fn(view, kd, kind) for t in terms}
    total = None
    for t in terms:
        part = t.weight(kd) * parts[t.name]
        total = part if total is None else total + part
    return {"total": total, **parts}


# ---------------------------------------------------------------------------------------------------------------------
# Token-level distillation of a causal LM from a cached top-k teacher distribution
#
# Shapes: N = tokens (the completion tokens of a batch, flattened), V = vocabulary, K = cached teacher tokens per
# position, H = hidden width. The teacher's distribution at temperature T is kept as its K most probable tokens'
# log-probabilities and their indices; the rest of the vocabulary is one bucket, the tail, holding the remaining mass.
# The student's distribution is read through the same K + 1 buckets, so the divergence is exact on the buckets and,
# with K = V (no tail), equal to the full-vocabulary one.


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's cached targets: the log-probabilities at temperature T of its k most probable tokens, [N, K]
    (fp32 here; the cache may store them in fp16), and their token ids, [N, K] int64. teacher_logits: [N, V]."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    return values, indices


def log_tail(log_top: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(log_top)) per row, the tail bucket's log-mass, [N]; -inf when the top-k hold everything."""
    top = torch.logsumexp(log_top, dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(top))  # log1p(-exp(top)), exact near 0 and -inf at 0


def student_buckets(student_logits: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probabilities on the teacher's K tokens and on the tail (every other token), [N, K + 1].
    student_logits: [N, V]; indices: [N, K]. The tail is a log-sum-exp over the vocabulary with the K tokens masked
    out, so it stays exact when the K tokens hold nearly all the mass."""
    z = student_logits.float() / temperature
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)  # [N, 1]
    top = z.gather(-1, indices) - log_z
    if indices.shape[-1] == z.shape[-1]:  # K = V: no tail (a log-sum-exp over nothing has a NaN gradient)
        return torch.cat([top, torch.full_like(log_z, float("-inf"))], dim=-1)
    tail = torch.logsumexp(z.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True) - log_z
    return torch.cat([top, tail], dim=-1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row over the last dim, [N]; buckets where p is 0 add 0 (and no NaN gradient: the difference is
    masked before it is multiplied, so an empty tail, -inf on both sides, is a 0 and not -inf - -inf)."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(-1)


def token_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str = "forward", beta: float = 0.5
) -> torch.Tensor:
    """A divergence per token between the teacher's buckets log_p and the student's log_q, both [N, B] log-probs
    over the same buckets (a full vocabulary, or K tokens + the tail). Returns [N].

    forward: KL(teacher ‖ student), the paper's and Hinton's (mean-seeking); reverse: KL(student ‖ teacher)
    (mode-seeking, MiniLLM's objective); jsd: the generalized Jensen-Shannon divergence of GKD,
    β·KL(p ‖ m) + (1-β)·KL(q ‖ m) with m = β·p + (1-β)·q, symmetric at β = 0.5 and 0 only when p = q."""
    if divergence == "forward":
        return _kl_rows(log_p, log_q)
    if divergence == "reverse":
        return _kl_rows(log_q, log_p)
    if divergence == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        return beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)
    raise ValueError(f"unknown divergence {divergence!r}: forward, reverse or jsd")


TAIL_FLOOR = math.log(1e-12)  # the least log-mass a cached teacher tail is read with (see topk_kd_sum)


def topk_kd_sum(
    student_logits: torch.Tensor,
    teacher_log_top: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    teacher_log_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · Σ over the masked-in tokens of the divergence between the teacher's cached top-k distribution (tail as one
    bucket) and the student's on the same buckets. A sum, not a mean: the caller divides by the global count of
    completion tokens, so the loss is the same however the tokens fall into micro-batches and processes.

    student_logits: [N, V]; teacher_log_top, indices: [N, K]; mask: [N], 1 for a completion token;
    teacher_log_tail: [N], the tail's log-mass as cached (default: from the K log-probs). Returns a scalar."""
    log_top = teacher_log_top.float()
    no_tail = indices.shape[-1] == student_logits.shape[-1]  # K = V: rounding must not leave mass in an empty bucket
    if no_tail:
        tail = torch.full_like(log_top[:, 0], float("-inf"))
    else:
        tail = teacher_log_tail.float() if teacher_log_tail is not None else log_tail(log_top)
        # A tail the teacher left empty (its top k held all the mass, to fp precision) is -inf, and the reverse KL
        # and JSD read the student's mass there against it: infinite. A floor of 1e-12 keeps them finite and moves
        # the forward KL by less than that.
        tail = tail.clamp(min=TAIL_FLOOR)
    log_p = torch.cat([log_top, tail[:, None]], dim=-1)
    log_q = student_buckets(student_logits, indices, temperature)
    per_token = token_divergence(log_p, log_q, divergence, beta)
    return (per_token * mask.float()).sum() * temperature**2


def chunked_lm_kd_sum(
    hidden: torch.Tensor,
    head: torch.Tensor,
    teacher_log_top: torch.Tensor | None,
    indices: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    chunk: int = 256,
    teacher_log_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal LM's two loss sums from its last hidden states, a chunk of tokens at a time: (Σ cross-entropy to
    `labels` over the completion tokens, Σ topk_kd_sum). Each chunk's [chunk, V] logits are made from the hidden
    states and the output embedding and recomputed in the backward pass (activation checkpointing), so the [N, V]
    logits are never held whole, in the forward pass or the backward.

    hidden: [N, H] (the positions that predict the next token); head: [V, H] (the LM head's weight); labels: [N], the
    next token id or IGNORE outside the completion; teacher_log_top, indices: [N, K], or None without a teacher (the
    KD sum is then 0); teacher_log_tail: [N], the tail's cached log-mass. Returns two scalars."""

    def part(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *teacher: torch.Tensor):
        logits = h @ w.T
        keep = y != IGNORE
        ce = F.cross_entropy(logits.float(), y.clamp(min=0), reduction="none")
        if not teacher:
            return (ce * keep).sum(), ce.new_zeros(())
        log_top, idx, *tail = teacher
        kd = topk_kd_sum(logits, log_top, idx, keep, temperature, divergence, beta, tail[0] if tail else None)
        return (ce * keep).sum(), kd

    ce_sum = kd_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        s = slice(start, start + chunk)
        teacher = [] if teacher_log_top is None else [teacher_log_top[s], indices[s]]
        if teacher and teacher_log_tail is not None:
            teacher.append(teacher_log_tail[s])
        ce, kd = checkpoint(part, hidden[s], head, labels[s], *teacher, use_reentrant=False)
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    return ce_sum, kd_sum
