"""The range tests' curves of `kdlora lr-find` runs, read with the shipped rule: a markdown table and one PNG each.

    python scripts/lr_probe_table.py runs/lrfind docs/results/lr-auto

Each RUN/lr.json holds the probe's lrs and raw losses; the suggestion is recomputed with kdlora.lrfind's smoothing
and rule, so curves taken before a change of the rule are read as the rule reads them now.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kdlora.io import atomic_write_text
from kdlora.lrfind import Probe, plot, smooth, suggest


def main(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    rows = ["| run | probe steps | probe s | suggestion | chosen (band) |", "|---|---:|---:|---:|---:|"]
    for lr_file in sorted(src.glob("*/lr.json")):
        name, raw = lr_file.parent.name, json.loads(lr_file.read_text())["probe"]
        smoothed = smooth(raw["losses"])
        suggestion = suggest(raw["lrs"], smoothed, raw["band"][0], raw["losses"])
        band = tuple(raw["band"])
        probe = Probe(raw["lrs"], raw["losses"], smoothed, suggestion, min(max(suggestion, band[0]), band[1]), band,
                      raw["seconds"])  # fmt: skip
        plot(probe, dest / f"{name}.png", f"{name}: lr range test")
        atomic_write_text(dest / f"{name}.json", json.dumps({"lrs": probe.lrs, "losses": probe.losses}) + "\n")
        rows.append(f"| {name} | {probe.steps} | {probe.seconds:.0f} | {suggestion:.2g} | {probe.lr:.2g} |")
    table = "\n".join(rows) + "\n"
    atomic_write_text(dest / "probes.md", table)
    print(table, end="")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
