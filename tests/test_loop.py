"""The loop's seam: `loop.loop` runs parts built by hand (no config, no run directory), and it reports to
accelerate's trackers under the names metrics.json uses."""

from __future__ import annotations

import torch
from conftest import make_tokenizer, tiny_bert_config

from kdlora.cli import main
from kdlora.config import KDArgs, TrainArgs
from kdlora.data import Example, build_loaders
from kdlora.kinds import CLASSIFICATION
from kdlora.loop import Parts, TrainStep, build_accelerator, build_optimizer, loop, loss_keys
from kdlora.losses import TASK_ONLY
from kdlora.rundir import read_run
from kdlora.tasks import get_task


def test_loop_runs_parts_it_did_not_build(tmp_path):
    from transformers import BertForSequenceClassification, get_constant_schedule

    task, tokenizer = get_task("cola"), make_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    texts = ["the good cat sees a dog .", "the bad dog hates a cat ."]
    train = [Example(i, texts[i % 2], None, 1 - i % 2) for i in range(24)]
    loaders = build_loaders({"train": train, "validation": train[:8]}, tokenizer, task, 32, 8, 8, seed=0)
    accelerator = build_accelerator(TrainArgs(method="fft"))
    optimizer = build_optimizer(model, 1e-3, 0.0)
    scheduler = get_constant_schedule(optimizer)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, loaders.train, scheduler)
    step = TrainStep(model, optimizer, scheduler, accelerator, KDArgs(), CLASSIFICATION, 1.0, terms=TASK_ONLY)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    logged = []
    parts = Parts(
        accelerator, model, step, train_loader, loaders.sampler, loaders.eval, trainable, task, epochs=2,
        total_steps=6, keys=loss_keys(TASK_ONLY), on_log=lambda values, at: logged.append((at, values)),
    )  # fmt: skip
    record = loop(parts)

    assert [e["epoch"] for e in record.progress.epochs] == [1, 2] and record.progress.best_epoch in (1, 2)
    assert list(record.progress.history) == ["train_loss", "train_loss_task"]
    assert len(record.progress.history["train_loss"]) == 6  # 24 rows in batches of 8, twice
    assert all(torch.equal(p.detach().cpu(), record.best[n]) for n, p in trainable.items())  # the best is in place
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    steps = [values for _, values in logged if "train_loss" in values]
    assert [at for at, values in logged if "train_loss" in values] == list(range(1, 7))
    assert all(set(v) == {"train_loss", "train_loss_task", "lr"} for v in steps)
    assert [v["epoch"] for _, v in logged if "eval_score" in v] == [1, 2]


def test_report_to_tensorboard_logs_what_metrics_json_records(tmp_path, tiny_bert_dir, tiny_glue):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--task", "cola"]
    argv += ["--data-dir", str(tiny_glue), "--epochs", "2", "--teacher-epochs", "1", "--quiet"]
    assert main([*argv, "--report-to", "tensorboard", "--output-dir", str(out)]) == 0
    metrics = read_run(out)
    events = list((out / "logs" / "run").glob("events.out.tfevents.*"))  # the run's scalars (hparams lie below)
    assert len(events) == 1 and (out / "teacher" / "logs").is_dir()  # the teacher reports under its own run
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "train_loss_task", "train_loss_kd", "lr", "eval_score", "epoch"} <= tags
    losses = [e.value for e in acc.Scalars("train_loss_kd")]
    assert losses == torch.tensor(metrics["train_loss_kd"]).float().tolist()  # the same values, step by step
    assert [e.value for e in acc.Scalars("eval_score")] == torch.tensor(
        [e["score"] for e in metrics["epochs"]]
    ).float().tolist()
