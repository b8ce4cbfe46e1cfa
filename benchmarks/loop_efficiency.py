"""The loop's own overhead: steps x the bare TrainStep's time / one real training epoch (goal >= 0.95).

Both arms run on parts built by the pipeline itself (`train.build` on a real `kdlora train` config: KD-LoRA on CoLA,
the packaged MiniLM's layers 0,2,4 as the student of a MiniLM teacher fine-tuned first, the default config), each
from a fresh build so both start from the same weights. The epoch arm is `loop.loop` as `kdlora train` runs it: the
loader, the loss log and its host syncs, the checkpoint checks and the epoch-end checkpoint (its evaluation runs on
a 64-sentence dev cap, said below). The bare arm runs `TrainStep` on the same batches, taken from the same loader
beforehand. The arms alternate over the repeats; the median of each is compared.

    python benchmarks/loop_efficiency.py [--train-rows 1024 --repeats 3]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import Report, layers, parser
from accelerate.utils import send_to_device

from kdlora.config import build_config
from kdlora.loop import loop
from kdlora.train import build, ensure_teacher


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loop-efficiency-"))
    values = {
        "model": {"teacher_model": args.teacher, "student_layers": layers(args.student_layers)},
        "data": {"task": "cola", "data_dir": args.data_dir, "max_train_samples": args.train_rows,
                 "max_eval_samples": 64},
        "kd": {"teacher_epochs": 1},
        "train": {"method": "kd-lora", "epochs": 1, "quiet": True, "output_dir": str(work / "student")},
    }  # fmt: skip
    teacher = ensure_teacher(build_config(values))

    def fresh(i: int):
        values["train"]["output_dir"] = str(work / f"student-{i}")
        return build(build_config(values), teacher)

    def epoch(i: int) -> tuple[float, int]:
        parts = fresh(i).parts
        start = time.perf_counter()
        record = loop(parts)
        return time.perf_counter() - start, len(record.progress.history["train_loss"])

    def bare(i: int) -> float:
        parts = fresh(i).parts
        parts.sampler.set_epoch(0)
        batches = [send_to_device(b, parts.accelerator.device) for b in parts.train_loader]
        parts.model.train()
        start = time.perf_counter()
        for batch in batches:
            parts.step(batch)
        parts.step.bad.item()  # the steps' work is done
        return time.perf_counter() - start

    epoch(0), bare(1)  # warm-up
    epochs, bares, steps = [], [], 0
    for r in range(args.repeats):
        seconds, steps = epoch(2 + 2 * r)
        epochs.append(seconds)
        bares.append(bare(3 + 2 * r))
    loop_s, bare_s = statistics.median(epochs), statistics.median(bares)
    report = Report("loop_efficiency", args.output)
    report.line("optimizer_steps", steps)
    report.line("bare_steps_s", bare_s, "s")
    report.line("loop_epoch_s", loop_s, "s (with its evaluation on 64 dev sentences and the epoch-end checkpoint)")
    report.line("loop_efficiency", bare_s / loop_s, "(goal >= 0.95)", ".3f")
    report.write(train_rows=args.train_rows, repeats=args.repeats, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
