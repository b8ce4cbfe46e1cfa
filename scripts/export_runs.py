"""Copy the small files of every finished run under SRC to DST: what `kdlora report` needs, without the weights.

    python scripts/export_runs.py runs/results docs/results/runs

    python scripts/export_runs.py runs/variants/t1 docs/results/variants/t1 --methods kd-lora

Per run: config.yaml, metrics.json, inference.json (when timed), lr.json (the lr plan and, with --lr auto, the range
test's curve) and merged/config.json (the architecture, for the parameter counts at each rank). `kdlora report DST`
then gives the same tables as `kdlora report SRC`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from kdlora.report import find_runs
from kdlora.rundir import SMALL_FILES


def export(src: Path, dst: Path, methods: list[str] | None = None) -> None:
    """Copy the small files of the finished runs under `src` (of `methods` only, when given) to the same paths under
    `dst`."""
    runs, unfinished = find_runs(src)
    runs = [r for r in runs if not methods or r.method in methods]
    for run in runs:
        for name in SMALL_FILES:
            if (run.path / name).is_file():
                target = dst / run.path.relative_to(src) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run.path / name, target)
    print(f"copied {len(runs)} finished runs to {dst} ({len(unfinished)} unfinished left out)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--methods", help="only these methods, comma-separated (e.g. kd-lora, when fft and lora are links)")
    args = p.parse_args()
    export(Path(args.src), Path(args.dst), args.methods.split(",") if args.methods else None)


if __name__ == "__main__":
    main()
