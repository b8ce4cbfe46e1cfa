"""Every user-facing failure: one line that names the problem and the fix, exit code 2, no traceback."""

import errno
import json

import pytest
from conftest import train_argv

from kdlora.cli import main


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_bert_dir, tiny_glue):
    out = tmp_path_factory.mktemp("teacher")
    args = ["train", "--method", "fft", "--task", "cola", "--model", str(tiny_bert_dir), "--data-dir", str(tiny_glue)]
    assert main([*args, "--epochs", "1", "--quiet", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, tiny_bert_dir):
    """Models and data that are wrong in one way each."""
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("bad")
    (root / "vit").mkdir()  # a model with no sequence-classification class
    (root / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    three = BertForSequenceClassification(tiny_bert_config(num_labels=3))  # a head for 3 labels
    three.save_pretrained(root / "three")
    for name, content in {
        "missing-column": "index\tsentence1\tlabel\n0\tthe cat\tentailment\n",
        "ragged": "index\tsentence1\tsentence2\tlabel\n0\tthe cat\tentailment\n",
        "unknown-label": "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
    }.items():
        (root / name / "RTE").mkdir(parents=True)
        (root / name / "RTE" / "train.tsv").write_text(content)
        (root / name / "RTE" / "dev.tsv").write_text(content)
    (root / "unfinished").mkdir()
    (root / "unfinished" / "config.yaml").write_text("train: {method: fft}\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    (root / "typo.yaml").write_text("train: {epocs: 3}\n")
    (root / "badtype.yaml").write_text("lora: {r: eight}\n")
    return root


# (name, extra train args, expected fragment). {model}, {glue}, {bad}, {teacher} are filled in.
CASES = [
    ("model path missing", ["--method", "lora", "--model", "{bad}/nope"], "does not exist"),
    ("not a sequence classifier", ["--method", "lora", "--model", "{bad}/vit"], "no sequence-classification class"),
    ("data dir without the task", ["--method", "lora", "--task", "wnli"], "has no wnli data"),
    ("missing column", ["--method", "lora", "--task", "rte", "--data-dir", "{bad}/missing-column"], "missing column"),
    ("ragged row", ["--method", "lora", "--task", "rte", "--data-dir", "{bad}/ragged"], "ragged row"),
    ("unknown label", ["--method", "lora", "--task", "rte", "--data-dir", "{bad}/unknown-label"], "unknown label"),
    ("empty split", ["--method", "lora", "--max-train-samples", "0"], "split is empty after the sample cap"),
    ("teacher for another task", ["--method", "kd-lora", "--task", "rte", "--teacher", "{teacher}"], "trained on cola"),
    (
        "student head with other num_labels",
        ["--method", "kd-lora", "--teacher", "{teacher}", "--model", "{bad}/three"],
        "has a head for 3 labels",
    ),
    (
        "teacher not finished",
        ["--method", "kd-lora", "--teacher", "{bad}/unfinished", "--student-layers", "0"],
        "not a finished kdlora run",
    ),
    (
        "student layers out of range",
        ["--method", "kd-lora", "--teacher", "{teacher}", "--student-layers", "0,9"],
        "out of range",
    ),
    (
        "student layers repeated",
        ["--method", "kd-lora", "--teacher", "{teacher}", "--student-layers", "1,1"],
        "repeats",
    ),
    ("LoRA target missing", ["--method", "lora", "--target-modules", "qkv"], "not found in the model"),
    ("unknown task", ["--method", "lora", "--task", "colaa"], "unknown task 'colaa'"),
    ("YAML typo", ["--method", "lora", "--config", "{bad}/typo.yaml"], "did you mean 'epochs'"),
    ("YAML bad type", ["--method", "lora", "--config", "{bad}/badtype.yaml"], "lora.r must be an integer"),
    ("CLI bad type", ["--method", "lora", "--epochs", "three"], "train.epochs must be an integer"),
    ("rank zero", ["--method", "lora", "--rank", "0"], "rank (r) must be > 0"),
    ("alpha outside [0,1]", ["--method", "kd-lora", "--teacher", "{teacher}", "--alpha", "1.5"], "alpha must be in"),
    (
        "temperature zero",
        ["--method", "kd-lora", "--teacher", "{teacher}", "--temperature", "0"],
        "temperature must be",
    ),
    ("foreign output dir", ["--method", "lora", "--output-dir", "{bad}/foreign"], "holds no kdlora run"),
]


@pytest.mark.parametrize(("name", "extra", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(
    name, extra, fragment, tmp_path, tiny_bert_dir, tiny_glue, teacher, bad_dirs, capsys
):
    fill = {"model": str(tiny_bert_dir), "glue": str(tiny_glue), "bad": str(bad_dirs), "teacher": str(teacher)}
    args = ["train", "--task", "cola", "--data-dir", str(tiny_glue), "--quiet", "--epochs", "1"]
    args += ["--output-dir", str(tmp_path / "out"), *(a.format(**fill) for a in extra)]
    if "--model" not in args and "--student-layers" not in args:  # the cases that name no student of their own
        args += ["--model", str(tiny_bert_dir)]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, name
    assert len(err) == 1 and err[0].startswith("kdlora: error: "), err
    assert fragment in err[0], err[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_glue, capsys):
    code = main(["--debug", *train_argv(tiny_glue, tmp_path / "out", "--model", str(tmp_path / "nope"))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("kdlora: error:")


def test_disk_full_while_writing_leaves_no_finished_run(tmp_path, tiny_bert_dir, tiny_glue, monkeypatch, capsys):
    import kdlora.io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kdlora.io.os, "fsync", full)
    out = tmp_path / "out"
    code = main(train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--epochs", "1", "--quiet"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left on device while writing" in err[0]
    assert not (out / "metrics.json").exists()
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*tmp*"))  # no temporary leftovers


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory")],
)
def test_out_of_memory_is_one_line_and_no_finished_run(tmp_path, tiny_bert_dir, tiny_glue, monkeypatch, capsys, error):
    import kdlora.train

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(kdlora.train, "loop", no_memory)
    out = tmp_path / "out"
    code = main(train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--epochs", "1", "--quiet"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kdlora: error: out of memory: lower --batch-size"), err
    assert "the run is unfinished" in err[0] or "not marked finished" in err[0], err
    assert not (out / "metrics.json").exists() and not (out / ".lock").exists()
