"""Checked before anything trains: models and settings fail in seconds; a run directory has one user at a time;
a --max-length longer than the model is cut, never a crash."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import train_argv

from kdlora.cli import main
from kdlora.errors import KdloraError
from kdlora.rundir import LOCK, locked


def test_bad_student_fails_before_the_teacher_trains(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    argv = train_argv(tiny_glue, tmp_path / "run", "--method", "kd-lora", "--teacher-model", str(tiny_bert_dir))
    start = time.perf_counter()
    assert main([*argv, "--student-layers", "0,9", "--quiet"]) == 2
    assert "out of range: the model has layers 0..3" in capsys.readouterr().err
    assert main([*argv, "--student-layers", "0,1", "--target-modules", "nope", "--quiet"]) == 2
    assert "LoRA target module(s) nope not found" in capsys.readouterr().err
    assert time.perf_counter() - start < 20 and not (tmp_path / "run" / "teacher").exists()


def test_max_length_longer_than_the_model_is_cut(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    long = tmp_path / "glue" / "CoLA"
    long.mkdir(parents=True)
    sentence = " ".join(["the good cat"] * 40)  # 120 words: longer than the 64 positions of the tiny model
    for split in ("train", "dev"):
        long.joinpath(f"{split}.tsv").write_text("".join(f"s\t{i % 2}\t\t{sentence}\n" for i in range(8)))
    argv = train_argv(tmp_path / "glue", tmp_path / "run", "--model", str(tiny_bert_dir), "--max-length", "512")
    assert main([*argv, "--epochs", "1", "--quiet"]) == 0
    assert "--max-length 512 is longer than" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "merged" / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_a_second_run_into_a_used_directory_stops(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    out = tmp_path / "run"
    with locked(out):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(KdloraError, match=f"is in use by process {os.getpid()}"):
            with locked(out):
                pass
        assert main([*train_argv(tiny_glue, out, "--model", str(tiny_bert_dir)), "--quiet"]) == 2
        assert f"is in use by process {os.getpid()} on {socket.gethostname()}" in capsys.readouterr().err
    assert not (out / LOCK).exists() and not (out / "config.yaml").exists()


def test_a_dead_process_lock_is_taken_over(tmp_path, tiny_bert_dir, tiny_glue):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert main([*train_argv(tiny_glue, out, "--model", str(tiny_bert_dir)), "--epochs", "1", "--quiet"]) == 0
    assert not (out / LOCK).exists() and (out / "metrics.json").is_file()


def test_two_runs_at_once_one_wins(tmp_path, tiny_bert_dir, tiny_glue):
    """Two `kdlora train` processes into one directory: the second exits 2 naming the first, which goes on; an
    interrupted run gives the directory back."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "kdlora", *train_argv(tiny_glue, out, "--model", str(tiny_bert_dir)), "--quiet"]
    # SIGINT at its default in the child: an earlier test may leave it ignored in pytest, and children inherit that
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    cmd = [*argv, "--epochs", "100000", "--save-steps", "0"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    for _ in range(1200):  # wait until the first holds the lock and has started
        if (out / "config.yaml").exists():
            break
        time.sleep(0.05)
    second = subprocess.run(argv, capture_output=True, text=True)
    assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr
    assert first.poll() is None  # the first run was not disturbed
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130 and not (out / LOCK).exists()
