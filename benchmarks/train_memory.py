"""Peak training memory: KD-LoRA student / LoRA teacher (goal <= 0.70) and KD-LoRA student / FFT teacher (goal <= 0.25).

Each method trains a few steps on the same full-length random batches in a fresh child process that does only that
(kdlora.bench.measure_in_child): on CUDA the peak allocated memory, on CPU the process's peak RSS. The KD-LoRA step
uses cached teacher logits, so no teacher is in its memory. The RSS of a child that only imports torch and
transformers is printed too: on CPU it is a floor that all three share.

    python benchmarks/train_memory.py [--batch-size 32 --seq-len 128]
"""

from __future__ import annotations

from _common import Report, layers, parser

from kdlora.bench import BenchArgs, measure_in_child


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    bench = BenchArgs(
        teacher=args.teacher,
        student_layers=layers(args.student_layers),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        train_steps=args.steps,
    )
    report = Report("train_memory", args.output)
    peaks = {m: measure_in_child(bench, m, 8) for m in ("fft", "lora", "kd-lora")}
    base = measure_in_child(bench, None)
    kind = peaks["fft"]["kind"]
    for m, r in peaks.items():
        report.line(f"{m}_peak_mb", r["peak_mb"], f"MB ({kind})", ".0f")
    if kind == "process_peak_rss":
        report.line("imports_only_peak_mb", base["peak_mb"], "MB (process_peak_rss)", ".0f")
        floor = base["peak_mb"]
        report.line(
            "kdlora_over_lora_above_imports",
            (peaks["kd-lora"]["peak_mb"] - floor) / (peaks["lora"]["peak_mb"] - floor),
            "",
            ".3f",
        )
        report.line(
            "kdlora_over_fft_above_imports",
            (peaks["kd-lora"]["peak_mb"] - floor) / (peaks["fft"]["peak_mb"] - floor),
            "",
            ".3f",
        )
    report.line(
        "kdlora_over_fft_peak_ratio", peaks["kd-lora"]["peak_mb"] / peaks["fft"]["peak_mb"], "(goal <= 0.25)", ".3f"
    )
    report.line(
        "kdlora_over_lora_peak_ratio", peaks["kd-lora"]["peak_mb"] / peaks["lora"]["peak_mb"], "(goal <= 0.70)", ".3f"
    )
    report.write(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, kind=kind)


if __name__ == "__main__":
    main()
