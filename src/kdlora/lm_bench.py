"""`kdlora bench` for causal language models: what each method costs, per token.

    kdlora bench --teacher-model TEACHER.gguf --student-layers 0,2,4 [--student-model STUDENT] \\
        [--train-file train.jsonl --validation-file dev.jsonl --prompt-column prompt --completion-column completion]

Methods: fft (the teacher, every parameter), lora (LoRA on the teacher's decoder), kd-lora (LoRA on the student,
trained on the teacher's cached top-k, so its step holds no teacher). Figures:
- parameters per method and LoRA rank, and the deployed model's weights in MB (LoRA merged, tied weights once);
- training: tokens per second and peak memory of a fresh child process per method that runs only lm.LMStep, the
  training loop's own step, on full-length random batches (every position learnt; kd-lora's carry random top-k
  targets shaped as the cache gives them);
- the teacher's cache: its bytes per token and the teacher's tokens per second while it fills one (lm's own
  topk_cache.fill_from_model), on the validation rows of your data or on random sequences;
- greedy generation, tokens per second, teacher against the student with LoRA unmerged and merged, interleaved run by
  run: every row generates exactly --max-new-tokens tokens from the validation prompts (or random ones), with the KV
  cache. Models are built from the checkpoints (LoRA B zero-initialised): costs do not depend on trained values.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kdlora.config import KDArgs, LoraArgs, TrainArgs, build_section
from kdlora.env import default_device, peak_memory, reset_peak_memory
from kdlora.io import atomic_write_json, atomic_write_text
from kdlora.models import (
    add_lm_lora,
    count_parameters,
    deployed_parameters,
    enable_gradient_checkpointing,
    keep_layers,
    load_causal_lm,
    merge,
)

METHODS = ("fft", "lora", "kd-lora")


def is_lm_bench(args: Any) -> bool:
    """Whether `kdlora bench` is asked about a causal LM: its data names an LM column, or its teacher is one."""
    from kdlora.lm import is_causal_lm

    if any(args.data.get(c) for c in ("prompt_column", "completion_column", "messages_column", "text_column")):
        return True
    teacher = Path(args.teacher).expanduser()
    if teacher.suffix == ".gguf":
        return True
    return (teacher / "config.json").is_file() and is_causal_lm(teacher)


def build(args: Any, method: str, rank: int) -> tuple[torch.nn.Module, Any]:
    """The model `method` trains at LoRA rank `rank`, and its tokenizer: the teacher (fft, lora) or the student
    (--student-model, or --student-layers of the teacher), with LoRA on every decoder linear layer."""
    torch.manual_seed(0)
    student = method == "kd-lora"
    model, tokenizer = load_causal_lm(args.student if student and args.student else args.teacher)
    if student and not args.student:
        keep_layers(model, args.student_layers)
    if method != "fft":
        model = add_lm_lora(model, LoraArgs(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=args.target_modules))  # fmt: skip
    return model, tokenizer


def weights_mb(model: torch.nn.Module) -> float:
    """The deployed model's weights (LoRA merged), each tensor once (a tied LM head is the embedding)."""
    seen, total = set(), 0
    for p in merge(model).parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / 2**20


def parameter_rows(args: Any) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        for rank in [None] if method == "fft" else args.ranks:
            model, _ = build(args, method, rank or 8)
            rows.append({"method": method, "rank": rank, **count_parameters(model),
                         "total_params": deployed_parameters(model), "weights_mb": weights_mb(model)})  # fmt: skip
            del model
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Training: tokens per second and peak memory, in a fresh process per method


def train_steps(args: Any, method: str, rank: int) -> dict[str, Any]:
    """`args.train_steps` optimizer steps of lm.LMStep on random [batch, seq_len] rows, every position learnt; the
    first is a warm-up. Returns tokens per second (median step) and this process's peak memory."""
    from accelerate.utils import send_to_device
    from transformers import get_linear_schedule_with_warmup

    from kdlora.lm import HiddenStates, LMBatch, LMStep, Window
    from kdlora.loop import build_accelerator, build_optimizer

    tc, kd = TrainArgs(method=method), KDArgs()
    accelerator = build_accelerator(tc)
    model, _ = build(args, method, rank)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    wrapped = HiddenStates(model, vocab).to(accelerator.device)
    optimizer = build_optimizer(wrapped, 1e-4, tc.weight_decay)  # a step costs the same at any lr
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, args.train_steps)
    wrapped, optimizer, scheduler = accelerator.prepare(wrapped, optimizer, scheduler)
    distilled = method == "kd-lora"
    step = LMStep(wrapped, optimizer, scheduler, accelerator, kd, tc.max_grad_norm, distilled)
    g = torch.Generator().manual_seed(0)
    b, n, k = args.batch_size, args.seq_len, min(kd.teacher_top_k, vocab)
    rows, positions = torch.arange(b).repeat_interleave(n - 1), torch.arange(n - 1).repeat(b)
    if accelerator.device.type == "cuda":  # on CPU the peak is the whole child's: it does nothing else
        reset_peak_memory(accelerator.device)
    wrapped.train()
    seconds = []
    for _ in range(max(args.train_steps, 2)):
        ids = torch.randint(0, vocab, (b, n), generator=g)
        top = torch.log_softmax(torch.randn(b * (n - 1), k, generator=g), -1) - 0.05 if distilled else None
        batch = LMBatch(
            ids, torch.ones_like(ids), rows, positions, ids[:, 1:].reshape(-1), top,
            torch.randint(0, vocab, (b * (n - 1), k), generator=g) if distilled else None,
            torch.full((b * (n - 1),), -3.0) if distilled else None,
        )  # fmt: skip
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(Window((send_to_device(batch, accelerator.device),)))
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak, kind = peak_memory(accelerator.device)
    median = sorted(seconds[1:])[len(seconds[1:]) // 2]
    return {"peak_mb": peak, "kind": kind, "tokens_per_second": b * n / median, "step_seconds": seconds[1:]}


def _child(payload: str) -> None:
    from kdlora.bench import BenchArgs

    data = json.loads(payload)
    print(json.dumps(train_steps(BenchArgs(**data["args"]), data["method"], data["rank"])))


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's cache and generation


def bench_rows(args: Any, tokenizer: Any) -> list[Any]:
    """The validation rows of the user's data (the first --max-eval-samples), or 64 random rows of --seq-len tokens
    whose second half is learnt."""
    from kdlora.config import DataArgs
    from kdlora.lm import Encoded, encode_rows, read_rows
    from kdlora.losses import IGNORE

    if args.data:
        data = build_section(DataArgs, {"task": args.task or "lm", "max_length": args.max_length,
                                        "max_eval_samples": args.max_eval_samples, **args.data}, "data")  # fmt: skip
        return encode_rows(read_rows(data, "validation"), tokenizer, data.max_length)
    g = torch.Generator().manual_seed(0)
    n, half = args.seq_len, args.seq_len // 2
    rows = []
    for i in range(args.max_eval_samples or 64):
        ids = torch.randint(0, len(tokenizer), (n,), generator=g).tolist()
        rows.append(Encoded(i, ids, [IGNORE] * half + ids[half:], ids[:half], None))
    return rows


def cache_figures(teacher: torch.nn.Module, rows: list[Any], batch_size: int, pad_id: int) -> dict[str, Any]:
    """Fill a throwaway top-k cache from the teacher, as training does: bytes per token and teacher tokens/s."""
    from kdlora.topk_cache import DEFAULT_K, TopKCache, fill_from_model, predicted

    vocab = teacher.get_output_embeddings().weight.shape[0]
    with tempfile.TemporaryDirectory(prefix="kdlora-bench-topk-") as tmp:
        cache = TopKCache(tmp, {"bench": True}, min(DEFAULT_K, vocab))
        start = time.perf_counter()
        fill_from_model(cache, teacher, [(r.input_ids, r.labels) for r in rows], vocab, batch_size, pad_id)
        seconds = time.perf_counter() - start
        read = sum(len(r.input_ids) for r in rows)
        return {"k": cache.k, "bytes_per_token": cache.bytes_per_token(), "rows": len(rows),
                "cached_tokens": sum(len(predicted(r.labels)) for r in rows), "seconds": seconds,
                "teacher_tokens_per_second": read / seconds}  # fmt: skip


@torch.inference_mode()
def time_generation(models: dict[str, torch.nn.Module], rows: list[Any], pad_id: int, args: Any) -> dict[str, Any]:
    """Greedy decoding of exactly --max-new-tokens tokens for the first --eval-batch-size prompts (left-padded), per
    model: warm-up, then --runs passes, the models interleaved run by run."""
    from kdlora.bench import summarize

    device = default_device()
    prompts = [r.prompt_ids for r in rows[: args.eval_batch_size]]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    n = args.max_new_tokens
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m.to(device).eval()
    for i in range(args.warmup + args.runs):
        for name, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=pad_id)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    arms = {}
    for name, t in times.items():
        s = summarize(t)
        arms[name] = {**s, "tokens_per_second": len(prompts) * n / s["median_s"]}
    return {"rows": len(prompts), "prompt_width": width, "new_tokens": n, "arms": arms}


# ---------------------------------------------------------------------------------------------------------------------


def run_lm_bench(args: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "kind": "generation",
        "config": asdict(args),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parameters": parameter_rows(args),
    }
    if not args.skip_memory:
        from kdlora.bench import measure_in_child

        result["train"] = {m: measure_in_child(args, m, args.ranks[0], "kdlora.lm_bench") for m in METHODS}
    teacher, tokenizer = build(args, "fft", args.ranks[0])
    rows = bench_rows(args, tokenizer)
    result["teacher_cache"] = cache_figures(teacher.to(default_device()), rows, args.eval_batch_size,
                                            tokenizer.pad_token_id)  # fmt: skip
    student, _ = build(args, "kd-lora", args.ranks[0])
    merged, _ = build(args, "kd-lora", args.ranks[0])
    models = {"teacher": teacher, "student_lora_unmerged": student, "student_merged": merge(merged)}
    result["generation"] = time_generation(models, rows, tokenizer.pad_token_id, args)
    out = Path(args.output_dir)
    atomic_write_json(out / "bench.json", result)
    atomic_write_text(out / "bench.md", to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    student = cfg["student"] or f"layers {cfg['student_layers']} of the teacher"
    lines = [
        f"# kdlora bench: {cfg['teacher']} -> {student} (causal LM)",
        "",
        f"device {result['device']}, {result['torch_threads']} threads, torch {result['torch']}",
        "",
        "| method | rank | trainable | LoRA | total (deployed) | weights (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["parameters"]:
        lines.append(f"| {r['method']} | {r['rank'] or '-'} | {r['trainable_params']:,} | {r['lora_params']:,} | "
                     f"{r['total_params']:,} | {r['weights_mb']:.1f} |")  # fmt: skip
    if "train" in result:
        train = result["train"]
        lines += [
            "",
            f"Training, batch {cfg['batch_size']} x {cfg['seq_len']} tokens (every position learnt), rank "
            f"{cfg['ranks'][0]}, median of {cfg['train_steps'] - 1 if cfg['train_steps'] > 2 else 1} steps after a "
            f"warm-up; {train['fft']['kind']} of a fresh process per method:",
            "",
            "| method | tokens/s | peak MB |",
            "|---|---:|---:|",
            *[f"| {m} | {train[m]['tokens_per_second']:.1f} | {train[m]['peak_mb']:.0f} |" for m in METHODS],
        ]
    c = result["teacher_cache"]
    lines += [
        "",
        f"Teacher cache (top-{c['k']}): {c['bytes_per_token']:.1f} bytes per cached token; the teacher read "
        f"{c['teacher_tokens_per_second']:.1f} tokens/s filling it ({c['rows']} rows, {c['cached_tokens']} cached "
        "tokens).",
    ]
    gen = result["generation"]
    lines += [
        "",
        f"Greedy generation, {gen['rows']} prompts (padded to {gen['prompt_width']} tokens), exactly "
        f"{gen['new_tokens']} new tokens each, KV cache, median of {cfg['runs']} runs after {cfg['warmup']} warm-up:",
        "",
        "| arm | median s | q1 | q3 | tokens/s | speed-up over the teacher |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = gen["arms"]["teacher"]["median_s"]
    for name, t in gen["arms"].items():
        lines.append(f"| {name} | {t['median_s']:.3f} | {t['q1_s']:.3f} | {t['q3_s']:.3f} | "
                     f"{t['tokens_per_second']:.1f} | {base / t['median_s']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"
