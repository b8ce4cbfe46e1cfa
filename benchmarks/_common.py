"""Shared bits of the benchmark scripts: the MiniLM pair, CoLA data, one line per figure, JSON out."""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # the figures are the output
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # reading data is not a figure
GLUE = os.environ.get("KDLORA_GLUE_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "glue"))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--teacher", default="all-MiniLM-L6-v2", help="teacher checkpoint (default: the packaged MiniLM)")
    p.add_argument("--student-layers", default="0,2,4")
    p.add_argument("--data-dir", default=GLUE)
    p.add_argument("--output", help="JSON file (default runs/benchmarks/<script>.json)")
    return p


def layers(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


class Report:
    """Collects figures, prints one `name: value unit` line each, and writes them with the machine to JSON."""

    def __init__(self, name: str, output: str | None) -> None:
        self.name, self.figures = name, {}
        self.path = Path(output or f"runs/benchmarks/{name}.json")

    def line(self, key: str, value: float, unit: str = "", fmt: str = ".4g") -> None:
        self.figures[key] = value
        print(f"{key}: {value:{fmt}}{' ' + unit if unit else ''}", flush=True)

    def write(self, **extra: Any) -> None:
        data = {"benchmark": self.name, "figures": self.figures, "machine": machine(), **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {self.path}")


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
