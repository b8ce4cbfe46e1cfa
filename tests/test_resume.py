"""A run killed with SIGKILL and started again ends exactly as if left alone; a bad loss keeps the last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import poison_task_loss, train_argv, write_glue

from kdlora.cli import main


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue-resume"), n_train=480, n_dev=32)


def _cmd(glue, model, out, *extra):
    argv = train_argv(glue, out, "--model", str(model), "--epochs", "3", "--batch-size", "8", "--quiet", *extra)
    return [sys.executable, "-m", "kdlora", *argv]


def _progress(out):
    try:
        return json.loads((out / "checkpoint" / "progress.json").read_text())
    except (OSError, ValueError):
        return None  # not written yet, or being swapped in


def _run_and_kill(cmd, out, when):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        progress = _progress(out)
        if progress and when(progress):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return progress
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the run ended before the kill point: {proc.stderr.read().decode()[-500:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir, glue):
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(_cmd(glue, tiny_bert_dir, out), check=True)
    return json.loads((out / "metrics.json").read_text())


KILL_POINTS = {
    # mid-epoch, right after a step checkpoint in the first epoch
    "mid-epoch": (["--save-steps", "4"], lambda p: p["epoch"] == 0 and p["batches_done"] >= 8),
    # after the first epoch's end checkpoint (no step checkpoints), while the second epoch runs
    "epoch-end": (["--save-steps", "0"], lambda p: p["epoch"] == 1),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_bert_dir, glue, reference, point):
    extra, when = KILL_POINTS[point]
    out = tmp_path / "run"
    killed_at = _run_and_kill(_cmd(glue, tiny_bert_dir, out, *extra), out, when)
    assert not (out / "metrics.json").exists()  # nothing half-written looks finished
    done = subprocess.run(_cmd(glue, tiny_bert_dir, out, *extra), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out} at epoch {killed_at['epoch'] + 1}" in done.stdout
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["train_loss"] == reference["train_loss"]  # bitwise: every step, before and after the kill
    assert resumed["epochs"] == reference["epochs"] and resumed["score"] == reference["score"]
    assert not (out / "checkpoint").exists()


def test_a_kd_lora_run_killed_while_its_teacher_trains_resumes_the_teacher(tmp_path, tiny_bert_dir, glue):
    out = tmp_path / "run"
    distil = ["--method", "kd-lora", "--teacher-model", str(tiny_bert_dir), "--save-steps", "4"]
    cmd = _cmd(glue, tiny_bert_dir, out, *distil)
    killed_at = _run_and_kill(cmd, out / "teacher", lambda p: p["batches_done"] >= 8)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["teacher"]  # the student had not begun
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out / 'teacher'} at epoch {killed_at['epoch'] + 1}" in done.stdout
    assert json.loads((out / "metrics.json").read_text())["status"] == "finished"


def test_unfinished_run_with_other_config_or_nothing_to_resume(tmp_path, tiny_bert_dir, glue, capsys):
    out = tmp_path / "run"
    _run_and_kill(_cmd(glue, tiny_bert_dir, out, "--save-steps", "2"), out, lambda p: p["batches_done"] >= 2)
    code = main(_cmd(glue, tiny_bert_dir, out, "--lr", "1e-2")[3:])
    assert code == 2 and "unfinished run with another config" in capsys.readouterr().err
    code = main(_cmd(glue, tiny_bert_dir, tmp_path / "fresh", "--resume")[3:])
    assert code == 2 and "no checkpointed unfinished run" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert_dir, glue, monkeypatch, capsys):
    import torch

    poison_task_loss(monkeypatch, at=7)
    out = tmp_path / "run"
    code = main(_cmd(glue, tiny_bert_dir, out, "--save-steps", "3", "--on-collapse", "stop")[3:])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "loss became nan at step 7" in err[0] and "last good checkpoint" in err[0]
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert progress["batches_done"] == 6 and all(torch.isfinite(torch.tensor(progress["history"]["train_loss"])))
    assert not (out / "metrics.json").exists()
