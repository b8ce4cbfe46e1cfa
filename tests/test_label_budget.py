"""Few labels and much text: the stratified label draw, the unlabelled rest as transfer set, any finished run as the
teacher, and `kdlora compare --label-budget` with its learning curve."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdlora.cli import main
from kdlora.config import DataArgs
from kdlora.data import Collator, Example, TokenizedDataset, label_draw, load_splits, load_task, unlabeled_rest
from kdlora.errors import KdloraError
from kdlora.kinds import CLASSIFICATION
from kdlora.losses import IGNORE, task_loss
from kdlora.rundir import merged_dir, read_run, student_base_dir
from kdlora.tasks import get_task


def _examples(labels):
    return [Example(i, f"text {i}", None, y) for i, y in enumerate(labels)]


def test_the_draw_is_seeded_stratified_and_keeps_every_class():
    task = get_task("mnli")  # three classes
    labels = [0] * 700 + [1] * 250 + [2] * 50
    examples = _examples(labels)
    kept, rest = label_draw(examples, task, 100, seed=3)
    assert len(kept) == 100 and len(rest) == 900 and {e.id for e in kept}.isdisjoint(e.id for e in rest)
    assert Counter(e.label for e in kept) == {0: 70, 1: 25, 2: 5}  # in proportion
    assert [e.id for e in kept] == sorted(e.id for e in kept)  # the split's order is kept
    assert label_draw(examples, task, 100, seed=3) == (kept, rest)  # the seed fixes the draw
    assert label_draw(examples, task, 100, seed=4)[0] != kept
    # A class too rare for its share still keeps one example.
    few, _ = label_draw(_examples([0] * 997 + [1] * 2 + [2]), task, 10, seed=0)
    assert Counter(e.label for e in few) == {0: 8, 1: 1, 2: 1}
    with pytest.raises(KdloraError, match="keeps every one"):
        label_draw(examples, task, 1000, seed=0)
    with pytest.raises(KdloraError, match="one example of each of the 3 classes"):
        label_draw(examples, task, 2, seed=0)


def test_a_regression_draw_spans_the_scores():
    task = get_task("stsb")
    examples = [Example(i, "t", None, i / 100) for i in range(500)]
    kept, _ = label_draw(examples, task, 50, seed=0)
    quintiles = Counter(int(e.label // 1.0) for e in kept)  # scores 0-5: one quintile per unit
    assert len(kept) == 50 and all(quintiles[q] == 10 for q in range(5))


def test_the_rest_carries_no_label_into_the_task_loss(tiny_glue, tmp_path):
    from conftest import make_tokenizer

    args = DataArgs(task="cola", data_dir=str(tiny_glue), label_budget=24, label_seed=1)
    task = load_task(args)
    labelled = load_splits(args, ["train"])["train"]
    rest = unlabeled_rest(args, task)
    assert len(labelled) == 24 and len(rest) == 72 and all(e.label is None for e in rest)
    assert {e.id for e in labelled}.isdisjoint(e.id for e in rest)
    # A batch mixing both: the rest's rows are masked out of the task loss, which is the labelled rows' alone.
    tokenizer = make_tokenizer(tmp_path / "tok")
    rows = labelled[:4] + rest[:4]
    dataset = TokenizedDataset(rows, tokenizer, 32, teacher_logits=torch.randn(8, 2))
    batch = Collator(tokenizer, CLASSIFICATION)([dataset[i] for i in range(8)])
    assert torch.equal(batch.labels[4:], torch.full((4,), IGNORE))
    logits = torch.randn(8, 2)
    expected = torch.nn.functional.cross_entropy(logits[:4], torch.tensor([e.label for e in labelled[:4]]))
    assert torch.allclose(task_loss(logits, batch.labels, regression=False), expected)
    with pytest.raises(KdloraError, match="label_budget must be > 0"):
        DataArgs(task="cola", label_budget=0)


def test_unlabeled_rest_needs_a_budget_and_a_teacher(tiny_bert_dir, tiny_glue, tmp_path, capsys):
    base = ["train", "--task", "cola", "--data-dir", str(tiny_glue), "--output-dir", str(tmp_path / "o")]
    assert (
        main([*base, "--method", "lora", "--model", str(tiny_bert_dir), "--unlabeled-rest", "--label-budget", "9"]) == 2
    )
    assert "distil from a teacher: lora has none" in capsys.readouterr().err
    argv = [*base, "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--unlabeled-rest"]
    assert main(argv) == 2
    assert "--unlabeled-rest distils on the rows that --label-budget N leaves out" in capsys.readouterr().err


def test_a_lora_run_teaches_and_its_merged_layers_make_the_student(tiny_bert_dir, tiny_glue, tmp_path):
    common = ["--task", "cola", "--data-dir", str(tiny_glue), "--epochs", "1", "--quiet"]
    teacher = tmp_path / "lora"
    assert (
        main(["train", "--method", "lora", "--model", str(tiny_bert_dir), *common, "--output-dir", str(teacher)]) == 0
    )
    student = tmp_path / "kd"
    argv = ["train", "--method", "kd-lora", "--teacher", str(teacher), "--student-layers", "0,2", *common]
    assert main([*argv, "--label-budget", "30", "--unlabeled-rest", "--output-dir", str(student)]) == 0
    m = read_run(student)
    assert m["teacher"] == str(teacher) and m["teacher_score"] == read_run(teacher)["score"]
    assert m["num_train_examples"] == 30 and m["num_transfer_examples"] == 66
    assert m["label_budget"]["budget"] == 30 and sum(m["label_budget"]["counts"].values()) == 30
    # The student's layers are the lora teacher's merged layers 0 and 2 (LoRA folded in), not the pretrained ones.
    merged = load_file(merged_dir(teacher) / "model.safetensors")
    base = load_file(student_base_dir(student) / "model.safetensors")
    pretrained = load_file(tiny_bert_dir / "model.safetensors")
    key = "encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(base["bert." + key.format(1)], merged["bert." + key.format(2)])
    assert not torch.equal(merged["bert." + key.format(2)], pretrained[key.format(2)])


def test_teacher_method_lora_trains_a_lora_teacher_first(tiny_bert_dir, tiny_glue, tmp_path):
    out = tmp_path / "kd"
    argv = ["train", "--teacher-model", str(tiny_bert_dir), "--teacher-method", "lora", "--student-layers", "0,2"]
    argv += ["--task", "cola", "--data-dir", str(tiny_glue), "--epochs", "1", "--teacher-epochs", "1", "--quiet"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    teacher = yaml.safe_load((out / "teacher" / "config.yaml").read_text())
    assert teacher["train"]["method"] == "lora" and teacher["train"]["lr"] == "auto"  # the lora default


def test_compare_label_budget_runs_five_arms_from_the_best_teacher(tiny_bert_dir, tiny_glue, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--tasks", "cola", "--seeds", "1", "--teacher-model", str(tiny_bert_dir)]
    argv += ["--student-layers", "0,2", "--data-dir", str(tiny_glue), "--output-dir", str(out), "--epochs", "1"]
    argv += ["--label-budget", "24", "--teacher-arm", "best", "--quiet"]
    assert main(argv) == 0
    cell = out / "cola" / "budget-24" / "seed-1"
    runs = {d.name: read_run(d) for d in cell.iterdir()}
    assert set(runs) == {"fft", "lora", "student", "kd-lora", "kd-lora-unlabeled"} and all(runs.values())
    best = max(("fft", "lora"), key=lambda a: runs[a]["score"])
    configs = {a: yaml.safe_load((cell / a / "config.yaml").read_text()) for a in runs}
    assert all(configs[a]["model"]["teacher"] == str(cell / best) for a in ("student", "kd-lora", "kd-lora-unlabeled"))
    assert configs["student"]["kd"]["alpha"] == 1.0 and configs["kd-lora-unlabeled"]["kd"]["unlabeled_rest"]
    assert {c["data"]["label_budget"] for c in configs.values()} == {24}
    assert runs["kd-lora-unlabeled"]["num_transfer_examples"] == 72 and runs["kd-lora"]["num_transfer_examples"] == 0
    # The same labelled rows for every arm of a seed.
    assert len({runs[a]["data_fingerprint"] for a in ("fft", "lora", "student", "kd-lora")}) == 1
    table = (out / "label_budget.md").read_text()
    assert "| cola | 24 |" in table and (out / "label_budget.png").is_file() and not (out / "report.md").exists()
    capsys.readouterr()
    assert main(argv) == 0  # all reused
    assert capsys.readouterr().out.count("reusing the finished run") == 5


def test_the_curves_mean_row_names_its_tasks_when_it_covers_fewer_than_the_table():
    from kdlora.curve import CURVE_ARMS, curve_md, curve_rows

    arms = list(CURVE_ARMS)
    cells = {(t, b, a): [10.0 * i + j for j in range(3)] for i, t in enumerate(("cola", "mrpc", "stsb"), 1)
             for b in (500, 1000) for a in arms}  # fmt: skip
    del cells["stsb", 500, "lora"]  # one arm of one task missing at 500: its mean is over cola and mrpc only
    rows = curve_rows(cells)
    means = {r["budget"]: r for r in rows if r["task"] == "mean"}
    assert means[500]["tasks"] == "cola,mrpc" and means[500]["fft"] == pytest.approx(16.0)
    assert means[1000]["fft"] == pytest.approx(21.0)
    table = curve_md(rows, arms)
    assert any(line.startswith("| mean of cola, mrpc | 500 |") for line in table)
    assert any(line.startswith("| mean | 1000 |") for line in table)
    assert any(line.startswith("| stsb | 500 |") and "| — |" in line for line in table)


def test_transfer_ratio_draws_transfer_rows_per_epoch_and_keeps_every_labelled_row():
    from kdlora.data import LengthGroupedBatchSampler

    lengths = [(i * 7) % 13 + 1 for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, 16, seed=1, fixed=100, sampled=200)
    assert len(sampler) == 19 and sampler.rows == 300  # ceil(300 / 16) batches: the schedule's steps per epoch
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        rows = [i for batch in sampler for i in batch]
        assert len(rows) == len(set(rows)) == 300 and set(range(100)) <= set(rows)
        epochs.append(set(rows) - set(range(100)))
    assert epochs[0] != epochs[1] and all(len(e) == 200 and min(e) >= 100 for e in epochs)
    sampler.set_epoch(1)
    assert {i for b in sampler for i in b} - set(range(100)) == epochs[1]  # the draw depends on (seed, epoch) only
    plain = LengthGroupedBatchSampler(lengths, 16, seed=1)  # without a ratio: every row, the order as before
    assert len(plain) == 63 and sorted(i for b in plain for i in b) == list(range(1000))


def test_a_run_with_transfer_ratio_trains_its_share_of_the_rest(tiny_bert_dir, tiny_glue, tmp_path):
    out = tmp_path / "kd"
    argv = ["train", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--task", "cola", "--quiet"]
    argv += ["--data-dir", str(tiny_glue), "--epochs", "2", "--teacher-epochs", "1", "--batch-size", "8"]
    argv += ["--label-budget", "24", "--unlabeled-rest", "--transfer-ratio", "1", "--output-dir", str(out)]
    argv += ["--transfer-weight", "confidence"]  # the transfer rows weighed by the teacher's confidence
    assert main(argv) == 0
    m = read_run(out)
    assert m["num_transfer_examples"] == 72 and m["rows_per_epoch"] == 48
    assert len(m["train_loss"]) == 2 * 6  # 48 rows in batches of 8, twice


def test_confidence_weights_trust_a_sure_teacher_and_drop_a_guess():
    from kdlora.config import KDArgs
    from kdlora.losses import View, active_terms, confidence_weights, kd_loss, objective

    teacher = torch.tensor([[0.0, 0.0], [9.0, -9.0], [1.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([IGNORE, IGNORE, IGNORE, 1])
    w = confidence_weights(teacher, labels)
    assert w[0] == 0.0 and w[1] > 0.999 and 0.0 < w[2] < 1.0 and w[3] == 1.0  # a labelled row is always trusted
    assert w[2] == pytest.approx(2 * torch.softmax(teacher[2], -1).max().item() - 1)
    student = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert kd_loss(student, teacher, 2.0, torch.ones(4)) == kd_loss(student, teacher, 2.0)
    per_row = torch.stack([kd_loss(student[i : i + 1], teacher[i : i + 1], 2.0) for i in range(4)])
    assert kd_loss(student, teacher, 2.0, w) == pytest.approx(float((per_row * w).mean()), rel=1e-6)
    # Wired into the objective by --transfer-weight; uniform leaves the KD term as it was.
    view = View(student, labels, teacher)
    for name, weights in (("confidence", w), ("uniform", None)):
        kd = KDArgs(transfer_weight=name, unlabeled_rest=True)
        got = objective(active_terms(kd, True), view, kd, CLASSIFICATION)["kd"]
        assert got == pytest.approx(float(kd_loss(student, teacher, kd.temperature, weights)), rel=1e-6)


def test_transfer_weight_needs_a_transfer_set_and_a_classifier(tiny_bert_dir, tiny_glue, tmp_path, capsys):
    base = ["train", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--data-dir", str(tiny_glue),
            "--output-dir", str(tmp_path / "o"), "--transfer-weight", "confidence"]  # fmt: skip
    assert main([*base, "--task", "cola"]) == 2
    assert "weighs transfer rows: give a transfer set" in capsys.readouterr().err
    assert main([*base, "--task", "stsb", "--label-budget", "20", "--unlabeled-rest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reads a teacher's class probabilities: stsb is a regression task" in err[0]
    assert not (tmp_path / "o").exists()


def test_student_noise_swaps_the_transfer_rows_for_the_student_and_the_teacher_labels_them_clean(
    tiny_bert_dir, tiny_glue, tmp_path, capsys
):
    from kdlora.teacher import noisy_view

    common = ["--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--task", "cola", "--quiet"]
    common += ["--data-dir", str(tiny_glue), "--epochs", "1", "--teacher-epochs", "1", "--label-budget", "24"]
    out = tmp_path / "noisy"
    assert main(["train", *common, "--student-noise", "0.5", "--output-dir", str(out)]) == 2  # no transfer set
    assert "--student-noise swaps pieces of the transfer rows: give a transfer set" in capsys.readouterr().err
    assert main(["train", *common, "--unlabeled-rest", "--student-noise", "0.5", "--output-dir", str(out)]) == 0
    m = read_run(out)
    assert m["num_train_examples"] == 24 and m["num_transfer_examples"] == 72 and not m["teacher_logits_cached"]
    # The teacher labelled the clean rows: a run without noise on the same rows finds their logits in its cache.
    clean = tmp_path / "clean"
    argv = ["train", "--teacher", str(out / "teacher"), *common[2:], "--unlabeled-rest", "--output-dir", str(clean)]
    assert main(argv) == 0
    assert read_run(clean)["teacher_logits_cached"]
    # The view: labelled rows untouched, transfer rows swapped under their own ids and without labels, seeded.
    args = DataArgs(task="cola", data_dir=str(tiny_glue), label_budget=24, label_seed=1)
    task = load_task(args)
    rows = load_splits(args, ["train"])["train"] + unlabeled_rest(args, task)
    view = noisy_view(out / "teacher", rows, task, 24, 0.5, 15, seed=1)
    assert view[:24] == rows[:24] and [e.id for e in view] == [e.id for e in rows]
    assert all(e.label is None for e in view[24:])
    assert sum(v.text_a != r.text_a for v, r in zip(view[24:], rows[24:], strict=True)) > 36
    assert noisy_view(out / "teacher", rows, task, 24, 0.5, 15, seed=1) == view


def test_max_steps_sets_the_schedule_in_optimizer_steps_and_leaves_the_teacher_its_epochs(
    tiny_bert_dir, tiny_glue, tmp_path
):
    out = tmp_path / "kd"
    argv = ["train", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--task", "cola", "--quiet"]
    argv += ["--data-dir", str(tiny_glue), "--epochs", "5", "--teacher-epochs", "1", "--batch-size", "8"]
    assert main([*argv, "--max-steps", "15", "--output-dir", str(out)]) == 0  # 96 rows: 12 steps an epoch
    m = read_run(out)
    assert len(m["train_loss"]) == m["optimizer_steps"] == 15
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]  # the second epoch stopped at its third step, then evaluated
    assert "15 optimizer steps over 2 epochs" in (out / "merged" / "README.md").read_text()
    assert len(read_run(out / "teacher")["train_loss"]) == 12  # --teacher-epochs 1, not the student's 15 steps
