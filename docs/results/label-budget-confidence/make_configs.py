"""CoLA at 1,000 labels: the LoRA teacher and KD-LoRA with the unlabelled rest, uniform against confidence-weighted."""

import pathlib

import yaml

for seed in (1, 2, 3):
    src = pathlib.Path(f"docs/results/label-budget/cola/budget-1000/seed-{seed}")
    out = pathlib.Path(f"runs/confidence/cola/budget-1000/seed-{seed}")
    dst = pathlib.Path("runs/cfg-conf")
    dst.mkdir(parents=True, exist_ok=True)
    c = yaml.safe_load((src / "lora" / "config.yaml").read_text())
    c["train"].update(output_dir=str(out / "lora"), quiet=True)
    (dst / f"s{seed}-lora.yaml").write_text(yaml.safe_dump(c, sort_keys=False))
    for name, weight in (("kd-lora-unlabeled", "uniform"), ("kd-lora-confidence", "confidence")):
        c = yaml.safe_load((src / "kd-lora-unlabeled" / "config.yaml").read_text())
        c["model"]["teacher"] = str(out / "lora")
        c["kd"]["transfer_weight"] = weight
        c["train"].update(output_dir=str(out / name), quiet=True)
        (dst / f"s{seed}-{name}.yaml").write_text(yaml.safe_dump(c, sort_keys=False))
