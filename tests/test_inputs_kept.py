"""A command never deletes or writes over a path it reads: --overwrite on a teacher run, a model, export's source or
predict's input is one line and exit 2, and every input is left byte for byte as it was."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_argv

from kdlora.cli import main
from kdlora.rundir import read_run


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert_dir, tiny_glue) -> Path:
    out = tmp_path_factory.mktemp("kept") / "lora"
    assert main(train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--epochs", "1", "--quiet")) == 0
    return out


def _refused(argv: list[str], capsys, *kept: Path, words: tuple[str, ...]) -> None:
    before = [_digest(p) for p in kept]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never writes over what it reads" in err[0] and all(w in err[0] for w in words), err
    assert [_digest(p) for p in kept] == before


def test_train_never_clears_its_teacher_or_its_model(lora_run, tiny_bert_dir, tiny_glue, tmp_path, capsys):
    kd = ["train", "--method", "kd-lora", "--teacher", str(lora_run), "--student-layers", "0,2", "--task", "cola"]
    kd += ["--data-dir", str(tiny_glue), "--overwrite", "--quiet"]
    _refused([*kd, "--output-dir", str(lora_run)], capsys, lora_run, words=("--output-dir", "is --teacher"))
    # through a link and `..`, and nested either way
    link = tmp_path / "link"
    link.symlink_to(lora_run)
    (tmp_path / "sub").mkdir()
    _refused([*kd, "--output-dir", str(tmp_path / "sub" / ".." / "link")], capsys, lora_run, words=("is --teacher",))
    _refused([*kd, "--output-dir", str(lora_run / "merged")], capsys, lora_run, words=("lies inside --teacher",))
    _refused([*kd, "--output-dir", str(lora_run.parent)], capsys, lora_run, words=("holds --teacher",))
    model = ["--model", str(tiny_bert_dir), "--overwrite", "--quiet"]
    argv = train_argv(tiny_glue, tiny_bert_dir, *model)
    _refused(argv, capsys, tiny_bert_dir, words=("is --model",))
    _refused(train_argv(tiny_glue, tiny_glue, *model), capsys, tiny_glue, words=("is --data-dir",))
    assert read_run(lora_run) is not None


def test_export_and_predict_never_write_over_their_source(lora_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    export = ["export", "--model-dir", str(lora_run), "--overwrite"]
    _refused([*export, "--output-dir", str(lora_run)], capsys, lora_run, words=("is --model-dir",))
    _refused([*export, "--output-dir", str(lora_run / "merged")], capsys, lora_run, words=("lies inside",))
    rows = tmp_path / "rows.txt"
    rows.write_text("the good cat .\nthe bad dog .\n")
    predict = ["predict", "--model-dir", str(lora_run), "--input-file", str(rows), "--output-file", str(rows)]
    _refused(predict, capsys, rows, lora_run, words=("--output-file", "is --input-file"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--lr", "inf"), "train.lr must be a finite number"),
        (("--lr", "nan"), "train.lr must be a finite number"),
        (("--temperature", "inf"), "kd.temperature must be a finite number"),
    ],
)
def test_non_finite_settings_are_refused_before_anything_runs(tiny_glue, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(train_argv(tiny_glue, out, "--model", "missing-model", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_empty_lists_and_names_are_refused(tmp_path, tiny_glue, tiny_bert_dir, capsys):
    compare = ["compare", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2", "--output-dir"]
    for tasks in ("", "../escape"):
        assert main([*compare, str(tmp_path / "c"), "--tasks", tasks]) == 2
        assert "--tasks" in capsys.readouterr().err and not (tmp_path / "c").exists()
    grid = tmp_path / "grid.yaml"
    grid.write_text("points: []\n")
    sweep = train_argv(tiny_glue, tmp_path / "s", "--model", str(tiny_bert_dir), "--grid", str(grid))
    sweep[0] = "sweep"
    assert main(sweep) == 2 and "holds no point" in capsys.readouterr().err
    data = tmp_path / "d.csv"
    data.write_text("text,label\nthe cat .,a\nthe dog .,b\n")
    own = ["train", "--method", "lora", "--model", str(tiny_bert_dir), "--train-file", str(data)]
    assert main([*own, "--validation-file", str(data), "--labels", "a,,b", "--output-dir", str(tmp_path / "o")]) == 2
    assert "empty class name" in capsys.readouterr().err


def test_report_counts_a_record_without_a_numeric_score_as_unfinished(lora_run, tmp_path, capsys):
    import json
    import shutil

    root = tmp_path / "runs"
    for i, score in enumerate(("high", None, 12.5)):
        run = root / f"r{i}"
        shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("*.safetensors", "adapter"))
        record = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**record, "score": score}))
    assert main(["report", str(root), "--quiet"]) == 0
    report = (root / "report.md").read_text()
    assert "1 finished runs, 2 unfinished" in report and "- r0" in report and "- r1" in report


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_a_run_like_ctrl_c(tmp_path, tiny_bert_dir, tiny_glue, signum):
    out = tmp_path / "run"
    argv = [*train_argv(tiny_glue, out, "--model", str(tiny_bert_dir)), "--epochs", "100000", "--save-steps", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "kdlora", *argv], stderr=subprocess.PIPE, text=True)
    for _ in range(1200):  # until it holds the lock and trains
        if (out / "config.yaml").exists():
            break
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    err = proc.stderr.read()
    last = err.strip().splitlines()[-1]
    assert (
        last == f"kdlora: stopped by {signal.Signals(signum).name}; the run is unfinished (no metrics.json was written)"
    )
    assert "\nkdlora: stopped by" in err and "Traceback" not in err  # on a line of its own
    assert not (out / ".lock").exists() and not (out / "metrics.json").exists()


def test_a_damaged_checkpoint_is_found_before_training_resumes(tmp_path, tiny_bert_dir, tiny_glue, capsys):
    import json

    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    argv = train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--quiet", "--save-steps", "2")
    argv += ["--epochs", "50"]  # killed after its first epoch, long before the end
    proc = subprocess.Popen([sys.executable, "-m", "kdlora", *argv], stderr=subprocess.DEVNULL)
    for _ in range(2400):  # until the first epoch's end checkpoint is written
        progress = out / "checkpoint" / "progress.json"
        if progress.is_file() and json.loads(progress.read_text())["epoch"] >= 1:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    ckpt = out / "checkpoint"
    good = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def damaged(change, message):
        for name, data in good.items():
            (ckpt / name).write_bytes(data)
        change()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is damaged" in err[0] and message in err[0] and "--overwrite" in err[0], err
        assert not (out / "metrics.json").exists()

    def drop_history():
        record = json.loads((ckpt / "progress.json").read_text())
        (ckpt / "progress.json").write_text(json.dumps({k: v for k, v in record.items() if k != "history"}))

    def other_rank():
        weights = load_file(str(ckpt / "trainable.safetensors"))
        name = next(n for n in weights if "lora_A" in n)
        save_file({**weights, name: torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])},
                  str(ckpt / "trainable.safetensors"))  # fmt: skip

    damaged(drop_history, "no loss history")
    damaged(lambda: (ckpt / "best.safetensors").unlink(), "no best weights")
    damaged(other_rank, "has shape")


def test_a_directory_given_for_a_file_is_named_so(lora_run, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    predict = ["predict", "--model-dir", str(lora_run), "--input-file", str(folder)]
    for argv in (["train", "--config", str(folder)], [*predict, "--output-file", str(tmp_path / "p.csv")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{folder} is a directory, not a file" in err[0], err


def test_a_failed_write_says_the_run_is_unfinished_only_for_commands_that_make_runs(lora_run, tmp_path, capsys):
    rows = tmp_path / "rows.txt"
    rows.write_text("the good cat .\n")
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where predict's output directory would be
    argv = ["predict", "--model-dir", str(lora_run), "--input-file", str(rows), "--output-file", str(blocked / "p.csv")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not marked finished" not in err[0], err


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(lora_run, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join('{"text": "the good cat ."}\n' for _ in range(30)) + '{"text": "the bad\n')
    out = tmp_path / "p.csv"
    assert main(["predict", "--model-dir", str(lora_run), "--input-file", str(rows), "--output-file", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{rows} line 31, column 18: Invalid control character" in err[0], err
    assert not (tmp_path / "p.csv").exists()


def test_predict_and_train_read_an_unclosed_quote_alike(lora_run, tiny_bert_dir, tmp_path, capsys):
    # A TSV whose sixth text opens a quote it never closes: Python's csv module swallowed the other 54 rows into one
    # cell and predict wrote "6 predictions" for 60 rows. Both commands now refuse it, naming the parser's cause.
    lines = [f"the cat number {i} sat .\t{i % 2}" for i in range(60)]
    lines[5] = '"the dog ran\t1'
    rows = tmp_path / "rows.tsv"
    rows.write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model-dir", str(lora_run), "--input-file", str(rows), "--output-file", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(rows) in err[0] and "EOF inside string" in err[0], err
    assert not out.exists()
    argv = ["train", "--method", "lora", "--lr", "2e-3", "--model", str(tiny_bert_dir), "--train-file", str(rows),
            "--validation-file", str(rows), "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    # (`datasets` draws its progress bars when an earlier test imported it before main could turn them off)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Generating")]
    # The reader's own cause, not the "An error occurred while generating the dataset" that wraps it.
    assert len(err) == 1 and "EOF inside string" in err[0] and "generating the dataset" not in err[0], err


def test_a_rank_above_the_adapted_layers_width_is_refused_before_anything_is_allocated(
    tiny_bert_dir, tiny_glue, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--rank", "100000")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rank 100000 is above the width of the layers LoRA adapts" in err[0], err
    assert not (out / ".lock").exists() and not (out / "metrics.json").exists()
    width = int(err[0].rsplit("--rank ", 1)[1].split()[0])  # the largest rank it offers trains
    assert main(train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--rank", str(width), "--epochs", "1",
                           "--quiet")) == 0  # fmt: skip


def test_a_row_count_that_a_second_count_disagrees_with_is_refused(tmp_path):
    # Every CSV/TSV read (train's and predict's) ends with this check against Python's own csv module.
    from kdlora.data import check_row_count
    from kdlora.errors import KdloraError

    rows = tmp_path / "rows.tsv"
    rows.write_text('sentence\tlabel\n"a cell\nover two lines"\t1\nb\t0\n\nc\t1\n')
    check_row_count(rows, ".tsv", 3)  # the quoted newline is one row, the blank line none
    with pytest.raises(KdloraError, match=r"read 2 rows, but the file holds 3 by a second count"):
        check_row_count(rows, ".tsv", 2)
