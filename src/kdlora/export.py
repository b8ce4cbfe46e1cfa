"""`kdlora export`: a finished run's merged model as ONNX (fp32, fp16 or int8), in the layout optimum's
`ORTModelForSequenceClassification` loads (model.onnx, config.json, the tokenizer), checked against the PyTorch model
before it is called done; or as the merged safetensors model itself (--format safetensors).

A causal language model exports its logits over the whole sequence (input_ids, attention_mask -> logits, no KV cache:
each generated token reruns the prefix), checked on the run's validation rows: largest logit difference, top-1
agreement of the next token, and the completion tokens' NLL in both.

int8 is onnxruntime's dynamic quantization with per-channel weight scales: on the CoLA runs of the README it cost the
student 0.23 MCC points where per-tensor scales cost 4.1 (docs/results.md has the measurements).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlora.config import DataArgs, arg, build_section
from kdlora.data import Example, TokenizedDataset, eval_loader, load_splits, load_task
from kdlora.errors import KdloraError
from kdlora.io import atomic_write_dir
from kdlora.kinds import kind_of_model
from kdlora.lm import Encoded, LMDataset, encode_rows, is_causal_lm, lm_loader, read_rows
from kdlora.losses import IGNORE
from kdlora.models import load_causal_lm, load_saved
from kdlora.rundir import is_run, model_dir, read_config, refuse_own_inputs

FORMATS = ("onnx", "safetensors")
QUANTIZE = ("none", "fp16", "int8")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Largest logit difference to the PyTorch model that an export may show (fp16 rounds more).
TOLERANCE = {"none": 1e-3, "fp16": 5e-2}
# Sentences for the parity check when the model has no data of its own to be checked on.
PROBES = ("the cat sat on the mat .", "a dog", "no one knows what the weather will be like tomorrow , or after .")


@dataclass
class ExportArgs:
    model_dir: str = arg(MISSING, "a finished run directory (uses its merged/) or a model directory")
    output_dir: str = arg(MISSING, "the export's directory")
    format: str = arg("onnx", "onnx | safetensors (the merged model as transformers saves it, with its tokenizer)")
    quantize: str = arg("none", "none | fp16 | int8 (dynamic, per-channel weight scales)")
    # int8 with one scale per tensor cost 4 points on the student against per-channel scales
    per_tensor: bool = arg(False, "int8 with one scale per tensor (measured worse)")
    max_eval_samples: int | None = arg(None, "check parity on the first N validation examples (default all)")
    batch_size: int = arg(64, "examples per batch of the parity check")
    overwrite: bool = arg(False, "replace a non-empty --output-dir")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise KdloraError(f"unknown export format '{self.format}': choose {', '.join(FORMATS)}")
        if self.quantize not in QUANTIZE:
            raise KdloraError(f"unknown --quantize '{self.quantize}': choose {', '.join(QUANTIZE)}")
        if self.batch_size <= 0 or (self.max_eval_samples is not None and self.max_eval_samples <= 0):
            raise KdloraError("--batch-size and --max-eval-samples must be > 0")
        if self.format == "safetensors" and self.quantize != "none":
            raise KdloraError("--quantize applies to --format onnx: safetensors holds the merged model as trained")


def require_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (the torch.onnx exporter needs it)
    except ImportError:
        raise KdloraError("export needs onnx, onnxscript and onnxruntime: pip install 'kdlora[export]'") from None
    return onnxruntime


@contextlib.contextmanager
def quiet_logs() -> Any:
    """The exporter's and the quantizer's log lines (optional packages, advice) are not the user's business."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"), logging.getLogger("torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def to_onnx(model: torch.nn.Module, tokenizer: Any, path: Path) -> list[str]:
    """Export `model` (eval mode) to `path` with dynamic batch and sequence axes; returns its input names."""
    example = tokenizer(list(PROBES[:2]), padding=True, return_tensors="pt")
    names = [k for k in INPUTS if k in example]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with quiet_logs():
            torch.onnx.export(
                model.eval(),
                (),
                str(path),
                kwargs={k: example[k] for k in names},
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={k: {0: batch, 1: seq} for k in names},
                dynamo=True,
                external_data=False,
            )
    except Exception as exc:  # the exporter's errors are pages long: one line that says which model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KdloraError(f"the ONNX exporter could not trace this {model.config.model_type} model: {first}") from exc
    return names


def quantize_int8(src: Path, dst: Path, per_channel: bool) -> None:
    """Dynamic int8 weights (activations quantized on the fly), per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_logs():
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with as many intra-op threads as torch uses, so timings compare alike."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtClassifier:
    """An ONNX Runtime session that answers like a transformers classifier: model(**batch).logits (a tensor)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.session = session(path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch: Any) -> Any:
        feed = {k: np.asarray(batch[k].cpu() if torch.is_tensor(batch[k]) else batch[k], dtype=np.int64)
                for k in self.inputs}  # fmt: skip
        logits = torch.from_numpy(self.session.run(None, feed)[0])
        return type("Output", (), {"logits": logits})()

    def to(self, *_: Any) -> OrtClassifier:  # the timing loop moves and evaluates models; an ORT session needs neither
        return self

    def eval(self) -> OrtClassifier:
        return self


def run_export(args: ExportArgs) -> dict[str, Any]:
    """Export, check, and write the directory (atomically: a failed check leaves nothing). Returns export.json."""

    if args.format == "onnx":
        require_onnxruntime()
    source = model_dir(args.model_dir)  # a finished run's merged/ or a model directory; else one line
    refuse_own_inputs(args.output_dir, [("--model-dir", args.model_dir)])
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise KdloraError(f"{out} is not empty: pass --overwrite to replace it")
    if args.format == "safetensors":
        return copy_merged(source, out, args)
    causal = is_causal_lm(source)
    if causal:
        lm, tokenizer = load_causal_lm(str(source))
        model: Any = Logits(lm)
        (examples, data_label), task = lm_parity_rows(args, tokenizer), None
    else:
        model, tokenizer = load_saved(source)
        examples, task = parity_examples(args)
    model.eval()
    record: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        fp32 = tmp / ("model.onnx" if args.quantize == "none" else "model_fp32.onnx")
        names = to_onnx(model, tokenizer, fp32)
        if args.quantize == "int8":
            quantize_int8(fp32, tmp / "model.onnx", not args.per_tensor)
        elif args.quantize == "fp16":
            to_fp16(fp32, tmp / "model.onnx")
        if args.quantize != "none":
            fp32.unlink()  # the quantized model is the deliverable
        model.config.save_pretrained(tmp)
        if causal and lm.generation_config is not None:
            lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record.update(
            source=str(source), format=args.format, quantize=args.quantize, inputs=names,
            export_seconds=time.perf_counter() - start, onnx_mb=(tmp / "model.onnx").stat().st_size / 2**20,
            **({"per_channel": not args.per_tensor} if args.quantize == "int8" else {}),
        )  # fmt: skip
        exported = OrtClassifier(tmp / "model.onnx")
        if causal:
            record.update(lm_parity(model, exported, examples, tokenizer.pad_token_id, args.batch_size),
                          parity_data=data_label)  # fmt: skip
        else:
            record.update(parity(model, tokenizer, exported, examples, task, args))
        limit = TOLERANCE.get(args.quantize)
        if limit is not None and record["max_abs_logit_diff"] > limit:
            raise KdloraError(
                f"the {args.quantize if args.quantize != 'none' else 'fp32'} export does not match the PyTorch model: "
                f"largest logit difference {record['max_abs_logit_diff']:.2e} > {limit:.0e}; nothing was written"
            )
        (tmp / "export.json").write_text(json.dumps({**record, "args": asdict(args)}, indent=2) + "\n")

    atomic_write_dir(out, write)
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The merged model as it is, and causal language models


def copy_merged(source: Path, out: Path, args: ExportArgs) -> dict[str, Any]:
    """The merged model directory (safetensors weights, config, tokenizer, model card) copied whole, with each
    weight file's sha256 in export.json."""
    import hashlib
    import shutil

    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        raise KdloraError(f"{source} holds no safetensors weights")
    record: dict[str, Any] = {"source": str(source), "format": "safetensors", "quantize": "none"}

    def write(tmp: Path) -> None:
        for f in sorted(source.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        digests = {}
        for f in weights:
            h = hashlib.sha256()
            with (tmp / f.name).open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digests[f.name] = h.hexdigest()
        record.update(sha256=digests, weights_mb=sum((tmp / f.name).stat().st_size for f in weights) / 2**20)
        (tmp / "export.json").write_text(json.dumps({**record, "args": asdict(args)}, indent=2) + "\n")

    atomic_write_dir(out, write)
    return record


class Logits(torch.nn.Module):
    """A causal LM as the exporter traces it: (input_ids, attention_mask) -> logits [B, L, V], no KV cache."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def lm_parity_rows(args: ExportArgs, tokenizer: Any) -> tuple[list[Any], str]:
    """The run's validation rows as the model reads them (the first --max-eval-samples), or the probe sentences as
    plain text (every token after the first learnt) when the run's data is not here; and which of them it is."""

    if is_run(args.model_dir):
        stored = dict((read_config(args.model_dir) or {}).get("data") or {})
        stored.update(max_train_samples=None, test_file=None, max_eval_samples=args.max_eval_samples)
        try:
            data = build_section(DataArgs, stored, "data")
            return encode_rows(read_rows(data, "validation"), tokenizer, data.max_length), "validation"
        except (KdloraError, OSError):
            pass  # the run's data is not here: check on the probes
    out = []
    for i, text in enumerate(PROBES):
        ids = tokenizer(text)["input_ids"]
        out.append(Encoded(i, ids, [IGNORE] + ids[1:], ids[:1], None))
    return out, "probe sentences (the run's data is not here)"


@torch.inference_mode()
def lm_parity(model: Logits, exported: OrtClassifier, rows: list[Any], pad_id: int, batch_size: int
              ) -> dict[str, Any]:  # fmt: skip
    """Largest logit difference over every real (unpadded) position, the share of positions whose top token agrees,
    and the completion tokens' NLL of both models."""
    diff, agree, positions, nll = 0.0, 0, 0, {"pytorch": 0.0, "exported": 0.0}
    targets = 0
    for window in lm_loader(LMDataset(rows, None), batch_size, pad_id, None):
        for b in window.batches:
            ref = model(b.input_ids, b.attention_mask).float()
            got = exported(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
            real = b.attention_mask.bool()
            diff = max(diff, float((ref - got)[real].abs().max()))
            agree += int((ref.argmax(-1) == got.argmax(-1))[real].sum())
            positions += int(real.sum())
            for name, logits in (("pytorch", ref), ("exported", got)):
                at = logits[b.rows, b.positions]
                nll[name] += float(torch.nn.functional.cross_entropy(at, b.targets, reduction="sum"))
            targets += len(b.targets)
    return {
        "max_abs_logit_diff": diff, "parity_examples": len(rows), "top1_agreement": 100 * agree / max(positions, 1),
        "pytorch_nll": nll["pytorch"] / max(targets, 1), "exported_nll": nll["exported"] / max(targets, 1),
    }  # fmt: skip


def parity_examples(args: ExportArgs) -> tuple[list[Any], Any]:
    """The validation examples of the run's own data (the first --max-eval-samples), or probe sentences when the
    model directory has no run config or its data cannot be read here."""

    if is_run(args.model_dir):
        stored = dict((read_config(args.model_dir) or {}).get("data") or {})
        stored.update(max_train_samples=None, test_file=None, max_eval_samples=args.max_eval_samples)
        try:
            data = build_section(DataArgs, stored, "data")
            task = load_task(data)
            return load_splits(data, task.eval_splits[:1])[task.eval_splits[0]], task
        except KdloraError:
            pass  # the run's data is not here: check on the probes
    return [Example(i, text, None, None) for i, text in enumerate(PROBES)], None


@torch.inference_mode()
def parity(model: Any, tokenizer: Any, exported: OrtClassifier, examples: list[Any], task: Any, args: ExportArgs
           ) -> dict[str, Any]:  # fmt: skip
    """The largest logit difference between the PyTorch model and the export, and, where the run's validation data is
    at hand, both models' scores on it."""

    kind = kind_of_model(model.config)
    loader = eval_loader(TokenizedDataset(examples, tokenizer, 512), tokenizer, args.batch_size, kind)
    diff, ids, ref_logits, exp_logits = 0.0, [], [], []
    for batch in loader:
        ref = model(**batch.inputs).logits.float()
        got = exported(**batch.inputs).logits.float()
        diff = max(diff, float((ref - got).abs().max()))
        ids.append(batch.ids)
        ref_logits.append(ref)
        exp_logits.append(got)
    result: dict[str, Any] = {"max_abs_logit_diff": diff, "parity_examples": len(examples)}
    if task is not None:
        labels = np.array([e.label for e in examples])[torch.cat(ids).numpy()]
        for name, logits in (("pytorch", ref_logits), ("exported", exp_logits)):
            logits = torch.cat(logits)
            result[f"{name}_score"] = kind.metrics(task, kind.predictions(logits).numpy(), labels)["score"]
        result["score_change"] = result["exported_score"] - result["pytorch_score"]
        result["parity_data"] = "validation"
    else:
        result["parity_data"] = "probe sentences (the run's data is not here)"
    return result


def describe(record: dict[str, Any]) -> Iterable[str]:
    if record["format"] == "safetensors":
        yield f"copied the merged model of {record['source']} ({record['weights_mb']:.1f} MB of safetensors)"
        return
    yield f"exported {record['source']} as {record['quantize'] if record['quantize'] != 'none' else 'fp32'} ONNX "
    yield f"({record['onnx_mb']:.1f} MB) in {record['export_seconds']:.0f} s; "
    yield f"largest logit difference to PyTorch {record['max_abs_logit_diff']:.2e} on {record['parity_examples']} "
    yield f"examples ({record['parity_data']})"
    if "top1_agreement" in record:
        yield f"; next token the same at {record['top1_agreement']:.2f}% of positions"
        yield f"; completion NLL {record['exported_nll']:.4f} vs {record['pytorch_nll']:.4f} in PyTorch"
    if "exported_score" in record:
        yield f"; score {record['exported_score']:.2f} vs {record['pytorch_score']:.2f} in PyTorch"
