"""Token-level distillation from a cached top-k teacher: exact on the K + 1 buckets, equal to the full-vocabulary
divergence when K = V, KL(p, p) = 0, and the chunked form equal to the unchunked one in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from kdlora.losses import (
    IGNORE,
    chunked_lm_kd_sum,
    student_buckets,
    token_divergence,
    topk_kd_sum,
    topk_targets,
)

DIVERGENCES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)]


def _logits(n=7, v=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def _bucketed(logits, indices, temperature):
    """Reference: the full distribution with every token outside `indices` merged into one bucket, by masks."""
    p = F.softmax(logits / temperature, dim=-1)
    top = p.gather(-1, indices)
    return torch.cat([top, (1 - top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)


def _reference(p, q, divergence, beta):
    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if divergence == "forward":
        return kl(p, q)
    if divergence == "reverse":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_k_equals_the_plain_divergence(divergence, beta, temperature):
    teacher, student = _logits(seed=1), _logits(seed=2)
    log_top, idx = topk_targets(teacher, k=teacher.shape[-1], temperature=temperature)
    mask = torch.ones(teacher.shape[0])
    got = topk_kd_sum(student, log_top, idx, mask, temperature, divergence, beta)
    log_p, log_q = F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)
    if divergence == "forward":  # the library's own KL
        ref = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    elif divergence == "reverse":
        ref = F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    else:
        ref = _reference(log_p.exp(), log_q.exp(), divergence, beta).sum()
    torch.testing.assert_close(got, ref * temperature**2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_with_the_tail_as_one_bucket_is_exact_on_the_buckets(divergence, beta, k):
    teacher, student, t = _logits(seed=3), _logits(seed=4), 2.0
    log_top, idx = topk_targets(teacher, k, t)
    got = topk_kd_sum(student, log_top, idx, torch.ones(teacher.shape[0]), t, divergence, beta)
    ref = _reference(_bucketed(teacher, idx, t), _bucketed(student, idx, t), divergence, beta).sum() * t**2
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    if divergence == "forward":  # merging tokens into a bucket can only lose information
        full = F.kl_div(
            F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum"
        )
        assert got <= full * t**2 + 1e-5


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("k", [3, 50])
def test_the_same_distribution_has_zero_divergence_and_finite_gradients(divergence, beta, k):
    logits = _logits(seed=5)
    log_top, idx = topk_targets(logits, k)
    student = logits.clone().requires_grad_()
    loss = topk_kd_sum(student, log_top, idx, torch.ones(logits.shape[0]), 1.0, divergence, beta)
    assert abs(loss.item()) < 1e-5
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_masked_tokens_add_nothing_and_jsd_is_symmetric_at_one_half():
    teacher, student = _logits(seed=6), _logits(seed=7)
    log_top, idx = topk_targets(teacher, 50)
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 1.0])
    kept = topk_kd_sum(student, log_top, idx, mask)
    alone = topk_kd_sum(student[mask.bool()], log_top[mask.bool()], idx[mask.bool()], torch.ones(4))
    torch.testing.assert_close(kept, alone)
    log_p, log_q = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    torch.testing.assert_close(token_divergence(log_p, log_q, "jsd"), token_divergence(log_q, log_p, "jsd"))
    with pytest.raises(ValueError):
        token_divergence(log_p, log_q, "jsd", beta=1.0)


def test_the_student_tail_is_exact_when_the_top_k_hold_nearly_everything():
    student = torch.tensor([[30.0, 0.0, -5.0, -5.0]])
    buckets = student_buckets(student, torch.tensor([[0]]))
    ref = torch.log(F.softmax(student, -1)[0, 1:].sum())
    torch.testing.assert_close(buckets[0, 1], ref)  # 1 - p_top would round to 0 in fp32


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_the_chunked_loss_equals_the_unchunked_one_in_value_and_gradient(chunk):
    g = torch.Generator().manual_seed(8)
    n, h, v, k = 10, 16, 40, 6
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    head = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 4]] = IGNORE  # prompt tokens: no loss
    log_top, idx = topk_targets(torch.randn(n, v, generator=g) * 2, k, 2.0)
    ce, kd = chunked_lm_kd_sum(hidden, head, log_top, idx, labels, temperature=2.0, chunk=chunk)
    (ce + kd).backward()
    grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    logits = hidden @ head.T
    keep = labels != IGNORE
    ref_ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    ref_kd = topk_kd_sum(logits, log_top, idx, keep, 2.0)
    (ref_ce + ref_kd).backward()
    torch.testing.assert_close((ce, kd), (ref_ce, ref_kd), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, (hidden.grad, head.grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_an_empty_teacher_tail_keeps_every_divergence_finite(divergence):
    """A cached tail of -inf (the teacher's top k held all its mass) must not make the reverse KL or JSD infinite."""
    torch.manual_seed(0)
    student = torch.randn(4, 10, requires_grad=True)
    log_top, idx = topk_targets(torch.randn(4, 10), 3)
    empty = torch.full((4,), float("-inf"))
    loss = topk_kd_sum(student, log_top, idx, torch.ones(4), divergence=divergence, teacher_log_tail=empty)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
