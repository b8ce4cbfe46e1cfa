"""Training checkpoints: everything a killed run needs to continue exactly where it stopped.

The run directory's `checkpoint/` holds
- trainable.safetensors: the trainable parameters (LoRA + head, or the whole model for fft);
- best.safetensors: the best epoch's trainable parameters so far;
- state.pt: optimizer and scheduler state (plain tensors and numbers, read back with weights_only=True);
- rng.safetensors: the torch RNG states (dropout);
- progress.json: epoch, batches done in it, loss history, per-epoch metrics, best epoch.
The directory is written under a temporary name and swapped in, so a kill while saving leaves the previous checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdlora.errors import KdloraError
from kdlora.io import atomic_write_dir
from kdlora.rundir import checkpoint_dir


@dataclass
class Progress:
    epoch: int = 0  # the epoch to run (or continue)
    batches_done: int = 0  # micro-batches of that epoch already trained on
    history: dict[str, list[float]] = field(default_factory=dict)  # loss by optimizer step
    epochs: list[dict[str, Any]] = field(default_factory=list)  # eval metrics of finished epochs
    best_epoch: int | None = None
    best_score: float | None = None
    train_seconds: float = 0.0  # training time spent before this checkpoint, across resumes


@dataclass
class Checkpoint:
    progress: Progress
    trainable: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    rng: dict[str, torch.Tensor]


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(out: Path, ckpt: Checkpoint) -> None:
    def write(d: Path) -> None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in ckpt.trainable.items()}, str(d / "trainable.safetensors")
        )
        if ckpt.best is not None:
            save_file({k: v.contiguous() for k, v in ckpt.best.items()}, str(d / "best.safetensors"))
        torch.save(ckpt.state, d / "state.pt")
        save_file(ckpt.rng, str(d / "rng.safetensors"))
        (d / "progress.json").write_text(json.dumps(ckpt.progress.__dict__))

    atomic_write_dir(checkpoint_dir(out), write)


def load_checkpoint(out: Path) -> Checkpoint | None:
    """The checkpoint in `out`, or None when there is none. A damaged one is an error, never a silent restart."""
    d = checkpoint_dir(out)
    if not (d / "progress.json").is_file():
        return None
    try:
        progress = Progress(**json.loads((d / "progress.json").read_text()))
        trainable = {k: v.clone() for k, v in load_file(str(d / "trainable.safetensors")).items()}
        best_path = d / "best.safetensors"
        best = {k: v.clone() for k, v in load_file(str(best_path)).items()} if best_path.is_file() else None
        state = torch.load(d / "state.pt", weights_only=True)
        rng = {k: v.clone() for k, v in load_file(str(d / "rng.safetensors")).items()}
    except Exception as exc:
        raise KdloraError(f"the checkpoint in {d} is damaged ({type(exc).__name__}): rerun with --overwrite") from exc
    return Checkpoint(progress, trainable, best, state, rng)
