import json

import pytest

from kdlora.bench import BenchArgs, measure_in_child
from kdlora.cli import main


def test_bench_on_a_tiny_pair_writes_every_field(tmp_path, tiny_bert_dir, tiny_glue):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--teacher-model",
            str(tiny_bert_dir),
            "--student-layers",
            "0,2",
            "--data-dir",
            str(tiny_glue),
            "--ranks",
            "2,4",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--batch-size",
            "4",
            "--seq-len",
            "16",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    rows = {(r["method"], r["rank"]): r for r in result["parameters"]}
    assert set(rows) == {("fft", None), ("lora", 2), ("lora", 4), ("kd-lora", 2), ("kd-lora", 4)}
    assert rows[("lora", 2)]["lora_params"] == 4 * 2 * 2 * 64 and rows[("kd-lora", 2)]["lora_params"] == 2 * 2 * 2 * 64
    assert rows[("kd-lora", 4)]["total_params"] < rows[("fft", None)]["total_params"]
    assert rows[("kd-lora", 2)]["merged_size_mb"] < rows[("lora", 2)]["merged_size_mb"]
    assert set(result["train_memory"]) == {"fft", "lora", "kd-lora", "baseline_imports"}
    assert all(m["peak_mb"] > 0 for m in result["train_memory"].values())
    arms = result["inference"]["arms"]
    assert set(arms) == {"teacher_fft", "teacher_lora_unmerged", "teacher_lora_merged", "student_kdlora_merged",
                         "teacher_int8_onnx", "student_int8_onnx"}  # fmt: skip
    assert all(a["runs"] == 3 and 0 < a["min_s"] <= a["median_s"] <= a["max_s"] for a in arms.values())
    assert result["inference"]["examples"] == 32  # the whole tiny dev set
    assert "| kd-lora | 2 |" in (out / "bench.md").read_text()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_child_process_memory_is_positive(tiny_bert_dir, checkpointing):
    args = BenchArgs(
        teacher=str(tiny_bert_dir), student_layers=[0], batch_size=2, seq_len=8, train_steps=1,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    assert measure_in_child(args, "kd-lora", 2)["peak_mb"] > 0


def test_bench_teacher_keeps_working_with_a_deprecation_notice(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    argv = ["bench", "--teacher", str(tiny_bert_dir), "--student-layers", "0", "--data-dir", str(tiny_glue)]
    argv += ["--ranks", "2", "--runs", "1", "--warmup", "0", "--skip-memory", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher is deprecated" in err[0] and "--teacher-model" in err[0]
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["teacher"] == str(tiny_bert_dir)
