"""Inference throughput: merged KD-LoRA student / teacher with unmerged LoRA (goal >= 1.8).

Times full passes over the CoLA validation set (1043 sentences, length-sorted batches, dynamic padding) for the
teacher, the teacher with LoRA unmerged and merged, and the merged student, interleaved run by run after a warm-up
(kdlora.bench.time_passes). Throughput is examples per second at the median pass time.

    python benchmarks/inference_throughput.py [--runs 10 --batch-size 64]
"""

from __future__ import annotations

from _common import Report, layers, parser

from kdlora.bench import BenchArgs, inference_arms, inference_batches, time_passes
from kdlora.tasks import get_task


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-eval-samples", type=int)
    args = p.parse_args()
    bench = BenchArgs(
        teacher=args.teacher,
        student_layers=layers(args.student_layers),
        data_dir=args.data_dir,
        eval_batch_size=args.batch_size,
        max_eval_samples=args.max_eval_samples,
        ranks=[8],
    )
    arms, tokenizer = inference_arms(bench, get_task("cola"))
    batches = inference_batches(bench, tokenizer)
    n = sum(len(b["input_ids"]) for b in batches)
    timings = time_passes(arms, batches, args.runs, args.warmup)
    report = Report("inference_throughput", args.output)
    for name, t in timings.items():
        report.line(f"{name}_examples_per_s", n / t["median_s"], f"ex/s (median of {t['runs']} passes)", ".1f")
    ratio = timings["teacher_lora_unmerged"]["median_s"] / timings["student_kdlora_merged"]["median_s"]
    report.line("student_merged_over_teacher_lora_unmerged_throughput", ratio, "(goal >= 1.8)", ".3f")
    report.write(examples=n, batch_size=args.batch_size, runs=args.runs, timings=timings)


if __name__ == "__main__":
    main()
