"""`kdlora export`: ONNX that matches the PyTorch model, int8 that is scored, one-line errors, no partial output."""

import json

import pytest
from conftest import train_argv

from kdlora.cli import main

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_bert_dir, tiny_glue):
    out = tmp_path_factory.mktemp("student")
    argv = train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--epochs", "1", "--quiet")
    assert main(argv) == 0
    return out


def test_fp32_export_matches_pytorch_and_loads_like_optimum(student, tmp_path, monkeypatch):
    monkeypatch.chdir(student.parent)
    out = tmp_path / "onnx"
    assert main(["export", "--model-dir", str(student), "--output-dir", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["max_abs_logit_diff"] < 1e-4 and record["parity_data"] == "validation"
    assert record["parity_examples"] == 32 and record["exported_score"] == pytest.approx(record["pytorch_score"])
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # Dynamic axes: another batch size and length than the export's example, through a plain ORT session.
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(out)(["a"] * 5, return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()})[0]
    assert logits.shape == (5, 2)


def test_int8_is_smaller_and_scored(student, tmp_path):
    out = tmp_path / "int8"
    assert main(["export", "--model-dir", str(student), "--quantize", "int8", "--output-dir", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())
    assert record["quantize"] == "int8" and record["per_channel"] is True and not (out / "model_fp32.onnx").exists()
    assert "exported_score" in record and record["onnx_mb"] > 0


def test_export_errors_are_one_line_and_leave_nothing(student, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("train: {method: fft}\n")
    cases = {
        ("--model-dir", str(unfinished)): "is an unfinished run",
        ("--model-dir", str(student), "--format", "tflite"): "unknown export format 'tflite'",
        ("--model-dir", str(student), "--quantize", "int4"): "unknown --quantize 'int4'",
    }
    for extra, message in cases.items():
        out = tmp_path / "out"
        assert main(["export", *extra, "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not out.exists()


def test_a_model_the_exporter_cannot_trace(student, tmp_path, capsys, monkeypatch):
    import torch

    def fails(*args, **kwargs):
        raise RuntimeError("data-dependent control flow\nmany more lines")

    monkeypatch.setattr(torch.onnx, "export", fails)
    out = tmp_path / "out"
    assert main(["export", "--model-dir", str(student), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kdlora: error: the ONNX exporter could not trace this bert model: data-dependent control flow"]
    assert not out.exists()
