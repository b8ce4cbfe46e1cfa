"""KD-LoRA training step / plain LoRA training step, on the same student and the same batches (goal <= 1.05).

Both arms run the training loop's own step (kdlora.loop.TrainStep: forward, objective, backward, clipping, fused
AdamW, schedule), each on its own copy of the student (MiniLM-L6 layers 0,2,4, LoRA r=8 on query/value + head), on
identical length-grouped CoLA batches from the loop's own loaders. The KD arm's batches carry teacher logits as the
cache hands them to the loop: with them the step adds only a [B, C] tensor and a KL term. The arms alternate batch by
batch so drift hits both; the median step time of each is compared.

    python benchmarks/kd_step_overhead.py [--batches 60 --repeats 3]
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time

import torch
from _common import Report, layers, parser
from accelerate.utils import send_to_device
from transformers import get_linear_schedule_with_warmup

from kdlora.config import DataArgs, KDArgs, LoraArgs, TrainArgs
from kdlora.data import build_loaders, load_splits
from kdlora.kinds import CLASSIFICATION
from kdlora.loop import TrainStep, build_accelerator, build_optimizer
from kdlora.models import build_model
from kdlora.tasks import get_task


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=60, help="batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    task, tc = get_task("cola"), TrainArgs(method="kd-lora", batch_size=args.batch_size, lr=2e-3)
    torch.manual_seed(0)
    accelerator = build_accelerator(tc)
    student, tokenizer = build_model(args.teacher, task, "kd-lora", LoraArgs(r=8), layers=layers(args.student_layers))
    steps = {}
    for method, model in (("lora", student), ("kd-lora", copy.deepcopy(student))):
        optimizer = build_optimizer(model.to(accelerator.device), tc.lr, tc.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10 * args.batches * args.repeats)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        steps[method] = TrainStep(model, optimizer, scheduler, accelerator, KDArgs(), CLASSIFICATION, tc.max_grad_norm)
        model.train()

    splits = load_splits(DataArgs(task="cola", data_dir=args.data_dir, max_eval_samples=1), ["train", "validation"])
    cache = torch.randn(len(splits["train"]), task.num_labels)  # stands in for the cache: same shape, same lookup
    row = {e.id: i for i, e in enumerate(splits["train"])}
    loaders = build_loaders(splits, tokenizer, task, 128, args.batch_size, 64, seed=0,
                            teacher_rows=lambda ids: cache[[row[i] for i in ids]])  # fmt: skip
    kd_batches = [send_to_device(b, accelerator.device) for b in itertools.islice(loaders.train, args.batches + 5)]
    lora_batches = [b._replace(teacher_logits=None) for b in kd_batches]  # the same batches without a teacher

    def timed(method: str, batch) -> float:
        start = time.perf_counter()
        steps[method](batch)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for lb, kb in zip(lora_batches[:5], kd_batches[:5], strict=True):  # warm-up
        timed("lora", lb), timed("kd-lora", kb)
    medians = {"lora": [], "kd-lora": []}
    for _ in range(args.repeats):
        times = {"lora": [], "kd-lora": []}
        for lb, kb in zip(lora_batches[5:], kd_batches[5:], strict=True):
            times["lora"].append(timed("lora", lb))
            times["kd-lora"].append(timed("kd-lora", kb))
        for method in times:
            medians[method].append(statistics.median(times[method]))
    lora_ms, kd_ms = 1000 * statistics.median(medians["lora"]), 1000 * statistics.median(medians["kd-lora"])
    report = Report("kd_step_overhead", args.output)
    report.line("lora_step_ms", lora_ms, "ms")
    report.line("kdlora_step_ms", kd_ms, "ms")
    report.line("kdlora_over_lora_step_ratio", kd_ms / lora_ms, "(goal <= 1.05)", ".3f")
    report.write(batches=args.batches, repeats=args.repeats, batch_size=args.batch_size, step="kdlora.loop.TrainStep")


if __name__ == "__main__":
    main()
