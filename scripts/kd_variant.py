"""Rerun one arm of docs/results.md (KD-LoRA by default) with some settings changed, against the same other arms.

    python scripts/kd_variant.py t1 --set kd-lora.kd.temperature=1
    python scripts/kd_variant.py epochs5 --set kd-lora.train.epochs=5 --seeds 1,2,3
    python scripts/kd_variant.py lora-e5 --arm lora --set lora.train.epochs=5 --tasks cola

runs/variants/NAME/<task>/seed-<s>/<other arms> become links to the finished arms in runs/results, which `kdlora
compare` reuses, so only the chosen arm trains (a KD-LoRA student distils from the same teacher, its cached logits).
That arm's small files then go to docs/results/variants/NAME, beside links to docs/results/runs, and `kdlora report`
writes the variant's tables there. Nothing is timed again (the report shows no inference time for that arm): merged,
LoRA settings leave the deployed architecture, and so its inference time, as the baseline's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from export_runs import export

from kdlora.cli import main as kdlora
from kdlora.rundir import read_run

TASKS = "cola,mrpc,stsb,rte,wnli"
ARMS = ("fft", "lora", "kd-lora")


def link(path: Path, target: Path) -> None:
    """`path` -> `target` as a relative link, so that the tree still works when moved or cloned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.symlink_to(os.path.relpath(target, path.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="the variant's directory name under runs/variants and docs/results/variants")
    p.add_argument("--arm", default="kd-lora", choices=ARMS[1:], help="the arm that trains again (default kd-lora)")
    p.add_argument("--set", action="append", default=[], help="ARM.SECTION.KEY=VALUE, as for kdlora compare")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--results", default="runs/results", help="the baseline's kdlora compare output")
    p.add_argument("--docs", default="docs/results", help="where the baseline's runs were exported (DOCS/runs)")
    args = p.parse_args()
    others = [a for a in ARMS if a != args.arm]
    if not all(s.startswith(f"{args.arm}.") for s in args.set):
        sys.exit(f"kd_variant.py: every --set must be a {args.arm} setting; the other arms are the baseline's")

    results, docs = Path(args.results), Path(args.docs)
    runs, out = Path("runs/variants") / args.name, docs / "variants" / args.name
    tasks, seeds = args.tasks.split(","), args.seeds.split(",")
    for task in tasks:
        for seed in seeds:
            for arm in others:
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
    export(runs, out, [args.arm])
    return kdlora(["report", str(out), "--quiet"])


if __name__ == "__main__":
    sys.exit(main())
