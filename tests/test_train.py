"""The one training step (loop.TrainStep) that the loop, bench and the benchmarks share."""

from __future__ import annotations

import torch

from kdlora.config import KDArgs, LoraArgs, TrainArgs
from kdlora.data import Batch
from kdlora.kinds import CLASSIFICATION
from kdlora.loop import TrainStep, build_accelerator, build_optimizer
from kdlora.models import build_model
from kdlora.tasks import get_task


def _step(model_dir, fused: bool = True):
    from transformers import get_constant_schedule

    accelerator = build_accelerator(TrainArgs(method="kd-lora"))
    model, _ = build_model(str(model_dir), get_task("cola"), "kd-lora", LoraArgs(r=2), layers=[0, 1])
    optimizer = build_optimizer(model, 1e-2, 0.01)
    if not fused:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(model, optimizer, get_constant_schedule(optimizer), accelerator, KDArgs(), CLASSIFICATION, 1.0)
    return model.train(), step


def _batch(teacher: float) -> Batch:
    ids = torch.tensor([[2, 6, 7, 8, 3], [2, 9, 10, 3, 0]])
    return Batch(
        inputs={"input_ids": ids, "attention_mask": (ids > 0).long()},
        ids=torch.tensor([0, 1]),
        labels=torch.tensor([1, 0]),
        teacher_logits=torch.full((2, 2), teacher),
    )


def test_a_non_finite_loss_never_reaches_the_weights_and_needs_no_host_sync(tiny_bert_dir):
    model, step = _step(tiny_bert_dir)
    assert step.fused
    parts = step(_batch(0.5))
    assert parts.shape == (3,) and torch.isfinite(parts).all() and not step.bad.item()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert torch.isnan(step(_batch(float("nan")))[0])
    step(_batch(0.5))  # the flag stays set: nothing moves until the loop has read it and stopped
    assert step.bad.item()
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_an_optimizer_that_cannot_skip_on_the_device_skips_after_a_host_check(tiny_bert_dir):
    model, step = _step(tiny_bert_dir, fused=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step(_batch(float("nan")))
    step(_batch(0.5))
    assert step.bad.item()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_groups_restored_from_a_checkpoint_of_a_plain_adamw_are_checked_on_the_host(tiny_bert_dir):
    model, step = _step(tiny_bert_dir)
    saved = step.inner.state_dict()
    for group in saved["param_groups"]:
        group["fused"] = None  # as in a checkpoint written by a plain AdamW
    step.inner.load_state_dict(saved)
    assert not step.fused
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step(_batch(float("nan")))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_attention_relations_read_the_adapted_projections():
    """The hooks read the LoRA-adapted query/key/value outputs (base plus B·A) of the student's last layer and the
    teacher's chosen layer, and the term's gradient reaches the adapters of that layer and of the layers below it."""
    import contextlib

    from conftest import tiny_bert_config
    from peft.tuners.lora import LoraLayer
    from transformers import BertForSequenceClassification

    from kdlora.features import AttentionPlan, FeatureKD
    from kdlora.losses import TERMS, View, attention_relation_loss, objective
    from kdlora.models import add_lora, attention_projections

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config()).eval()
    student = add_lora(BertForSequenceClassification(tiny_bert_config(num_hidden_layers=2)), LoraArgs(r=4))
    for name, p in student.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # peft starts B at 0: let the adapters change the projections
    watched = attention_projections(student, -1)
    assert all(isinstance(m, LoraLayer) for m in watched)  # the adapted module, not its base layer
    features = FeatureKD(teacher, KDArgs(attention_weight=1), None, None, AttentionPlan(layer=3, heads=2), student)
    inputs = {"input_ids": torch.randint(5, 30, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    inputs["attention_mask"][1, 5:] = 0
    student(**inputs)
    accelerator = type("Plain", (), {"autocast": staticmethod(contextlib.nullcontext)})()
    paired = features.pair(Batch(inputs, torch.arange(3), None, None), None, accelerator)
    kd = KDArgs(attention_weight=1)
    view = View(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), None, inputs["attention_mask"], paired)
    relation = objective([t for t in TERMS if t.name == "attention"], view, kd, CLASSIFICATION)["attention"]

    qkv = list(features.student_qkv.outputs)
    expected = attention_relation_loss(qkv, features.teacher_qkv.outputs, inputs["attention_mask"], 2)
    assert torch.allclose(relation, expected) and relation > 0
    relation.backward()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert not torch.allclose(watched[0](x), watched[0].base_layer(x))  # B·A moves the query
    grads = {n: p.grad for n, p in student.named_parameters() if "lora_A" in n}
    last_qkv = [n for n in grads if "layer.1.attention.self." in n]
    below = [n for n in grads if "layer.0." in n]
    assert len(last_qkv) == 3 and below and all(grads[n].abs().sum() > 0 for n in last_qkv + below)
    assert all(grads[n] is None for n in grads if n not in last_qkv + below)  # after q/k/v: nothing to learn here
