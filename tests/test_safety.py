"""Loading never runs code: kdlora writes safetensors/JSON/YAML, and every torch.load is weights_only."""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kdlora"


def test_every_torch_load_is_weights_only():
    calls = [
        (p.name, m.group(0)) for p in SRC.glob("*.py") for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())
    ]
    assert calls, "the checkpoint loader uses torch.load"
    assert all("weights_only=True" in call for _, call in calls), calls


def test_remote_code_is_off_by_default():
    from kdlora.config import ModelArgs

    assert ModelArgs().trust_remote_code is False
    text = "".join(p.read_text() for p in SRC.glob("*.py"))
    assert "trust_remote_code=True" not in text


def test_run_outputs_are_safetensors_json_yaml(tmp_path, tiny_bert_dir, tiny_glue):
    from kdlora.cli import main

    out = tmp_path / "run"
    args = ["train", "--method", "lora", "--task", "cola", "--model", str(tiny_bert_dir), "--data-dir", str(tiny_glue)]
    assert main([*args, "--epochs", "1", "--quiet", "--output-dir", str(out)]) == 0
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".yaml", ".txt", ".md", ".jinja", ".png"}, suffixes
    # Atomic writes go through mkstemp/mkdtemp (0600/0700); the final outputs must carry the usual umask modes.
    import os

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o777 if (out / p).is_dir() else 0o666) & ~mask}
    assert not wrong, wrong
