import pytest
import torch
import torch.nn.functional as F

from kdlora.config import KDArgs
from kdlora.features import Paired
from kdlora.kinds import CLASSIFICATION, REGRESSION
from kdlora.losses import TASK_ONLY, View, active_terms, distillation_loss, kd_loss, regression_kd_loss, task_loss


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(8, 3, generator=g) * 3,
        torch.randn(8, 3, generator=g) * 3,
        torch.randint(0, 3, (8,), generator=g),
    )


def test_kd_loss_equals_torch_kl_div(logits):
    s, t, _ = logits
    for temp in (1.0, 2.0, 4.0):
        expected = (
            F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction="batchmean", log_target=True)
            * temp**2
        )
        torch.testing.assert_close(kd_loss(s, t, temp), expected)


def test_kd_loss_is_zero_for_identical_distributions(logits):
    s, _, _ = logits
    assert kd_loss(s, s.clone(), 2.0).abs().item() < 1e-6
    assert kd_loss(s, s + 5.0, 2.0).abs().item() < 1e-5  # a shift of the logits leaves the softmax unchanged


def test_kd_loss_is_positive_and_scaled_by_t_squared(logits):
    s, t, _ = logits
    assert kd_loss(s, t, 1.0) > 0
    raw = F.kl_div(F.log_softmax(s / 3.0, -1), F.softmax(t / 3.0, -1), reduction="batchmean")
    torch.testing.assert_close(kd_loss(s, t, 3.0), raw * 9.0)


def test_kd_loss_is_forward_kl_teacher_to_student():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p_t = torch.softmax(t, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s, -1))).sum()
    torch.testing.assert_close(kd_loss(s, t, 1.0), expected)
    assert not torch.allclose(kd_loss(s, t, 1.0), kd_loss(t, s, 1.0))


def test_alpha_one_is_pure_task_loss_and_zero_pure_kd(logits):
    s, t, y = logits
    total, hard, soft = distillation_loss(s, t, y, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(total, F.cross_entropy(s, y))
    total, hard, soft = distillation_loss(s, t, y, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(total, kd_loss(s, t, 2.0))
    total, hard, soft = distillation_loss(s, t, y, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(total, 0.3 * hard + 0.7 * soft)


def test_regression_branch_uses_mse():
    s, t, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [1.0]]), torch.tensor([0.0, 2.0])
    total, hard, soft = distillation_loss(s, t, y, alpha=0.5, regression=True)
    torch.testing.assert_close(hard, torch.tensor((1.0 + 0.0) / 2))
    torch.testing.assert_close(soft, torch.tensor((0.25 + 1.0) / 2))
    torch.testing.assert_close(total, 0.5 * hard + 0.5 * soft)
    torch.testing.assert_close(regression_kd_loss(s, t), soft)
    torch.testing.assert_close(task_loss(s, y, regression=True), hard)


def test_losses_compute_in_fp32():
    s, t = torch.randn(4, 2).bfloat16(), torch.randn(4, 2).bfloat16()
    assert kd_loss(s, t).dtype == torch.float32


def test_objective_is_the_task_loss_alone_without_a_teacher_and_eq3_with_one():
    from kdlora.losses import objective

    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = objective(TASK_ONLY, View(s, y), KDArgs(), CLASSIFICATION)
    assert torch.equal(plain["total"], task_loss(s, y, False)) and list(plain) == ["total", "task"]  # no KD part
    kd = KDArgs(alpha=0.3, temperature=4.0)
    parts = objective(active_terms(kd, True), View(s, y, t), kd, CLASSIFICATION)
    ref = distillation_loss(s, t, y, alpha=0.3, temperature=4.0)
    assert all(torch.equal(parts[k], b) for k, b in zip(("total", "task", "kd"), ref, strict=True))
    assert list(parts) == ["total", "task", "kd"]  # the feature terms are off
    reg = objective(active_terms(KDArgs(), True), View(s[:, :1], y.float(), t[:, :1]), KDArgs(), REGRESSION)
    assert torch.allclose(reg["kd"], regression_kd_loss(s[:, :1], t[:, :1]))


def test_task_loss_leaves_out_rows_without_a_label():
    import torch.nn.functional as F

    from kdlora.losses import IGNORE, task_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(5, 3), torch.tensor([0, IGNORE, 2, IGNORE, 1])
    keep = labels != IGNORE
    assert torch.allclose(task_loss(logits, labels, False), F.cross_entropy(logits[keep], labels[keep]))
    assert task_loss(logits, torch.full((5,), IGNORE), False) == 0
    preds, targets = torch.randn(4, 1), torch.tensor([1.0, float("nan"), 3.0, float("nan")])
    expected = F.mse_loss(preds[[0, 2]].reshape(-1), targets[[0, 2]])
    assert torch.allclose(task_loss(preds, targets, True), expected)


def test_hidden_state_loss_against_a_reference_over_real_tokens():
    from kdlora.losses import hidden_state_loss, objective

    g = torch.Generator().manual_seed(2)
    s = [torch.randn(3, 5, 8, generator=g) for _ in range(2)]
    t = [torch.randn(3, 5, 8, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    real = mask.bool()
    mse = sum(F.mse_loss(a[real], b[real]) for a, b in zip(s, t, strict=True)) / 2
    assert torch.allclose(hidden_state_loss(s, t, mask, "mse"), mse)
    cos = sum((1 - F.cosine_similarity(a[real], b[real], dim=-1)).mean() for a, b in zip(s, t, strict=True)) / 2
    assert torch.allclose(hidden_state_loss(s, t, mask, "cosine"), cos)
    # Padding does not count, and a student that matches its teacher scores 0 (cosine: also when only scaled).
    moved = [a.clone() for a in s]
    moved[0][~real] += 100.0
    assert torch.allclose(hidden_state_loss(moved, t, mask), hidden_state_loss(s, t, mask))
    assert hidden_state_loss(t, t, mask).item() == 0.0
    assert hidden_state_loss([3 * x for x in t], t, mask, "cosine").abs().item() < 1e-6
    with pytest.raises(ValueError):
        hidden_state_loss(s, t, mask, "l1")
    # In the objective it is added with its weight to Eq. 3's total and reported apart.
    logits, teacher, y = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g), torch.tensor([0, 1, 1])
    h = hidden_state_loss(s, t, mask)
    kd = KDArgs(hidden_weight=0.25)
    parts = objective(
        active_terms(kd, True), View(logits, y, teacher, mask, Paired(s, t, None, None, None)), kd, CLASSIFICATION
    )
    base = objective(active_terms(KDArgs(), True), View(logits, y, teacher), KDArgs(), CLASSIFICATION)
    assert torch.allclose(parts["total"], base["total"] + 0.25 * h) and torch.equal(parts["hidden"], h)


def test_attention_relation_loss_against_a_reference_over_real_tokens():
    from kdlora.losses import attention_relation_loss, objective

    g = torch.Generator().manual_seed(3)
    heads = 2
    s = [torch.randn(2, 4, 6, generator=g) for _ in range(3)]  # student width 6 (3 per head)
    t = [torch.randn(2, 4, 10, generator=g) for _ in range(3)]  # teacher width 10: relations bridge widths
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])

    def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Row by row over the real tokens only: KL(teacher ‖ student) of softmax(x x^T / sqrt(d)) per head.
        rows = []
        for i in range(a.shape[0]):
            n = int(mask[i].sum())
            for r in range(heads):
                xs = a[i, :n].reshape(n, heads, -1)[:, r]
                xt = b[i, :n].reshape(n, heads, -1)[:, r]
                ls = F.log_softmax(xs @ xs.T / xs.shape[-1] ** 0.5, dim=-1)
                lt = F.log_softmax(xt @ xt.T / xt.shape[-1] ** 0.5, dim=-1)
                rows.append(F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1))  # [n] per head
        per_token = {}
        for k, row in enumerate(rows):  # mean over heads, then over every real token of the batch
            per_token.setdefault(k // heads, []).append(row)
        tokens = torch.cat([torch.stack(v).mean(0) for v in per_token.values()])
        return tokens.mean()

    expected = sum(reference(a, b) for a, b in zip(s, t, strict=True)) / 3
    assert torch.allclose(attention_relation_loss(s, t, mask, heads), expected, atol=1e-6)
    # Padded tokens change nothing, and a student with the teacher's relations scores 0.
    moved = [a.clone() for a in s]
    moved[0][~mask.bool()] += 100.0
    assert torch.allclose(attention_relation_loss(moved, t, mask, heads), attention_relation_loss(s, t, mask, heads))
    assert attention_relation_loss(t, t, mask, heads).abs().item() < 1e-6
    assert torch.isfinite(attention_relation_loss(s, t, mask, heads))
    # Gradients are finite through padded positions (no -inf - -inf on the way back).
    grad_in = s[0].clone().requires_grad_(True)
    attention_relation_loss([grad_in, *s[1:]], t, mask, heads).backward()
    assert torch.isfinite(grad_in.grad).all() and grad_in.grad[~mask.bool()].abs().sum() == 0
    # In the objective it is added with its weight and reported apart.
    logits, teacher, y = torch.randn(2, 2, generator=g), torch.randn(2, 2, generator=g), torch.tensor([0, 1])
    a = attention_relation_loss(s, t, mask, heads)
    kd = KDArgs(attention_weight=2.0)
    parts = objective(
        active_terms(kd, True), View(logits, y, teacher, mask, Paired(None, None, s, t, heads)), kd, CLASSIFICATION
    )
    base = objective(active_terms(KDArgs(), True), View(logits, y, teacher), KDArgs(), CLASSIFICATION)
    assert torch.allclose(parts["total"], base["total"] + 2.0 * a)
    assert torch.equal(parts["attention"], a) and "hidden" not in parts
