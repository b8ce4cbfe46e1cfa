"""Configs for the cross-size pair at 1,000 labels (seed 1), from the MiniLM cell's configs of the same task.

    python docs/results/label-budget-mpnet/make_configs.py stsb   # or mrpc; writes runs/cfg-mpnet-<task>/<arm>.yaml

The teacher is all-mpnet-base-v2 fine-tuned in full on the cell's 1,000 labels; every student arm is
all-MiniLM-L6-v2 (its own pretrained layers, another tokenizer) distilled from it.
"""

import pathlib
import sys

import yaml

task = sys.argv[1] if len(sys.argv) > 1 else "stsb"
src = pathlib.Path(f"docs/results/label-budget/{task}/budget-1000/seed-1")
out = pathlib.Path(f"runs/label-budget-mpnet/{task}/budget-1000/seed-1")
dst = pathlib.Path(f"runs/cfg-mpnet-{task}")
dst.mkdir(parents=True, exist_ok=True)
for arm in ("fft", "student", "kd-lora", "kd-lora-unlabeled"):
    c = yaml.safe_load((src / arm / "config.yaml").read_text())
    if arm == "fft":
        c["model"]["name"] = "runs/models/all-mpnet-base-v2"
    else:
        c["model"].update(name="all-MiniLM-L6-v2", teacher=str(out / "fft"), student_layers=None)
    c["train"]["output_dir"] = str(out / arm)
    c["train"]["quiet"] = True
    (dst / f"{arm}.yaml").write_text(yaml.safe_dump(c, sort_keys=False))
