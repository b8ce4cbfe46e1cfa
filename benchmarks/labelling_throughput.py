"""The teacher labelling a transfer set / plain inference with the same model on the same rows (goal >= 0.9).

The labelling arm is `teacher.teacher_logits` as a distilled run calls it, from an empty cache each time: the
fingerprint (weights, tokenizer, rows), loading the teacher, the batched forward passes and the cache written
atomically. The inference arm loads the same merged model and runs the same length-sorted batches of the same
size through it, nothing else. The arms alternate over the repeats; the medians are compared, as rows per second.

    python benchmarks/labelling_throughput.py --teacher-run RUN_DIR [--rows 8551 --repeats 3]

RUN_DIR is any finished run on CoLA (its merged model is the teacher), e.g. a `kdlora train --method fft` run.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import Report, parser

from kdlora.config import DataArgs
from kdlora.data import Collator, TokenizedDataset, eval_batches, load_splits, load_task
from kdlora.env import default_device
from kdlora.kinds import kind_of
from kdlora.models import load_saved
from kdlora.rundir import LOGITS
from kdlora.teacher import teacher_logits, teacher_model_dir


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--teacher-run", required=True, help="a finished run on CoLA")
    p.add_argument("--rows", type=int, default=None, help="the first N training rows (default all)")
    p.add_argument("--batch-size", type=int, default=64, help="the eval batch size both arms use")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    # A copy of the run: each labelling starts from an empty cache, and the user's cache stays as it is.
    run = Path(tempfile.mkdtemp(prefix="labelling-")) / "teacher"
    shutil.copytree(args.teacher_run, run, ignore=shutil.ignore_patterns(LOGITS, "checkpoint"))
    device = default_device()
    data = DataArgs(task="cola", data_dir=args.data_dir, max_train_samples=args.rows)
    task = load_task(data)
    rows = load_splits(data, ["train"])["train"]

    def label() -> float:
        shutil.rmtree(run / LOGITS, ignore_errors=True)  # an empty cache: the teacher labels every row
        start = time.perf_counter()
        teacher_logits(run, rows, task, 128, batch_size=args.batch_size, device=device, quiet=True)
        return time.perf_counter() - start

    @torch.inference_mode()
    def infer() -> float:
        start = time.perf_counter()
        model, tokenizer = load_saved(teacher_model_dir(run, task))
        model = model.to(device).eval()
        dataset, collate = TokenizedDataset(rows, tokenizer, 128), Collator(tokenizer, kind_of(task))
        for batch_idx in eval_batches(dataset.lengths, args.batch_size):
            batch = collate([dataset[i] for i in batch_idx])
            model(**{k: v.to(device) for k, v in batch.inputs.items()}).logits.float().cpu()
        return time.perf_counter() - start

    label(), infer()  # warm-up
    labels, infers = [], []
    for _ in range(args.repeats):
        labels.append(label())
        infers.append(infer())
    label_s, infer_s = statistics.median(labels), statistics.median(infers)
    report = Report("labelling_throughput", args.output)
    report.line("rows", len(rows))
    report.line("labelling_rows_per_s", len(rows) / label_s, "rows/s")
    report.line("inference_rows_per_s", len(rows) / infer_s, "rows/s")
    report.line("labelling_over_inference_throughput", infer_s / label_s, "(goal >= 0.9)", ".3f")
    report.write(repeats=args.repeats, batch_size=args.batch_size, teacher_run=args.teacher_run)
    shutil.rmtree(run.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
