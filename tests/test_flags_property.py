"""Property: for every subcommand, a value of the wrong type for any of its typed flags (a word for a number, a
non-finite number, an unknown choice, a malformed list) is one line on stderr and exit 2, with no traceback, and
every path the command would read is left byte for byte as it was."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_inputs_kept import _digest

from kdlora.bench import BenchArgs
from kdlora.cli import build_parser, main
from kdlora.compare import CompareArgs
from kdlora.config import SECTIONS, command_fields, field_flag
from kdlora.evaluate import EvaluateArgs, PredictArgs
from kdlora.export import ExportArgs
from kdlora.report import ReportArgs
from kdlora.sweep import SweepArgs

WORDS = ["x", "abc", "1.5.2", "--", "1e", "0x1g", "one", "1,,", "[1]", "é", " "]
NON_FINITE = ["nan", "inf", "-inf", "1e999", "NaN", "Infinity"]


def _members(hint: Any) -> list[Any]:
    """The types a field takes, None left out: int | None -> [int]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def bad_values(hint: Any) -> st.SearchStrategy[str] | None:
    """Values no member of `hint` accepts, or None for a field of free text (a path, a name) or a switch."""
    members = _members(hint)
    choices = [c for m in members if typing.get_origin(m) is Literal for c in typing.get_args(m)]
    plain = [m for m in members if typing.get_origin(m) is not Literal]
    if any(m in (str, bool) or typing.get_origin(m) is dict for m in plain):
        return None
    if any(typing.get_origin(m) is list for m in plain):
        inner = [typing.get_args(m)[0] for m in plain if typing.get_origin(m) is list]
        if inner != [int]:
            return None
        return st.sampled_from(["x", "1,x", "0,,1", "1.5", "a,b"])
    if not plain:  # choices only
        word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123", min_size=1, max_size=8)
        return word.filter(lambda w: w not in choices and w.lower() not in choices)
    pool = list(WORDS) + (NON_FINITE if float in plain else ["1.5", "2e-3", "nan"])
    return st.sampled_from([v for v in pool if v not in choices])


def typed_flags(fields: list[tuple[dataclasses.Field, Any]]) -> list[tuple[str, st.SearchStrategy[str]]]:
    out = []
    for f, hint in fields:
        if f.metadata.get("positional"):
            continue
        strategy = bad_values(hint)
        if strategy is not None:
            out.append((field_flag(f), strategy))
    return out


CONFIG_FLAGS = typed_flags([(f, h) for cls in SECTIONS.values() for f, h in command_fields(cls)])
COMMAND_ARGS = {"compare": CompareArgs, "sweep": SweepArgs, "bench": BenchArgs, "export": ExportArgs,
                "evaluate": EvaluateArgs, "predict": PredictArgs, "report": ReportArgs}  # fmt: skip


def parser_flags(command: str) -> list[tuple[str, st.SearchStrategy[str]]]:
    """The typed flags `kdlora <command>` takes, as its parser has them: its own dataclass's, and the config's."""
    types_of = dict(CONFIG_FLAGS)
    types_of.update(typed_flags(command_fields(COMMAND_ARGS[command])) if command in COMMAND_ARGS else [])
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    taken = {o for action in sub._actions for o in action.option_strings}
    return sorted((flag, s) for flag, s in types_of.items() if flag in taken)


@pytest.fixture(scope="module")
def commands(lora_run, tiny_bert_dir, tiny_glue, tmp_path_factory) -> dict[str, tuple[list[str], list, list[Path]]]:
    """Per subcommand: arguments that would run it, its typed flags, and the paths it reads."""
    out = tmp_path_factory.mktemp("flags")
    rows = out / "rows.csv"
    rows.write_text("sentence\nthe cat sat\na dog ran\n")
    model = ["--model", str(tiny_bert_dir), "--task", "cola", "--data-dir", str(tiny_glue)]
    reads = [tiny_glue, tiny_bert_dir, lora_run, rows]
    return {
        "train": (["train", *model, "--output-dir", str(out / "t")], parser_flags("train"), reads),
        "lr-find": (["lr-find", *model, "--output-dir", str(out / "l")], parser_flags("lr-find"), reads),
        "compare": (
            [
                "compare",
                "--tasks",
                "cola",
                "--teacher-model",
                str(tiny_bert_dir),
                "--student-layers",
                "0",
                "--data-dir",
                str(tiny_glue),
                "--output-dir",
                str(out / "c"),
            ],
            parser_flags("compare"),
            reads,
        ),  # fmt: skip
        "sweep": (["sweep", *model, "--output-dir", str(out / "s")], parser_flags("sweep"), reads),
        "bench": (
            [
                "bench",
                "--teacher-model",
                str(tiny_bert_dir),
                "--data-dir",
                str(tiny_glue),
                "--output-dir",
                str(out / "b"),
            ],
            parser_flags("bench"),
            reads,
        ),  # fmt: skip
        "export": (
            ["export", "--model-dir", str(lora_run), "--output-dir", str(out / "e")],
            parser_flags("export"),
            reads,
        ),
        "evaluate": (["evaluate", "--model-dir", str(lora_run)], parser_flags("evaluate"), reads),
        "predict": (
            ["predict", "--model-dir", str(lora_run), "--input-file", str(rows), "--output-file", str(out / "p.csv")],
            parser_flags("predict"),
            reads,
        ),
        "report": (["report", str(lora_run.parent)], parser_flags("report"), reads),
    }


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert_dir, tiny_glue) -> Path:
    from conftest import train_argv

    out = tmp_path_factory.mktemp("flagrun") / "lora"
    assert main(train_argv(tiny_glue, out, "--model", str(tiny_bert_dir), "--epochs", "1", "--quiet")) == 0
    return out


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusals
        return exc.code


def test_every_typed_flag_has_bad_values():
    # The property below covers the flags people mistype most: every numeric, choice and id-list setting.
    names = {flag for flag, _ in parser_flags("train")}
    assert {"--lr", "--rank", "--epochs", "--temperature", "--alpha", "--method", "--student-layers"} <= names
    assert math.isnan(float("nan"))  # the non-finite spellings parse as floats: refusing them is kdlora's job


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_value_of_any_flag_is_one_line_exit_2_and_touches_nothing(commands, capsys, data):
    name = data.draw(st.sampled_from(sorted(commands)), label="command")
    argv, typed, reads = commands[name]
    flag, strategy = data.draw(st.sampled_from(typed), label="flag")
    value = data.draw(strategy, label="value")
    before = [_digest(p) for p in reads]
    capsys.readouterr()
    code = _exit_code([*argv, f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (name, flag, value, err)
    assert len(err) == 1 and "Traceback" not in err[0], (name, flag, value, err)
    assert [_digest(p) for p in reads] == before
