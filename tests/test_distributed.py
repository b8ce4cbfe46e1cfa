"""`accelerate launch --num_processes 2` on CPU (gloo): every method trains with the data split across processes."""

import json
import subprocess
import sys

import pytest
from conftest import train_argv

LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "kdlora",
    "train",
]


def _launch(tmp_path, glue, out, *args):
    cmd = [*LAUNCH, *train_argv(glue, out, "--epochs", "2", "--batch-size", "16", "--quiet", *args)[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("artefacts:") == 1  # only the main process reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert len(metrics["train_loss"]) == 2 * 3  # 96 examples / (16 per process x 2 processes), per epoch
    assert metrics["num_eval_examples"] == {"validation": 32} and (out / "merged" / "config.json").is_file()
    return metrics


@pytest.mark.parametrize("method", ["fft", "lora", "kd-lora"])
def test_two_cpu_processes(tmp_path, tiny_bert_dir, tiny_glue, method):
    args = ["--method", method]
    if method == "kd-lora":
        args += ["--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--teacher-epochs", "1"]
    else:
        args += ["--model", str(tiny_bert_dir)]
    metrics = _launch(tmp_path, tiny_glue, tmp_path / "run", *args)
    if method == "kd-lora":
        teacher = json.loads((tmp_path / "run" / "teacher" / "metrics.json").read_text())
        assert teacher["num_processes"] == 2 and metrics["teacher_logits_cached"] is False
