"""Peak memory of the causal LM's distillation loss, chunked (`losses.chunked_lm_kd_sum`) against the naive form
(the [N, V] logits made whole, then `losses.topk_kd_sum` and the cross-entropy on them), forward and backward.

Each arm runs in a fresh child process that builds the inputs and then does only that work; its peak RSS less
its peak once the inputs were built is the loss's own peak. The inputs are the shapes of SmolLM2-135M (vocabulary
49,152, width 576) on N completion tokens with the teacher's top-64 cached. Both arms' losses are printed, so they
can be seen to agree.

    python benchmarks/lm_kd_memory.py [--tokens 2048 --chunk 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from _common import Report

from kdlora.losses import IGNORE, chunked_lm_kd_sum, topk_kd_sum, topk_targets


def inputs(n: int, hidden: int, vocab: int, k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    head = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[: n // 4] = IGNORE  # the prompt's tokens
    # The teacher's top-k, made 64 rows at a time so that building the inputs never holds [N, V] (it would set the
    # process's peak before the loss is measured).
    parts = [topk_targets(torch.randn(min(64, n - i), vocab, generator=g) * 2, k) for i in range(0, n, 64)]
    log_top, idx = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    return h, head, log_top.half().float(), idx, labels  # the cache stores fp16 log-probs


def child(arm: str, n: int, hidden: int, vocab: int, k: int, chunk: int) -> None:
    h, head, log_top, idx, labels = inputs(n, hidden, vocab, k)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if arm == "naive":
        logits = h @ head.T
        keep = labels != IGNORE
        ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        loss = ce + topk_kd_sum(logits, log_top, idx, keep)
    else:
        ce, kd = chunked_lm_kd_sum(h, head, log_top, idx, labels, chunk=chunk)
        loss = ce + kd
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "inputs_mb": base, "loss": float(loss.detach())}))


def measure(arm: str, args: argparse.Namespace) -> dict[str, float]:
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); from lm_kd_memory import child; "
        "child(sys.argv[1], *map(int, sys.argv[2:]))"
    )
    argv = [sys.executable, "-c", code, arm, *map(str, (args.tokens, args.hidden, args.vocab, args.k, args.chunk))]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--output", help="JSON file (default runs/benchmarks/lm_kd_memory.json)")
    args = p.parse_args()
    report = Report("lm_kd_memory", args.output)
    arms = {arm: measure(arm, args) for arm in ("naive", "chunked")}
    extra = {arm: r["peak_mb"] - r["inputs_mb"] for arm, r in arms.items()}
    for arm, r in arms.items():
        report.line(f"{arm}_loss_peak_mb", extra[arm], "MB", ".1f")
        report.line(f"{arm}_loss", r["loss"], "", ".6g")
    report.line("naive_over_chunked", extra["naive"] / max(extra["chunked"], 1e-9), "x", ".2f")
    report.line("logits_mb", args.tokens * args.vocab * 4 / 2**20, "MB (one fp32 [N, V] tensor)", ".1f")
    report.write(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, k=args.k, chunk=args.chunk,
                 measure="peak RSS of a fresh child less its peak once the inputs were built")  # fmt: skip


if __name__ == "__main__":
    main()
