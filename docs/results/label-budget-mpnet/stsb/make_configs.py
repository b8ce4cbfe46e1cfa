"""Configs for the cross-size pair on STS-B at 1,000 labels (seed 1), from the MiniLM cell's configs."""

import pathlib

import yaml

src = pathlib.Path("docs/results/label-budget/stsb/budget-1000/seed-1")
out = pathlib.Path("runs/label-budget-mpnet/stsb/budget-1000/seed-1")
dst = pathlib.Path("runs/cfg-mpnet-stsb")
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
