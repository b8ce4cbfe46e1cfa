"""The process: which device, which process of a distributed run, printing once, and peak memory."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import torch


def process_start(pid: int) -> str | None:
    """When process `pid` started (its start time in /proc, Linux), or None where that cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int | None, start: str | None = None) -> bool:
    """Whether process `pid` on this host still runs (one we may not signal counts as running); given its recorded
    start time, a reused pid that belongs to another process does not count."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or process_start(pid) in (None, start)


def distributed_cpu() -> bool:
    """True in CPU processes started by `accelerate launch`: accelerate then joins them in a gloo process group."""
    return not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1


def process_state() -> Any:
    from accelerate import PartialState

    return PartialState(cpu=distributed_cpu())


def is_main_process() -> bool:
    return process_state().is_main_process


def say(message: str) -> None:
    """Print once, from the main process."""
    if is_main_process():
        print(message, flush=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image since its exec, whereas
    ru_maxrss also carries the parent's size at fork: a child of a large parent would report the parent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start this process's peak-RSS count afresh from its current RSS (Linux; elsewhere a no-op), so that a peak
    read later covers only what ran since: e.g. a training loop, not the teacher-logit pass before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(peak MB since the last reset, what was measured): CUDA memory allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return peak_rss_mb(), "process_peak_rss"
