"""Evaluation over loaders: the metrics, and a plain warning when a model predicts one constant."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from kdlora.data import Batch
from kdlora.evaluate import constant_notice, evaluate
from kdlora.kinds import Kind, kind_of
from kdlora.tasks import get_task


class Fixed(torch.nn.Module):
    """A model whose logits are given per example id."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _loader(labels: list[float], kind: Kind) -> list[Batch]:
    ids = torch.arange(len(labels))
    y = kind.labels_tensor(labels)
    return [Batch({"input_ids": ids[:, None], "attention_mask": torch.ones(len(ids), 1)}, ids, y, None)]


@pytest.mark.parametrize("task_name", ["cola", "stsb"])
def test_a_model_that_predicts_one_constant_is_named_so(task_name):
    task = get_task(task_name)
    labels = [0, 1, 1, 0] if task.kind == "classification" else [4.0, 0.5, 1.0, 2.5]
    width = task.num_labels
    constant = Fixed(torch.tensor([[0.2, 0.9][:width]] * 4))
    varied = Fixed(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])[:, :width])
    result, same = evaluate(constant, {"validation": _loader(labels, kind_of(task))}, task, Accelerator(cpu=True))
    assert result["score"] == 0.0 and same == ["validation"]
    kind = "value" if task.kind == "regression" else "class"
    assert f"every validation prediction is the same {kind}" in constant_notice(same, task)
    # during training it is what an epoch saw, not yet a verdict: the guard judges collapse
    during = constant_notice(same, task, epoch=1)
    assert during.startswith("epoch 1: every validation") and "collapsed" not in during
    result, same = evaluate(varied, {"validation": _loader(labels, kind_of(task))}, task, Accelerator(cpu=True))
    assert result["score"] > 0 and same == []


def test_a_regressor_that_varies_only_in_the_last_digits_is_constant():
    # a collapsed regressor still depends on its input, by ~1e-5 (a MiniLM-L6 student on STS-B at 5.7e-3): one value
    task = get_task("stsb")
    labels = [4.0, 0.5, 1.0, 2.5]
    nearly = Fixed(torch.tensor([[2.8380], [2.83801], [2.83799], [2.838005]]))
    _, same = evaluate(nearly, {"validation": _loader(labels, kind_of(task))}, task, Accelerator(cpu=True))
    assert same == ["validation"]
    spread = Fixed(torch.tensor([[2.80], [2.85], [2.83], [2.84]]))  # weak, but not one value
    _, same = evaluate(spread, {"validation": _loader(labels, kind_of(task))}, task, Accelerator(cpu=True))
    assert same == []
