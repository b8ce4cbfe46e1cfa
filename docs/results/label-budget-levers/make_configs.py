"""Configs of the few-label levers (docs/results/label-budget-levers) and the cross-size pair with a LoRA MPNet-base
teacher (docs/results/label-budget-mpnet-best), from the committed configs of the MiniLM STS-B 1,000-label seed-1
cell. From the repository root: `python docs/results/label-budget-levers/make_configs.py`, then each arm is
`kdlora train --config runs/cfg/NAME.yaml` (teachers first)."""

import pathlib

import yaml

src = pathlib.Path("docs/results/label-budget/stsb/budget-1000/seed-1")
cfg = pathlib.Path("runs/cfg")
cfg.mkdir(parents=True, exist_ok=True)


def write(name, arm, out, **edits):
    c = yaml.safe_load((src / arm / "config.yaml").read_text())
    for key, val in edits.items():
        sect, field = key.split("__")
        c[sect][field] = val
    c["train"]["output_dir"] = out
    c["train"]["quiet"] = True
    (cfg / f"{name}.yaml").write_text(yaml.safe_dump(c, sort_keys=False))


mp = "runs/label-budget-mpnet-best/stsb/budget-1000/seed-1"
write("mpnet-lora", "lora", f"{mp}/lora", model__name="runs/models/all-mpnet-base-v2")
for arm in ("kd-lora-unlabeled", "kd-lora"):
    write(
        f"mpnet-{arm}",
        arm,
        f"{mp}/{arm}",
        model__name="all-MiniLM-L6-v2",
        model__teacher=f"{mp}/lora",
        model__student_layers=None,
    )
write("minilm-lora", "lora", "runs/label-budget/stsb/budget-1000/seed-1/lora")
write("lever-10ep", "kd-lora-unlabeled", "runs/lever/stsb-1000-s1/unlabeled-10ep", train__epochs=10)
write("lever-noise0.2", "kd-lora-unlabeled", "runs/lever/stsb-1000-s1/unlabeled-noise0.2", kd__student_noise=0.2)
# A second round (Noisy Student's iteration): the noised round-1 student labels the rest for a student of its own
# size, cut from it (all three layers), noised again.
write(
    "lever-round2",
    "kd-lora-unlabeled",
    "runs/lever/stsb-1000-s1/round2-noise0.2",
    kd__student_noise=0.2,
    model__teacher="runs/lever/stsb-1000-s1/unlabeled-noise0.2",
    model__student_layers=[0, 1, 2],
)

# The cross-size pair on MRPC: the MPNet-base FFT teacher again (as committed: 81.59), then its unlabelled-rest arm.
mm = "runs/label-budget-mpnet/mrpc/budget-1000/seed-1"
c = yaml.safe_load(pathlib.Path("docs/results/label-budget-mpnet/mrpc/budget-1000/seed-1/fft/config.yaml").read_text())
c["train"]["quiet"] = True
(cfg / "mpnet-mrpc-fft.yaml").write_text(yaml.safe_dump(c, sort_keys=False))
mrpc = pathlib.Path("docs/results/label-budget/mrpc/budget-1000/seed-1/kd-lora-unlabeled/config.yaml")
c = yaml.safe_load(mrpc.read_text())
c["model"].update(name="all-MiniLM-L6-v2", teacher=f"{mm}/fft", student_layers=None)
c["train"].update(output_dir=f"{mm}/kd-lora-unlabeled", quiet=True)
(cfg / "mpnet-mrpc-kd-lora-unlabeled.yaml").write_text(yaml.safe_dump(c, sort_keys=False))

# The longer schedule with the cross-size pair's LoRA teacher.
write(
    "mpnet-lever-10ep",
    "kd-lora-unlabeled",
    "runs/lever/stsb-1000-s1/mpnet-unlabeled-10ep",
    train__epochs=10,
    model__name="all-MiniLM-L6-v2",
    model__teacher=f"{mp}/lora",
    model__student_layers=None,
)
