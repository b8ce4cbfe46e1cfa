"""KD-LoRA training step / plain LoRA training step, on the same student and the same batches (goal <= 1.05).

With cached teacher logits the KD step adds only a [B, C] tensor and a KL term to the LoRA step. Both arms train
their own copy of the student (MiniLM-L6 layers 0,2,4, LoRA r=8 on query/value + head) on identical length-grouped
CoLA batches; the arms alternate batch by batch so drift hits both; the median step time of each is compared.

    python benchmarks/kd_step_overhead.py [--batches 60 --repeats 3]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from _common import Report, layers, parser

from kdlora.config import DataArgs, LoraArgs
from kdlora.data import Collator, LengthGroupedBatchSampler, TokenizedDataset, load_splits
from kdlora.losses import distillation_loss, task_loss
from kdlora.models import add_lora, keep_layers, load_classifier
from kdlora.tasks import get_task


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=60, help="batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    task = get_task("cola")
    torch.manual_seed(0)
    base, tokenizer = load_classifier(args.teacher, task)
    student = add_lora(keep_layers(base, layers(args.student_layers)), LoraArgs(r=8))
    arms = {"lora": student, "kd-lora": copy.deepcopy(student)}
    optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-4) for k, m in arms.items()}

    examples = load_splits(DataArgs(task="cola", data_dir=args.data_dir), ["train"])["train"]
    ds = TokenizedDataset(examples, tokenizer, 128)
    ds.teacher_logits = torch.randn(len(ds), task.num_labels)  # stands in for the cache: same shape, same lookup
    collate = Collator(tokenizer, regression=False)
    order = list(LengthGroupedBatchSampler(ds.lengths, args.batch_size, seed=0))
    batches = [collate([ds[i] for i in idx]) for idx in order[: args.batches + 5]]

    def step(method: str, batch: dict[str, torch.Tensor]) -> float:
        model, opt = arms[method], optims[method]
        inputs = {k: v for k, v in batch.items() if k not in ("idx", "labels", "teacher_logits")}
        start = time.perf_counter()
        logits = model(**inputs).logits
        if method == "lora":
            loss = task_loss(logits, batch["labels"], regression=False)
        else:
            loss = distillation_loss(logits, batch["teacher_logits"], batch["labels"])[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    for m in arms.values():
        m.train()
    for b in batches[:5]:  # warm-up
        step("lora", b), step("kd-lora", b)
    medians = {"lora": [], "kd-lora": []}
    for _ in range(args.repeats):
        times = {"lora": [], "kd-lora": []}
        for b in batches[5:]:
            for method in ("lora", "kd-lora"):
                times[method].append(step(method, b))
        for method in times:
            medians[method].append(statistics.median(times[method]))
    lora_ms, kd_ms = 1000 * statistics.median(medians["lora"]), 1000 * statistics.median(medians["kd-lora"])
    report = Report("kd_step_overhead", args.output)
    report.line("lora_step_ms", lora_ms, "ms")
    report.line("kdlora_step_ms", kd_ms, "ms")
    report.line("kdlora_over_lora_step_ratio", kd_ms / lora_ms, "(goal <= 1.05)", ".3f")
    report.write(batches=args.batches, repeats=args.repeats, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
