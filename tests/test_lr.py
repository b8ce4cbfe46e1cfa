"""--lr auto (the range test) and the collapse guard: the probe leaves the run as it found it, so an auto run equals
the same run given the chosen lr; a collapsing run restarts at a lower lr and ends well; kills resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import poison_task_loss, train_argv, write_glue
from safetensors.torch import load_file

import kdlora.lrfind
import kdlora.train
from kdlora.cli import main
from kdlora.config import TrainArgs, build_config
from kdlora.errors import KdloraError
from kdlora.kinds import CLASSIFICATION, REGRESSION
from kdlora.lrfind import Guard, Plan, smooth, suggest


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue-lr"), n_train=96, n_dev=32)


def _argv(glue, model, out, *extra):
    return train_argv(glue, out, "--model", str(model), "--epochs", "2", "--batch-size", "16", "--quiet", *extra)


def _weights(out):
    return load_file(str(out / "merged" / "model.safetensors"))


def test_the_rule_takes_the_lr_halfway_down_the_descent_and_the_prior_loss():
    lrs = [10 ** (-7 + i / 4) for i in range(30)]
    losses = [0.7] * 10 + [0.7 - 0.02 * i for i in range(1, 11)] + [0.5, 0.45, 0.6, 0.4, 0.9, 2.0, 5.0, 9.0, 20, 40]
    s = smooth(losses)
    assert s[0] == losses[0] and len(s) == len(losses) and s[:10] == pytest.approx([0.7] * 10)
    halfway = 0.7 - (0.7 - min(s)) / 2
    i = next(i for i, v in enumerate(s) if v <= halfway)
    assert suggest(lrs, s) == lrs[i] and 10 < i < s.index(min(s))  # on the descent, well before the lowest point
    flat = [0.69] * 25 + [0.7, 0.9, 2.0, 5.0, 9.0]  # never falls, then diverges: well below where it rises
    assert suggest(lrs, smooth(flat)) == lrs[25] / kdlora.lrfind.EDGE_DIVISOR
    noisy = [0.7, 0.62, 0.64, 0.7, 0.68, 0.71, 0.69, 0.7] + losses[8:]  # batch noise below the band: not a descent
    assert suggest(lrs, smooth(noisy), floor=lrs[8]) == suggest(lrs, smooth([0.7] * 8 + losses[8:]), floor=lrs[8])
    # A fall within the plateau's noise (a student cut from a fine-tuned teacher) is no descent either: the raw
    # losses' spread below the band's floor sets the bar, and the rule takes its no-descent branch.
    g = torch.Generator().manual_seed(0)
    jitter = (torch.randn(30, generator=g) * 0.03).tolist()
    shaky = [0.4 + j for j in jitter[:10]] + [0.37 + j / 10 for j in jitter[10:24]] + [0.38, 0.39, 0.45, 0.9, 2.0, 5.0]
    edge = max(i for i, v in enumerate(smooth(shaky)) if v <= sorted(smooth(shaky)[:10])[5] * (1 + kdlora.lrfind.FLAT))
    assert suggest(lrs, smooth(shaky), floor=lrs[10], raw=shaky) == lrs[edge] / kdlora.lrfind.EDGE_DIVISOR
    assert suggest(lrs, smooth(shaky), floor=lrs[10]) != lrs[edge] / kdlora.lrfind.EDGE_DIVISOR  # noise read as a fall
    assert suggest(lrs, s, raw=losses) == suggest(lrs, s)  # a clean descent keeps its halfway point
    assert CLASSIFICATION.prior_loss([0, 0, 1, 1]) == pytest.approx(math.log(2))
    assert REGRESSION.prior_loss([1.0, 3.0]) == 1.0
    with pytest.raises(KdloraError):
        suggest(lrs[:2], [math.nan, math.inf])


def test_lr_takes_a_number_or_auto_and_nothing_else(capsys):
    assert TrainArgs(method="lora").lr == "auto" and TrainArgs(method="kd-fft").lr == 5e-5
    assert build_config({"model": {"name": "m"}, "train": {"lr": "auto", "method": "fft"}}).train.lr == "auto"
    assert build_config({"model": {"name": "m"}, "train": {"lr": "3e-4", "method": "lora"}}).train.lr == 3e-4
    assert main(["train", "--lr", "fast"]) == 2
    assert "lr must be a number or one of auto; got 'fast'" in capsys.readouterr().err


def test_auto_equals_the_chosen_lr_given_by_hand(tmp_path, tiny_bert_dir, glue):
    auto, given = tmp_path / "auto", tmp_path / "given"
    assert main(_argv(glue, tiny_bert_dir, auto, "--lr", "auto")) == 0
    record = json.loads((auto / "metrics.json").read_text())
    lr, probe = record["lr"], record["lr_probe"]
    assert record["lr_chosen_by"] == "auto" and probe["steps"] >= 30 and probe["lr"] == lr
    assert (auto / "lr_find.png").stat().st_size > 0 and json.loads((auto / "lr.json").read_text())["lr"] == lr
    assert main(_argv(glue, tiny_bert_dir, given, "--lr", repr(lr))) == 0
    by_hand = json.loads((given / "metrics.json").read_text())
    assert by_hand["lr_chosen_by"] == "given" and by_hand["train_loss"] == record["train_loss"]  # every step
    a, b = _weights(auto), _weights(given)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise


def test_lr_find_alone_then_train_reuses_the_probe(tmp_path, tiny_bert_dir, glue, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["lr-find", *_argv(glue, tiny_bert_dir, out)[1:]]) == 0
    said = capsys.readouterr().out
    assert "suggested lr: " in said and (out / "lr_find.png").is_file() and not (out / "metrics.json").exists()
    plan = json.loads((out / "lr.json").read_text())

    def no_second_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(kdlora.train, "range_test", no_second_probe)
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "auto")) == 0
    assert json.loads((out / "metrics.json").read_text())["lr"] == plan["lr"]


def test_a_run_killed_in_the_probe_probes_again_and_ends_as_if_left_alone(tmp_path, tiny_bert_dir, glue, monkeypatch):
    out, ref = tmp_path / "run", tmp_path / "ref"
    real = kdlora.train.range_test

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # as a kill after the probe's steps, before its plan was written

    monkeypatch.setattr(kdlora.train, "range_test", killed)
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "auto")) == 130
    assert not (out / "lr.json").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(kdlora.train, "range_test", real)
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "auto")) == 0
    assert main(_argv(glue, tiny_bert_dir, ref, "--lr", "auto")) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert a["lr"] == b["lr"] and a["train_loss"] == b["train_loss"]


def _collapsing(monkeypatch, attempts):
    """Attempts below `attempts` see every epoch judged collapsed: the guard's verdict, without waiting for a tiny
    model to collapse by itself."""
    real = Guard.after_epoch
    seen = {"n": 0}

    def judged(self, epoch, constant, history):
        if self.retry and seen["n"] < attempts:
            seen["n"] += 1
            raise kdlora.lrfind.Collapse("the run collapsed (test)", "test", epoch)
        return real(self, epoch, constant, history)

    monkeypatch.setattr(Guard, "after_epoch", judged)


def test_a_collapsed_run_restarts_from_its_initial_weights_at_a_lower_lr(tmp_path, tiny_bert_dir, glue, monkeypatch):
    out, ref = tmp_path / "run", tmp_path / "ref"
    _collapsing(monkeypatch, attempts=1)
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "8e-3")) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["lr"] == 2e-3 and [(r["from"], r["to"], r["epoch"]) for r in record["lr_restarts"]] == [
        (8e-3, 2e-3, 1)
    ]
    assert len(record["train_loss"]) == 2 * 6  # the restart's history alone
    monkeypatch.undo()
    assert main(_argv(glue, tiny_bert_dir, ref, "--lr", "2e-3")) == 0
    assert json.loads((ref / "metrics.json").read_text())["train_loss"] == record["train_loss"]  # from the start


def test_the_guard_gives_up_after_its_restarts_and_says_so(tmp_path, tiny_bert_dir, glue, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(kdlora.lrfind, "GUARD_MIN_STEPS", 1)
    monkeypatch.setattr(Guard, "after_epoch", _always_collapsed)
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "1e-3")) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert len(record["lr_restarts"]) == kdlora.lrfind.MAX_RESTARTS and record["collapsed"]
    assert record["lr"] == pytest.approx(1e-3 / kdlora.lrfind.RESTART_FACTOR**2)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("the run ended collapsed")


def _always_collapsed(self, epoch, constant, history):
    if self.retry:
        raise kdlora.lrfind.Collapse("the run collapsed (test)", "test", epoch)
    self.collapsed.append(epoch)


def test_a_non_finite_loss_restarts_or_stops(tmp_path, tiny_bert_dir, glue, monkeypatch, capsys):
    calls = poison_task_loss(monkeypatch, at=3)
    out = tmp_path / "retry"
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "1e-3")) == 0
    restarts = json.loads((out / "metrics.json").read_text())["lr_restarts"]
    assert [r["why"] for r in restarts] == ["the loss became nan at step 3"] and restarts[0]["to"] == 2.5e-4
    calls["n"] = 0
    capsys.readouterr()
    assert main(_argv(glue, tiny_bert_dir, tmp_path / "stop", "--lr", "1e-3", "--on-collapse", "stop")) == 2
    assert "loss became nan at step 3" in capsys.readouterr().err


def test_a_run_killed_after_a_restart_resumes_at_the_lowered_lr(tmp_path, tiny_bert_dir, glue, monkeypatch):
    out = tmp_path / "run"
    _collapsing(monkeypatch, attempts=1)
    real_loop = kdlora.train.loop
    calls = {"n": 0}

    def killed_second(parts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in the restarted attempt
        return real_loop(parts)

    monkeypatch.setattr(kdlora.train, "loop", killed_second)
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "8e-3")) == 130
    assert Plan.load(out).lr == 2e-3 and not (out / "checkpoint").exists()
    monkeypatch.undo()
    assert main(_argv(glue, tiny_bert_dir, out, "--lr", "8e-3")) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["lr"] == 2e-3 and len(record["lr_restarts"]) == 1


def test_the_guard_judges_a_constant_at_the_prior_loss_only_when_it_lasts():
    flat = {"train_loss_task": [math.log(2)] * 60}
    falling = {"train_loss_task": [0.3] * 60}

    def guard(retry=False, epochs=4):
        return Guard(prior=math.log(2), key="train_loss_task", steps_per_epoch=60, epochs=epochs, retry=retry)

    slow = guard(retry=True)  # one class after epoch 1, then learning (MiniLM FFT on CoLA): never restarted
    slow.after_epoch(1, ["validation"], flat)
    slow.after_epoch(2, [], falling)
    slow.after_epoch(3, ["validation"], flat)  # after it learnt, a constant epoch is not a collapse
    assert slow.learnt and slow.collapsed == [1]
    spiked = {"train_loss_task": [2.0] * 15 + [math.log(2)] * 45}  # above the prior once: the steps were too large
    early = guard(retry=True)
    early.after_epoch(1, ["validation"], {"train_loss_task": [2.0] * 10})  # too early, and one epoch
    with pytest.raises(kdlora.lrfind.Collapse, match="epochs 1-2"):  # two of four epochs, every one constant
        early.after_epoch(2, ["validation"], spiked)
    weak = guard(retry=True)  # at the prior all along: too little training, not too large a step; only recorded
    weak.after_epoch(1, ["validation"], flat)
    weak.after_epoch(2, ["validation"], flat)
    assert weak.collapsed == [1, 2]
    stays = guard(retry=False, epochs=3)
    for epoch in (1, 2, 3):
        stays.after_epoch(epoch, ["validation"], flat)
    assert stays.collapsed == [1, 2, 3]  # no restart left: recorded, the run says so
    assert guard().after_epoch(1, ["validation"], falling) is None  # one class, but the loss is falling
