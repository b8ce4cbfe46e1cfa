"""`kdlora bench`: what each method costs. Parameters per rank, size on disk, peak training memory, inference time.

Methods, as in the paper's Table 2:
- fft: the teacher, every parameter trained;
- lora: LoRA on the teacher (query/value) + head;
- kd-lora: LoRA on the student (--student-layers of the teacher, or --student) + head, trained on cached teacher logits,
  so its training step holds no teacher.
The models are built from the checkpoints (untrained heads and zero-initialised LoRA B): costs do not depend on the
trained values. Peak memory is measured in a fresh child process per method that does only that method's training
steps, through the training loop's own step; inference is timed over the task's validation set, the arms interleaved
run by run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlora.config import DataArgs, KDArgs, LoraArgs, TrainArgs, arg, build_section
from kdlora.data import Batch, Collator, TokenizedDataset, eval_batches, load_splits, load_task
from kdlora.env import default_device, peak_memory, peak_rss_mb, reset_peak_memory
from kdlora.errors import KdloraError
from kdlora.export import OrtClassifier, quantize_int8, require_onnxruntime, to_onnx
from kdlora.io import atomic_write_json, atomic_write_text
from kdlora.kinds import kind_of
from kdlora.loop import TrainStep, build_accelerator, build_optimizer
from kdlora.models import build_model, count_parameters, deployed_parameters, enable_gradient_checkpointing, merge
from kdlora.tasks import Task

BENCH_METHODS = ("fft", "lora", "kd-lora")  # the paper's Table 2


@dataclass
class BenchArgs:
    teacher: str = arg(
        "all-MiniLM-L6-v2",
        "teacher checkpoint, also the LoRA baseline's base (default: the packaged MiniLM)",
        flag="--teacher-model",
        old=("--teacher",),
    )
    student: str | None = arg(
        None,
        "student checkpoint (default: --student-layers of the teacher)",
        flag="--student-model",
        old=("--student",),
    )
    student_layers: list[int] = arg([0, 2, 4], "the student: these encoder layers of the teacher")
    task: str | None = arg(None, "GLUE task (default cola), or the name of your own data")
    data_dir: str | None = arg(None, "GLUE data for the inference timing (default ../shared/glue when present)")
    data: dict[str, Any] = field(default_factory=dict)  # the user's own data: DataArgs fields (train_file, ...)
    ranks: list[int] = arg([8, 16, 32, 64], "LoRA ranks of the parameter counts")
    target_modules: list[str] | None = arg(
        None, "LoRA targets: none (query/value, as in the paper's Table 2; the default), all-linear, or names"
    )
    batch_size: int = arg(32, "training batch for the memory measurement")
    seq_len: int = arg(128, "training sequence length for the memory measurement (every sequence full)")
    train_steps: int = 3  # optimizer steps per memory measurement
    gradient_checkpointing: bool = arg(False, "measure memory with each layer's activations recomputed")
    eval_batch_size: int = arg(64, "inference batch")
    runs: int = arg(100, "timed passes over the validation set per arm (the paper's 100)")
    warmup: int = arg(2, "untimed passes first")
    max_eval_samples: int | None = arg(None, "time the first N validation examples")
    max_length: int = 128
    output_dir: str = arg("runs/bench", "where bench.json and bench.md go")
    skip_memory: bool = arg(False, "leave out the peak-memory measurement")
    max_new_tokens: int = arg(32, "causal LMs: tokens each prompt generates in the generation timing")
    onnx_dir: str | None = None  # where the int8 ONNX arms are written (default: a temporary directory)

    def __post_init__(self) -> None:
        if min(self.ranks) <= 0 or self.runs <= 0 or self.batch_size <= 0 or self.seq_len <= 0:
            raise KdloraError("--ranks, --runs, --batch-size and --seq-len must be positive")
        if self.max_new_tokens <= 0:
            raise KdloraError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")


def bench_data(args: BenchArgs) -> DataArgs:
    """The data the bench reads: a GLUE task's, or the user's own (args.data)."""
    values = {"task": args.task, "data_dir": args.data_dir, "max_eval_samples": args.max_eval_samples}
    return build_section(DataArgs, {**values, "max_length": args.max_length, **args.data}, "data")


def own_data(data: DataArgs) -> dict[str, Any]:
    """The fields of `data` that describe the user's own data (empty for GLUE), as BenchArgs.data."""
    from dataclasses import fields

    skip = ("task", "data_dir", "max_eval_samples", "max_length", "max_train_samples")
    return {f.name: getattr(data, f.name) for f in fields(data) if f.name not in skip} if data.custom else {}


def build(args: BenchArgs, method: str, rank: int, task: Task) -> tuple[torch.nn.Module, Any]:
    """The model that `method` trains, at LoRA rank `rank`, with its tokenizer (models.build_model, as in training)."""
    torch.manual_seed(0)
    student = method == "kd-lora"
    return build_model(
        args.student if student and args.student else args.teacher,
        task,
        method,
        LoraArgs(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=args.target_modules),
        layers=args.student_layers if student and not args.student else None,
    )


def merged_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of the merged model's safetensors weights on disk."""
    with tempfile.TemporaryDirectory() as d:
        merge(model).save_pretrained(d)
        return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def parameter_rows(args: BenchArgs, task: Task) -> list[dict[str, Any]]:
    """Trainable, LoRA and deployed parameters per method and rank, and the merged size on disk."""
    rows, sizes = [], {}
    for method in BENCH_METHODS:
        for rank in [None] if method == "fft" else args.ranks:
            model, _ = build(args, method, rank or 8, task)
            counts = count_parameters(model)
            if method not in sizes:
                sizes[method] = merged_size_bytes(model)
            rows.append(
                {
                    "method": method,
                    "rank": rank,
                    **counts,
                    "total_params": deployed_parameters(model),
                    "merged_size_mb": sizes[method] / 2**20,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Peak training memory, in a fresh process per method


def train_steps(args: BenchArgs, method: str, rank: int) -> dict[str, Any]:
    """Run `args.train_steps` steps of `method` through the training loop's own step (loop.TrainStep) on full-length
    random batches; return this process's peak memory. KD-LoRA's batches carry teacher logits, as the cached logits
    reach the loop: one [B, C] tensor, no teacher in memory."""
    from accelerate.utils import send_to_device
    from transformers import get_linear_schedule_with_warmup

    task, tc = load_task(bench_data(args)), TrainArgs(method=method)
    accelerator = build_accelerator(tc)
    model, _ = build(args, method, rank, task)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    lr = 1e-3 if tc.lr == "auto" else tc.lr  # a step costs the same at any lr: no range test here
    optimizer = build_optimizer(model.to(accelerator.device), lr, tc.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, args.train_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = TrainStep(model, optimizer, scheduler, accelerator, KDArgs(), kind_of(task), tc.max_grad_norm)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    if accelerator.device.type == "cuda":  # on CPU the peak is the whole child's: it does nothing else
        reset_peak_memory(accelerator.device)
    model.train()
    for _ in range(args.train_steps):
        ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (args.batch_size, args.seq_len), generator=g)
        batch = Batch(
            inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            ids=torch.arange(args.batch_size),
            labels=torch.randint(0, task.num_labels, (args.batch_size,), generator=g),
            teacher_logits=torch.randn(args.batch_size, task.num_labels, generator=g) if method == "kd-lora" else None,
        )
        step(send_to_device(batch, accelerator.device))
    peak, kind = peak_memory(accelerator.device)
    return {"peak_mb": peak, "kind": kind}


def measure_in_child(args: BenchArgs, method: str | None, rank: int = 8, module: str = "kdlora.bench") -> dict:
    """Peak memory of a fresh child process that runs only `method`'s training steps (None: imports only), by
    `module`'s `_child` (a causal LM's: kdlora.lm_bench)."""
    payload = json.dumps({"args": asdict(args), "method": method, "rank": rank})
    code = f"import sys; from {module} import _child; _child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KdloraError(f"memory measurement for {method} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(payload: str) -> None:
    data = json.loads(payload)
    args = BenchArgs(**data["args"])
    if data["method"] is None:  # the baseline: interpreter, torch and transformers imported, nothing built
        import transformers  # noqa: F401

        result = {"peak_mb": peak_rss_mb(), "kind": "process_peak_rss"}
    else:
        result = train_steps(args, data["method"], data["rank"])
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------------
# Inference


def inference_batches(args: BenchArgs, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """The task's validation set (first eval split), tokenised and padded per length-sorted batch."""

    data = bench_data(args)
    task = load_task(data)
    examples = load_splits(data, [task.eval_splits[0]])[task.eval_splits[0]]
    ds = TokenizedDataset(examples, tokenizer, args.max_length)
    collate = Collator(tokenizer, kind_of(task))
    return [collate([ds[i] for i in idx]).inputs for idx in eval_batches(ds.lengths, args.eval_batch_size)]


@torch.inference_mode()
def time_passes(
    models: dict[str, torch.nn.Module],
    batches: list[dict[str, torch.Tensor]] | dict[str, list[dict[str, torch.Tensor]]],
    runs: int,
    warmup: int,
) -> dict[str, dict[str, float]]:
    """Seconds per full pass over `batches` (one list for all, or one per model, e.g. when tokenizers differ), per
    model: warm-up, then `runs` passes, the models interleaved run by run so that drift hits them alike."""
    device = default_device()
    for m in models.values():
        m.to(device).eval()
    per_model = batches if isinstance(batches, dict) else {name: batches for name in models}
    per_model = {name: [{k: v.to(device) for k, v in b.items()} for b in bs] for name, bs in per_model.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + runs):
        for name, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in per_model[name]:
                m(**b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


def summarize(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "q1_s": q[0],
        "q3_s": q[2],
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
    }


def inference_arms(args: BenchArgs, task: Task) -> tuple[dict[str, torch.nn.Module], Any]:
    """teacher (fft), teacher + LoRA unmerged, teacher + LoRA merged, KD-LoRA student merged; LoRA at the first rank."""
    rank = args.ranks[0]
    teacher, tokenizer = build(args, "fft", rank, task)
    lora, _ = build(args, "lora", rank, task)
    lora_merged, _ = build(args, "lora", rank, task)
    student, _ = build(args, "kd-lora", rank, task)
    arms = {
        "teacher_fft": teacher,
        "teacher_lora_unmerged": lora,
        "teacher_lora_merged": merge(lora_merged),
        "student_kdlora_merged": merge(student),
    }
    arms.update(int8_arms(arms["teacher_fft"], arms["student_kdlora_merged"], tokenizer, args.onnx_dir))
    return arms, tokenizer


def int8_arms(teacher: torch.nn.Module, student: torch.nn.Module, tokenizer: Any, directory: str | None) -> dict:
    """The deployed alternatives, when kdlora[export] is installed: teacher and student as int8 ONNX Runtime models
    (the teacher's is what a user weighs against distilling). Exported as `kdlora export` does."""
    try:
        require_onnxruntime()
    except KdloraError:
        return {}
    arms = {}
    with tempfile.TemporaryDirectory(prefix="kdlora-bench-onnx-") as tmp:  # a session holds its model once created
        root = Path(directory or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for name, model in (("teacher_int8_onnx", teacher), ("student_int8_onnx", student)):
            fp32, int8 = root / f"{name}-fp32.onnx", root / f"{name}.onnx"
            to_onnx(model, tokenizer, fp32)
            quantize_int8(fp32, int8, per_channel=True)
            arms[name] = OrtClassifier(int8)
    return arms


# ---------------------------------------------------------------------------------------------------------------------


def run_bench(args: BenchArgs) -> dict[str, Any]:
    from kdlora.lm_bench import is_lm_bench, run_lm_bench

    if is_lm_bench(args):  # a causal LM's costs are per token: kdlora.lm_bench
        return run_lm_bench(args)
    task = load_task(bench_data(args))
    args.task = task.name
    result: dict[str, Any] = {
        "config": asdict(args),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    result["parameters"] = parameter_rows(args, task)
    if not args.skip_memory:
        memory = {m: measure_in_child(args, m, args.ranks[0]) for m in BENCH_METHODS}
        memory["baseline_imports"] = measure_in_child(args, None)
        result["train_memory"] = memory
    arms, tokenizer = inference_arms(args, task)
    batches = inference_batches(args, tokenizer)
    result["inference"] = {
        "examples": sum(len(b["input_ids"]) for b in batches),
        "batch_size": args.eval_batch_size,
        "merged_note": "unmerged = peft LoRA layers in the forward; merged = LoRA folded into the weights",
        "arms": time_passes(arms, batches, args.runs, args.warmup),
    }
    out = Path(args.output_dir)

    atomic_write_json(out / "bench.json", result)
    atomic_write_text(out / "bench.md", to_markdown(result))
    return result


def to_markdown(result: dict[str, Any]) -> str:
    if result.get("kind") == "generation":
        from kdlora import lm_bench

        return lm_bench.to_markdown(result)
    cfg = result["config"]
    lines = [
        f"# kdlora bench: {cfg['teacher']} -> layers {cfg['student_layers']} ({cfg['task']})",
        "",
        f"device {result['device']}, {result['torch_threads']} threads, torch {result['torch']}",
        "",
        "| method | rank | trainable | LoRA | total (deployed) | merged size (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["parameters"]:
        lines.append(
            f"| {r['method']} | {r['rank'] or '-'} | {r['trainable_params']:,} | {r['lora_params']:,} | "
            f"{r['total_params']:,} | {r['merged_size_mb']:.1f} |"
        )
    if "train_memory" in result:
        mem = result["train_memory"]
        lines += [
            "",
            f"Peak training memory, batch {cfg['batch_size']} x {cfg['seq_len']} tokens, rank "
            f"{cfg['ranks'][0]}{', gradient checkpointing' if cfg.get('gradient_checkpointing') else ''}, "
            f"{mem['fft']['kind']} of a fresh process per method:",
            "",
            "| method | peak MB |",
            "|---|---:|",
        ]
        lines += [f"| {m} | {mem[m]['peak_mb']:.0f} |" for m in (*BENCH_METHODS, "baseline_imports")]
    inf = result["inference"]
    lines += [
        "",
        f"Inference over {inf['examples']} validation examples, batch {inf['batch_size']}, "
        f"median of {cfg['runs']} passes after {cfg['warmup']} warm-up:",
        "",
        "| arm | median s/pass | q1 | q3 | examples/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in inf["arms"].items():
        lines.append(
            f"| {name} | {t['median_s']:.3f} | {t['q1_s']:.3f} | {t['q3_s']:.3f} | "
            f"{inf['examples'] / t['median_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
