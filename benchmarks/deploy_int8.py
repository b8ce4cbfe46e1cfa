"""Deploying the student: fp32 and int8 (ONNX Runtime) of teacher and student, score against throughput.

Exports a finished teacher run and a finished student run with `kdlora export` (fp32 and int8, the code users run),
scores every arm on the runs' validation set and times full passes over it, the arms interleaved run by run after a
warm-up (kdlora.bench.time_passes), batch 64, length-sorted batches with dynamic padding. Prints the ratios of the
deployment goals and draws pareto.png (score against examples per second) beside the JSON.

    python benchmarks/deploy_int8.py [--teacher-run runs/demo/teacher --student-run runs/demo --runs 10]

The defaults are `kdlora demo`'s outputs (the student distilled from the teacher it trained).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import Report

from kdlora.bench import time_passes
from kdlora.export import ExportArgs, OrtClassifier, run_export
from kdlora.kinds import CLASSIFICATION


def batches(tokenizer, examples, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from kdlora.data import TokenizedDataset, eval_loader

    loader = eval_loader(TokenizedDataset(examples, tokenizer, 128), tokenizer, batch_size, CLASSIFICATION)
    return [b.inputs for b in loader]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-run", default="runs/demo/teacher")
    p.add_argument("--student-run", default="runs/demo")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="JSON file (default runs/benchmarks/deploy_int8.json)")
    args = p.parse_args()

    from transformers import AutoModelForSequenceClassification

    from kdlora.export import parity_examples
    from kdlora.models import load_tokenizer, prepare_tokenizer

    models, inputs, scores, exports = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for who, run in (("teacher", args.teacher_run), ("student", args.student_run)):
            merged = Path(run) / "merged"
            model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
            tokenizer = prepare_tokenizer(load_tokenizer(str(merged)), model.config, str(merged))
            examples, task = parity_examples(ExportArgs(model_dir=run, output_dir=tmp))
            if task is None:
                raise SystemExit(f"the validation data of {run} is not here: run from the directory it was trained in")
            batch = batches(tokenizer, examples, args.batch_size)
            for quantize in ("none", "int8"):
                out = Path(tmp) / f"{who}-{quantize}"
                record = run_export(ExportArgs(model_dir=run, output_dir=str(out), quantize=quantize))
                arm = f"{who}_{'int8' if quantize == 'int8' else 'fp32_onnx'}"
                models[arm], inputs[arm], scores[arm], exports[arm] = OrtClassifier(out / "model.onnx"), batch, \
                    record["exported_score"], record  # fmt: skip
                scores[f"{who}_fp32"] = record["pytorch_score"]
            models[f"{who}_fp32"], inputs[f"{who}_fp32"] = model, batch
        timings = time_passes(models, inputs, args.runs, args.warmup)

    n = sum(len(b["input_ids"]) for b in inputs["teacher_fp32"])
    speed = {arm: n / t["median_s"] for arm, t in timings.items()}
    report = Report("deploy_int8", args.output)
    for arm in sorted(models):
        report.line(f"{arm}_score", scores[arm], "", ".2f")
        report.line(f"{arm}_examples_per_s", speed[arm], f"ex/s (median of {timings[arm]['runs']} passes)", ".1f")
    report.line("student_int8_over_teacher_fp32_throughput", speed["student_int8"] / speed["teacher_fp32"],
                "(goal >= 3.5)", ".2f")  # fmt: skip
    report.line("student_int8_minus_student_fp32_points", scores["student_int8"] - scores["student_fp32"],
                "(goal >= -0.5)", ".2f")  # fmt: skip
    report.line("student_int8_over_teacher_int8_throughput", speed["student_int8"] / speed["teacher_int8"],
                "(goal >= 1.8)", ".2f")  # fmt: skip
    report.line("student_int8_minus_teacher_int8_points", scores["student_int8"] - scores["teacher_int8"],
                "(goal >= -0.5)", ".2f")  # fmt: skip
    report.write(examples=n, batch_size=args.batch_size, runs=args.runs, timings=timings, scores=scores,
                 exports={k: {x: v for x, v in r.items() if x != "source"} for k, r in exports.items()},
                 teacher_run=args.teacher_run, student_run=args.student_run)  # fmt: skip
    pareto(scores, speed, report.path.with_name("pareto.png"))


def pareto(scores: dict[str, float], speed: dict[str, float], path: Path) -> None:
    """Score against throughput, one point per arm: up and to the right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm in scores:
        who = arm.split("_")[0]
        ax.scatter(speed[arm], scores[arm], marker="o" if who == "teacher" else "s", s=60, label=arm.replace("_", " "),
                   color={"fp32": "C0", "fp32_onnx": "C2", "int8": "C3"}[arm.split("_", 1)[1]])  # fmt: skip
    ax.legend(fontsize=8)
    ax.set_xlabel("examples per second (CPU, batch 64)")
    ax.set_ylabel("validation score")
    ax.set_title("Score against throughput: teacher and student, fp32 and int8")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
