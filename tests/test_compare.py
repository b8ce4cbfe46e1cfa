"""`kdlora compare` end to end on a tiny BERT: three arms per task and seed, reuse, the report, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kdlora.cli import main
from kdlora.rundir import read_run

ARMS = ("fft", "lora", "kd-lora")


def compare_argv(tiny_bert_dir: Path, glue: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compare",
        "--tasks",
        "cola,stsb",
        "--seeds",
        "1",
        "--teacher-model",
        str(tiny_bert_dir),
        "--student-layers",
        "0,2",
        "--data-dir",
        str(glue),
        "--output-dir",
        str(out),
        "--epochs",
        "2",
        "--inference-runs",
        "2",
        "--quiet",
        *extra,
    ]


def test_compare_trains_each_arm_once_and_reports(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    out = tmp_path / "cmp"
    lrs = ["--set", "kd-lora.train.lr=5e-3", "--set", "lora.train.lr=1e-3"]
    assert main(compare_argv(tiny_bert_dir, tiny_glue, out, *lrs)) == 0
    for task in ("cola", "stsb"):
        runs = {arm: out / task / "seed-1" / arm for arm in ARMS}
        metrics = {arm: read_run(d) for arm, d in runs.items()}
        assert all(m is not None and m["task"] == task and m["method"] == arm for arm, m in metrics.items())
        configs = {arm: yaml.safe_load((d / "config.yaml").read_text()) for arm, d in runs.items()}
        assert {c["train"]["seed"] for c in configs.values()} == {1}
        assert configs["kd-lora"]["model"]["teacher"] == str(runs["fft"])  # distilled from this seed's fft arm
        assert configs["kd-lora"]["train"]["lr"] == 5e-3 and configs["lora"]["train"]["lr"] == 1e-3
        assert configs["fft"]["model"]["name"] == configs["lora"]["model"]["name"] == str(tiny_bert_dir)
        # the parent cached the teacher's logits, so the student's process never loaded the teacher
        assert metrics["kd-lora"]["teacher_logits_cached"] is True
        assert metrics["kd-lora"]["teacher_score"] == metrics["fft"]["score"]
        assert metrics["kd-lora"]["total_params"] < metrics["lora"]["total_params"] == metrics["fft"]["total_params"]
        for d in runs.values():
            timing = json.loads((d / "inference.json").read_text())
            assert timing["runs"] == 2 and timing["model"] == "merged" and timing["median_s"] > 0
    report = (out / "report.md").read_text()
    assert "## Table 1: scores" in report and "## Table 2" in report and (out / "figure2.png").is_file()
    assert "(pareto.png)" in report and (out / "pareto.png").is_file()  # the arms were timed: score vs throughput
    assert len((out / "arms.csv").read_text().splitlines()) == 1 + 6

    # The same command again reuses all six finished arms.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    capsys.readouterr()
    assert main(compare_argv(tiny_bert_dir, tiny_glue, out, *lrs)) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}

    # A tree of links to these runs is the same runs: the kd-lora arm's teacher is reached through a link there.
    linked = tmp_path / "linked"
    for d in out.glob("*/seed-1/*"):
        (linked / d.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        (linked / d.relative_to(out)).symlink_to(d.resolve())
    assert main(compare_argv(tiny_bert_dir, tiny_glue, linked, *lrs)) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}

    # Another config for a finished arm is refused without --overwrite: one line, nothing retrained.
    assert main(compare_argv(tiny_bert_dir, tiny_glue, out, "--set", "lora.train.lr=1e-3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished run with another config: pass --overwrite" in err[0]
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}


def test_compare_arms_split_between_two_processes(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    """--arms: one process trains lora, another fft and kd-lora into the same directory; the last one times all."""
    out = tmp_path / "cmp"
    argv = compare_argv(tiny_bert_dir, tiny_glue, out, "--set", "kd-lora.train.lr=5e-3", "--set", "lora.train.lr=1e-3")
    argv[argv.index("--tasks") + 1] = "cola"
    runs = {arm: out / "cola" / "seed-1" / arm for arm in ARMS}

    # A student whose teacher is neither finished nor among --arms fails before anything trains.
    assert main([*argv, "--arms", "kd-lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distils from the fft arm, which has not finished" in err[0], err
    assert not list(out.rglob("metrics.json"))
    for bad in ("lora,lora", "student"):
        assert main([*argv, "--arms", bad]) == 2
        assert "--arms" in capsys.readouterr().err

    assert main([*argv, "--arms", "lora"]) == 0
    assert read_run(runs["lora"]) is not None and not runs["fft"].exists() and not runs["kd-lora"].exists()
    assert not (runs["lora"] / "inference.json").exists()  # timing waits for all three arms
    lora_stamp = (runs["lora"] / "metrics.json").stat().st_mtime_ns

    capsys.readouterr()
    assert main([*argv, "--arms", "fft,kd-lora"]) == 0
    assert "[cola seed 1] lora" not in capsys.readouterr().out  # not even read as "reusing": another process's arm
    metrics = {arm: read_run(d) for arm, d in runs.items()}
    assert all(m is not None and m["method"] == arm for arm, m in metrics.items())
    assert metrics["kd-lora"]["teacher_score"] == metrics["fft"]["score"]
    assert (runs["lora"] / "metrics.json").stat().st_mtime_ns == lora_stamp
    assert all((d / "inference.json").is_file() for d in runs.values())  # the last process timed the three


def test_compare_rejects_bad_settings_before_training(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    out = tmp_path / "cmp"
    cases = {
        ("--set", "lora.train.lr=-1"): "lr must be > 0",
        ("--set", "lora.train.epocs=2"): "did you mean 'epochs'",
        ("--set", "teacher.train.lr=1"): "expected ARM.SECTION.KEY=VALUE",
        ("--seeds", "1,x"): "--seeds must be comma-separated integers",
        ("--tasks", "cola,colaa"): "unknown task",
    }
    for extra, message in cases.items():
        assert main(compare_argv(tiny_bert_dir, tiny_glue, out, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not out.exists()


def test_a_child_run_reports_its_error_through_the_file_it_is_given(tmp_path, tiny_glue, monkeypatch, capsys):
    error_file = tmp_path / "error"
    monkeypatch.setenv("KDLORA_ERROR_FILE", str(error_file))
    argv = ["train", "--method", "lora", "--task", "cola", "--model", str(tmp_path / "missing")]
    assert main([*argv, "--data-dir", str(tiny_glue), "--output-dir", str(tmp_path / "out")]) == 2
    assert "does not exist" in error_file.read_text() and capsys.readouterr().err == ""


def test_compare_on_real_glue_with_minilm(tmp_path, real_glue):
    """The issue's command at smoke size: packaged MiniLM teacher, its layers 0,2,4 as student, WNLI from ../shared."""
    out = tmp_path / "cmp"
    argv = ["compare", "--tasks", "wnli", "--teacher-model", "all-MiniLM-L6-v2", "--student-layers", "0,2,4"]
    argv += ["--data-dir", str(real_glue), "--output-dir", str(out), "--max-train-samples", "48"]
    argv += ["--max-eval-samples", "32", "--epochs", "1", "--inference-runs", "1", "--quiet"]
    argv += ["--set", "lora.train.lr=5e-4", "--set", "kd-lora.train.lr=2e-3"]  # a 2-step run: no range test
    assert main(argv) == 0
    metrics = {arm: read_run(out / "wnli" / "seed-42" / arm) for arm in ARMS}
    assert metrics["fft"]["total_params"] == 22_713_986 and metrics["kd-lora"]["total_params"] == 17_390_594
    # every linear layer: 3 layers x r 8 x (q, k, v, attention output: 384+384; intermediate, output: 384+1536)
    assert metrics["kd-lora"]["lora_params"] == 3 * 8 * (4 * 768 + 2 * 1920)
    assert "| kd-lora |" in (out / "report.md").read_text()
