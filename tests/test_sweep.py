"""`kdlora sweep`: the paper grids, custom grids, SIGKILL and resume, and two workers sharing a PostgreSQL study."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_glue

from kdlora.cli import main
from kdlora.sweep import load_grid, paper_grid


def test_paper_grids_have_25_and_24_points_inside_the_papers_ranges():
    fft = paper_grid("fft")
    assert len(fft) == 25 and len({json.dumps(p, sort_keys=True) for p in fft}) == 25
    for p in fft:
        assert 2e-5 <= p["lr"] <= 5e-5 and 8 <= p["batch_size"] <= 32
        assert 2 <= p["epochs"] <= 5 and 0.01 <= p["weight_decay"] <= 0.1
    assert {p["epochs"] for p in fft} == {2, 3, 4, 5} and {p["batch_size"] for p in fft} == {8, 16, 32}
    for method in ("lora", "kd-lora"):
        grid = paper_grid(method)
        assert len(grid) == 24 and len({json.dumps(p, sort_keys=True) for p in grid}) == 24
        for p in grid:
            assert 8 <= p["r"] <= 32 and 3 <= p["epochs"] <= 5
            assert 16 <= p["lora_alpha"] <= 32 and 0 <= p["lora_dropout"] <= 0.1


def test_a_grid_file_gives_a_product_and_listed_points(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("product: {lr: [0.001, 0.002], r: [4, 8]}\npoints:\n  - {lr: 0.005, train.epochs: 1}\n")
    assert load_grid(str(path), "lora") == [
        {"lr": 0.001, "r": 4},
        {"lr": 0.001, "r": 8},
        {"lr": 0.002, "r": 4},
        {"lr": 0.002, "r": 8},
        {"lr": 0.005, "train.epochs": 1},
    ]


@pytest.fixture(scope="module")
def sweep_glue(tmp_path_factory) -> Path:
    """Enough examples for a trial to take a few seconds, so that a kill can land inside one."""
    return write_glue(tmp_path_factory.mktemp("glue"), n_train=1500, n_dev=64)


def sweep_cmd(model: Path, glue: Path, out: Path, grid: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdlora",
        "sweep",
        "--method",
        "lora",
        "--task",
        "stsb",
        "--model",
        str(model),
        "--data-dir",
        str(glue),
        "--output-dir",
        str(out),
        "--grid",
        str(grid),
        "--epochs",
        "2",
        "--quiet",
        "--top-k",
        "2",
        "--target-modules",
        "none",  # query/value: the fewest LoRA matrices keep a trial short
        *extra,
    ]


def study_trials(out: Path, storage: str | None = None) -> list:
    import optuna

    storage = storage or f"sqlite:///{out / 'study.db'}"
    return optuna.load_study(study_name="kdlora-stsb-lora", storage=storage).get_trials(deepcopy=False)


def point_of(t) -> int | None:
    from kdlora.sweep import point_of

    return point_of(t)


def test_bad_grids_fail_in_one_line(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    cases = {
        "product: {lrr: [0.1]}\n": "grid key 'lrr' is not a config field",
        "product: {lr: [-1]}\n": "lr must be > 0",
        "points: [{r: 4}, {r: 4}]\n": "lists a point twice",
        "nothing: 1\n": "must hold 'product:'",
    }
    for i, (text, message) in enumerate(cases.items()):
        grid = tmp_path / f"grid{i}.yaml"
        grid.write_text(text)
        argv = sweep_cmd(tiny_bert_dir, tiny_glue, tmp_path / f"out{i}", grid)[3:]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (text, err)


def test_a_killed_sweep_resumes_without_losing_or_rerunning_a_trial(tmp_path, tiny_bert_dir, sweep_glue):
    grid = tmp_path / "grid.yaml"
    grid.write_text("product: {lr: [0.001, 0.003, 0.01, 0.03]}\n")
    out = tmp_path / "sweep"
    cmd = sweep_cmd(tiny_bert_dir, sweep_glue, out, grid, "--save-steps", "5")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill the worker once two points have finished and the third has started training.
    third = out / "trials" / "point-002" / "config.yaml"
    deadline = time.time() + 300
    while not third.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.json")}
    assert set(finished_before) >= {"point-000", "point-001"}
    assert "point-002" not in finished_before, "the kill came after the third point finished"
    states_before = Counter(t.state.name for t in study_trials(out))
    assert states_before["COMPLETE"] == 2 and states_before["RUNNING"] == 1

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "point-000" not in result.stdout and "point-001" not in result.stdout  # not retrained, not even read
    assert "training into" in result.stdout and "point-002" in result.stdout
    trials = study_trials(out)
    complete = Counter(point_of(t) for t in trials if t.state.name == "COMPLETE")
    assert complete == {0: 1, 1: 1, 2: 1, 3: 1}  # every point once
    assert [point_of(t) for t in trials if t.state.name == "FAIL"] == [2]  # the killed trial, rerun as a new one
    for name, stamp in finished_before.items():
        assert (out / "trials" / name / "metrics.json").stat().st_mtime_ns == stamp
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] == summary["total"] == 4
    scores = sorted((p["score"] for p in summary["points"]), reverse=True)
    assert summary["median_top_k"] == pytest.approx((scores[0] + scores[1]) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# Two workers, one study, on a real PostgreSQL server on loopback


def _pg_bin(name: str) -> str | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e .[postgres])")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs them from Debian")
    # The server refuses to run as root: run it as the postgres user where we are root.
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="kdlora-pg-"))
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    if made.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    started = run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {started.stderr.strip()[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgresql_study_and_run_no_point_twice(tmp_path, tiny_bert_dir, sweep_glue, postgres_url):
    grid = tmp_path / "grid.yaml"
    grid.write_text("product: {lr: [0.001, 0.002, 0.004], r: [4, 8]}\n")
    out = tmp_path / "sweep"
    cmd = sweep_cmd(tiny_bert_dir, sweep_glue, out, grid, "--storage", postgres_url, "--epochs", "1")
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr[-2000:]
    trials = study_trials(out, postgres_url)
    complete = Counter(point_of(t) for t in trials if t.state.name == "COMPLETE")
    assert complete == dict.fromkeys(range(6), 1)  # together they finished the grid, each point once
    trained = [stdout.count("training into") for stdout, _ in outputs]
    assert sum(trained) == 6 and all(n > 0 for n in trained), trained  # both worked, nothing trained twice
    assert len({t.user_attrs["pid"] for t in trials if t.state.name == "COMPLETE"}) == 2


def test_an_unreachable_storage_is_one_line_without_the_password(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("product: {lr: [0.001]}\n")
    for url in (f"postgresql://u:secret@127.0.0.1:{_free_port()}/db", "nosuchdb://x"):
        argv = sweep_cmd(tiny_bert_dir, tiny_glue, tmp_path / "out", grid, "--storage", url)[3:]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot open the study storage" in err[0] and "secret" not in err[0], err


def test_retry_failed_runs_a_failed_point_once_more(tmp_path, tiny_bert_dir, tiny_glue, monkeypatch):
    import kdlora.sweep as sweep
    from kdlora.errors import KdloraError

    grid = tmp_path / "grid.yaml"
    grid.write_text("points: [{lr: 0.001}, {lr: 0.002}]\n")
    real = sweep._run

    def broken(cfg):
        if cfg.train.lr == 0.002:
            raise KdloraError("a bug, since fixed")
        return real(cfg)

    def states(out: Path) -> dict[int, list[str]]:
        got: dict[int, list[str]] = {}
        for t in study_trials(out):
            got.setdefault(point_of(t), []).append(t.state.name)
        return got

    out = tmp_path / "out"
    argv = sweep_cmd(tiny_bert_dir, tiny_glue, out, grid)[3:]
    monkeypatch.setattr(sweep, "_run", broken)
    assert main(argv) == 0
    assert states(out) == {0: ["COMPLETE"], 1: ["FAIL"]}
    monkeypatch.setattr(sweep, "_run", real)
    assert main(argv) == 0  # a plain rerun leaves a failed point alone
    assert states(out) == {0: ["COMPLETE"], 1: ["FAIL"]}
    assert main([*argv, "--retry-failed"]) == 0
    assert states(out) == {0: ["COMPLETE"], 1: ["FAIL", "COMPLETE"]}
    assert (out / "trials" / "point-001" / "metrics.json").is_file()
