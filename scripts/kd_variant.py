"""Rerun only the KD-LoRA arm of docs/results.md with some settings changed, against the same teachers and baselines.

    python scripts/kd_variant.py t1 --set kd-lora.kd.temperature=1
    python scripts/kd_variant.py epochs5 --set kd-lora.train.epochs=5 --seeds 1,2,3

runs/variants/NAME/<task>/seed-<s>/{fft,lora} become links to the finished arms in runs/results, which `kdlora compare`
reuses, so only kd-lora trains, distilled from the same teacher (its cached logits). The kd-lora runs' small files then
go to docs/results/variants/NAME, beside links to docs/results/runs, and `kdlora report` writes the variant's tables
there. The student's architecture is the baseline's, so its inference time is too: nothing is timed again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from export_runs import export

from kdlora.cli import main as kdlora
from kdlora.io import read_run

TASKS = "cola,mrpc,stsb,rte,wnli"


def link(path: Path, target: Path) -> None:
    """`path` -> `target` as a relative link, so that the tree still works when moved or cloned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.symlink_to(os.path.relpath(target, path.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="the variant's directory name under runs/variants and docs/results/variants")
    p.add_argument("--set", action="append", default=[], help="kd-lora.SECTION.KEY=VALUE, as for kdlora compare")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--results", default="runs/results", help="the baseline's kdlora compare output")
    p.add_argument("--docs", default="docs/results", help="where the baseline's runs were exported (DOCS/runs)")
    args = p.parse_args()
    if not all(s.startswith("kd-lora.") for s in args.set):
        sys.exit("kd_variant.py: every --set must be a kd-lora setting; the fft and lora arms are the baseline's")

    results, docs = Path(args.results), Path(args.docs)
    runs, out = Path("runs/variants") / args.name, docs / "variants" / args.name
    tasks, seeds = args.tasks.split(","), args.seeds.split(",")
    for task in tasks:
        for seed in seeds:
            for arm in ("fft", "lora"):
                where = Path(task) / f"seed-{seed}" / arm
                if read_run(results / where) is None or read_run(docs / "runs" / where) is None:
                    sys.exit(f"kd_variant.py: {where} is not finished in both {results} and {docs / 'runs'}")
                link(runs / where, results / where)
                link(out / where, docs / "runs" / where)

    common = ["--config", str(docs / "compare.yaml"), "--teacher-model", "all-MiniLM-L6-v2"]
    common += ["--student-layers", "0,2,4", "--data-dir", "../shared/glue"]
    settings = [x for s in args.set for x in ("--set", s)]
    code = kdlora(
        ["compare", *common, *settings, "--tasks", args.tasks, "--seeds", args.seeds]
        + ["--output-dir", str(runs), "--inference-runs", "0", "--quiet"]
    )
    if code:
        return code
    export(runs, out, ["kd-lora"])
    return kdlora(["report", str(out), "--quiet"])


if __name__ == "__main__":
    sys.exit(main())
