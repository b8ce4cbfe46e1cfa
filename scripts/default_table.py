"""Assemble docs/results/default: the three arms with kdlora's default config, five tasks x three seeds, and report it
into docs/results (table1.csv, table2.csv, report.md, the figures).

    python scripts/default_table.py

The runs behind it (each config is kdlora's default for its method; see docs/results.md, "The default config"):
- fft: docs/results/runs (lr 5e-5, 3 epochs: the default, and the paper-settings table's FFT arm);
- lora: runs/default-lora, trained by the loop in docs/results.md (every linear layer, 5 epochs, lr 5e-4), exported
  here as real files;
- kd-lora: docs/results/variants/t1-e5-linear (T 1, 5 epochs, every linear layer, lr 2e-3, student from the
  fine-tuned teacher's layers 0,2,4), the default config's settings written out before they became the default.
The fft and kd-lora arms become relative links, so the tree still works when moved or cloned.
"""

from __future__ import annotations

import sys
from pathlib import Path

from export_runs import export
from kd_variant import link

from kdlora.cli import main as kdlora
from kdlora.rundir import read_run

TASKS = ("cola", "mrpc", "stsb", "rte", "wnli")
SEEDS = (1, 2, 3)


def main() -> int:
    docs = Path("docs/results")
    out = docs / "default"
    sources = {"fft": docs / "runs", "kd-lora": docs / "variants" / "t1-e5-linear"}
    for task in TASKS:
        for seed in SEEDS:
            for arm, root in sources.items():
                where = Path(task) / f"seed-{seed}" / arm
                if read_run(root / where) is None:
                    sys.exit(f"default_table.py: {root / where} is not a finished run")
                link(out / where, root / where)
    if Path("runs/default-lora").is_dir():
        export(Path("runs/default-lora"), out, ["lora"])
    return kdlora(["report", str(out), "--output-dir", str(docs), "--quiet"])


if __name__ == "__main__":
    sys.exit(main())
