"""Epoch wall time: kdlora KD-LoRA against a re-creation of the paper code's recipe (goal: kdlora >= 5x faster).

Same data (the first N CoLA training sentences), same teacher, same student (MiniLM-L6 layers 0,2,4, LoRA r=8 on
query/value + head), same batch size, one epoch, same machine, one after the other in this process.
- paper recipe, re-created from its description: a Hugging Face `Trainer`, inputs padded to max_length (128), and the
  teacher's forward pass run inside every training step;
- kdlora: `kdlora train --method kd-lora` with dynamic padding, length-grouped batches and the teacher's logits
  computed once (that one-time cost is reported and counted in the first ratio).
The teacher is a short fft run made here (its quality does not change the timing).

    python benchmarks/epoch_vs_paper_recipe.py [--samples 1000]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import Report, layers, parser

from kdlora.config import load_config
from kdlora.data import load_splits
from kdlora.models import add_lora, keep_layers, load_classifier, load_tokenizer
from kdlora.tasks import get_task
from kdlora.train import run


def paper_recipe_seconds(teacher_dir: Path, args, examples) -> float:
    """One epoch of the re-created recipe; returns its wall time."""
    import datasets
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    task = get_task("cola")
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    base, _ = load_classifier(args.teacher, task)
    from kdlora.config import LoraArgs

    student = add_lora(keep_layers(base, layers(args.student_layers)), LoraArgs(r=8))
    tokenizer = load_tokenizer(str(teacher_dir))
    enc = tokenizer([e.text_a for e in examples], padding="max_length", truncation=True, max_length=128)
    train_ds = datasets.Dataset.from_dict({**enc, "labels": [e.label for e in examples]})

    class DistillTrainer(Trainer):  # the recipe's own shape: the teacher runs inside compute_loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            with torch.no_grad():
                t = teacher(**inputs).logits
            kl = F.kl_div(F.log_softmax(out.logits / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
            loss = 0.5 * F.cross_entropy(out.logits, labels) + 0.5 * kl
            return (loss, out) if return_outputs else loss

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=1,
            learning_rate=5e-4,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            logging_strategy="no",
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = DistillTrainer(model=student, args=targs, train_dataset=train_ds)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    report = Report("epoch_vs_paper_recipe", args.output)
    with tempfile.TemporaryDirectory() as tmp:
        common = {
            "data": {"task": "cola", "data_dir": args.data_dir, "max_eval_samples": 32},
            "train": {"batch_size": args.batch_size, "epochs": 1, "quiet": True},
        }
        teacher_run = Path(tmp) / "teacher"
        run(
            load_config(
                None,
                {
                    **common,
                    "model": {"name": args.teacher},
                    "data": {**common["data"], "max_train_samples": 64},
                    "train": {**common["train"], "method": "fft", "output_dir": str(teacher_run)},
                },
            )
        )
        kd = run(
            load_config(
                None,
                {
                    **common,
                    "model": {"teacher": str(teacher_run), "student_layers": args.student_layers},
                    "data": {**common["data"], "max_train_samples": args.samples},
                    "train": {**common["train"], "method": "kd-lora", "output_dir": str(Path(tmp) / "kd")},
                },
            )
        )
        examples = load_splits(
            load_config(None, {**common, "model": {"name": args.teacher}, "train": {"method": "fft"}}).data, ["train"]
        )["train"]
        paper = paper_recipe_seconds(teacher_run / "merged", args, examples[: args.samples])
    kd_epoch, logits = kd["train_seconds"], kd["teacher_logits_seconds"]
    report.line("paper_recipe_epoch_s", paper, "s")
    report.line("kdlora_teacher_logits_once_s", logits, "s")
    report.line("kdlora_epoch_s", kd_epoch, "s")
    report.line("speedup_epoch_with_cached_logits", paper / kd_epoch, "x", ".2f")
    report.line("speedup_epoch_plus_logits", paper / (kd_epoch + logits), "x (goal >= 5)", ".2f")
    report.write(samples=args.samples, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
