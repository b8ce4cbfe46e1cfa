"""`--lr auto` and `--on-collapse retry`: the learning-rate range test and the collapse guard.

The range test is Smith's (2017), as fastai's and Lightning's `lr_find` run it: a short run with the lr rising
exponentially, the loss smoothed, the suggestion read from the curve. It runs the run's own `TrainStep` (the same
objective, with the cached teacher targets when distilling) on the run's own batches, then puts back everything it
touched: the trainable weights, the torch RNG streams, accelerate's step counter. So a run with `--lr auto` trains
exactly as the same run given the chosen lr by hand. (torch-lr-finder drives a step of its own, `criterion(outputs,
labels)`, which cannot take the teacher's logits or accelerate's accumulation: hence this one.)

The guard: a model that predicts one class (or one value) for every evaluation row while its task loss sits at the
loss of predicting the labels' prior, epoch after epoch (at least two and half of the run), has collapsed, as a
learning rate too high for the model's width does (docs/results/paper-scale: MCC 0 in all five epochs). The run
restarts from its initial weights at the lr divided by RESTART_FACTOR, at most MAX_RESTARTS times; a non-finite loss
restarts it the same way.

The plan (given or probed lr, the curve, the restarts) is kept in the run directory, so a killed run resumes without
probing again and at the lr it had reached.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlora.checkpoint import rng_state, set_rng_state
from kdlora.errors import KdloraError
from kdlora.io import atomic_file, atomic_write_text
from kdlora.rundir import LR

PROBE_STEPS = 100  # optimizer steps of the range test (fewer when the whole run is short: see probe_steps)
PROBE_SHARE = 0.1  # at most this share of the run's optimizer steps, but never under PROBE_MIN_STEPS
PROBE_MIN_STEPS = 30
PROBE_RANGE = (1e-7, 1.0)  # the lr rises from the first to the second over the probe
SMOOTHING = 0.9  # the loss's exponential moving average, bias-corrected
DIVERGED = 4.0  # the probe stops once the smoothed loss exceeds this many times its minimum
# The suggestion is clamped to a band per kind of training: LoRA (few, freshly initialised matrices) takes steps
# 10-100x those of full fine-tuning, whose pretrained weights a large step destroys.
BANDS = {"lora": (1e-5, 1e-2), "full": (1e-6, 3e-4)}
DESCENT = 0.5  # the suggestion: where the smoothed loss has made this share of its fall (see suggest)
FLAT = 0.02  # a fall of less than this share of the starting loss is no descent: then EDGE_DIVISOR applies
EDGE_DIVISOR = 20  # no descent: the last lr before the loss rises FLAT above its start, divided by this
NOISE_WIDTHS = 5  # nor is a fall of less than this many noise widths (the raw losses' std on the plateau)
RULE = (
    "the first lr at which the smoothed loss has fallen halfway to its minimum (no fall of 2% and of 5 noise widths: "
    "a twentieth of the last lr before it rises 2% above its start)"
)
RESTART_FACTOR = 4.0
MAX_RESTARTS = 2
GUARD_MIN_STEPS = 50  # a run is not judged before its 50th optimizer step: too early to tell
PRIOR_SHARE = 0.95  # "at the prior's loss": the last quarter's mean task loss at least this share of it
UNSTABLE = 1.1  # a restart needs a quarter epoch whose mean task loss rose this far above the prior's: steps too large


class Collapse(KdloraError):
    """The run collapsed (constant predictions at the prior's loss) or its loss became non-finite: the guard may
    restart it at a lower lr."""

    def __init__(self, message: str, why: str, epoch: int | None = None) -> None:
        super().__init__(message)
        self.why, self.epoch = why, epoch


@dataclass
class Probe:
    """The range test's curve and its suggestion: the lr of each optimizer step, its loss and the smoothed loss."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float  # by RULE, before clamping
    lr: float  # clamped to the band
    band: tuple[float, float]
    seconds: float
    rule: str = RULE

    @property
    def steps(self) -> int:
        return len(self.lrs)


@dataclass
class Plan:
    """The lr a run trains at, how it was chosen and what changed it since: written to the run directory."""

    given: float | str  # --lr: a number or "auto"
    lr: float  # the lr of the current attempt
    probe: Probe | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)  # {"from", "to", "epoch", "why", "seconds"}

    @property
    def chosen_by(self) -> str:
        return "given" if self.probe is None else "auto"

    def record(self) -> dict[str, Any]:
        """What metrics.json says of the lr."""
        out: dict[str, Any] = {"lr": self.lr, "lr_chosen_by": self.chosen_by, "lr_restarts": self.restarts}
        if self.probe is not None:
            p = self.probe
            out["lr_probe"] = {"suggestion": p.suggestion, "lr": p.lr, "band": list(p.band), "rule": p.rule,
                               "steps": p.steps, "seconds": p.seconds}  # fmt: skip
        return out

    def save(self, out: Path) -> None:
        atomic_write_text(out / LR, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, out: Path) -> Plan | None:
        path = out / LR
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            probe = raw.get("probe")
            if probe is not None:
                probe = Probe(**{**probe, "band": tuple(probe["band"])})
            plan = cls(given=raw["given"], lr=float(raw["lr"]), probe=probe, restarts=list(raw.get("restarts", [])))
        except (ValueError, KeyError, TypeError) as exc:
            raise KdloraError(f"{path} is damaged ({type(exc).__name__}): rerun with --overwrite") from exc
        if not (math.isfinite(plan.lr) and plan.lr > 0):
            raise KdloraError(f"{path} is damaged (lr {plan.lr}): rerun with --overwrite")
        return plan

    def restart(self, collapse: Collapse, seconds: float) -> float:
        """The next attempt's lr after a collapse, recorded."""
        lower = self.lr / RESTART_FACTOR
        self.restarts.append(
            {"from": self.lr, "to": lower, "epoch": collapse.epoch, "why": collapse.why, "seconds": seconds}
        )
        self.lr = lower
        return lower


# ---------------------------------------------------------------------------------------------------------------------
# The range test


def probe_steps(total_steps: int, share: float | None = None, floor: int | None = None) -> int:
    """The probe's length: PROBE_STEPS, or `share` (PROBE_SHARE) of a short run's steps, never under `floor`
    (PROBE_MIN_STEPS). The two are parameters for scripts/lr_probe_share.py's projections."""
    share = PROBE_SHARE if share is None else share
    floor = PROBE_MIN_STEPS if floor is None else floor
    return max(floor, min(PROBE_STEPS, round(share * total_steps)))


class _Rising:
    """The probe's schedule: the lr of optimizer step i is lo·(hi/lo)^(i/(steps-1)). Stepped with the optimizer
    (only at the end of an accumulation), as accelerate steps a prepared scheduler."""

    def __init__(self, optimizer: Any, accelerator: Any, steps: int, lo: float, hi: float) -> None:
        self.optimizer, self.accelerator, self.steps, self.lo, self.hi = optimizer, accelerator, steps, lo, hi
        self.i = 0
        self._set()

    def lr(self, i: int) -> float:
        return self.lo * (self.hi / self.lo) ** (i / max(self.steps - 1, 1))

    def _set(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr(self.i)

    def step(self) -> None:
        if self.accelerator.sync_gradients:
            self.i += 1
            self._set()

    def get_last_lr(self) -> list[float]:
        return [self.lr(self.i)]


def _batches(loader: Any, sampler: Any, device: torch.device) -> Iterator[Any]:
    """The run's training batches, epoch after epoch of the sampler (a probe may be longer than one epoch)."""
    from accelerate.utils import send_to_device

    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            yield send_to_device(batch, device)
        epoch += 1


def smooth(losses: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (fastai's): a probe's per-step losses are too noisy to read."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(
    lrs: Sequence[float], smoothed: Sequence[float], floor: float = 0.0, raw: Sequence[float] | None = None
) -> float:
    """RULE: the first lr at which the smoothed loss has fallen halfway from its starting plateau to its lowest
    value. The plateau is the median over the steps below `floor` (the band's lower edge, where steps are too small
    to move the loss, so it differs only by batch noise; at least the first three steps), and the descent is read
    above it. The lowest point itself lies among the noisy last steps before the loss diverges, and at 768 wide it is
    where a model collapses (README, "Learning rate"): halfway down the descent the loss falls fast and the steps are
    still safe. A probe whose loss never falls by FLAT, or by NOISE_WIDTHS standard deviations of the `raw` losses
    on the plateau (a hard task, a short probe; a student cut from a fine-tuned teacher, whose loss barely falls
    before it diverges, so the fall read is noise: README, "Learning rate"), takes the last lr before the loss
    rises FLAT above its plateau, divided by EDGE_DIVISOR."""
    finite = [(s, i) for i, s in enumerate(smoothed) if math.isfinite(s)]
    if not finite:
        raise KdloraError("the learning-rate probe found no finite loss: give --lr by hand")
    n = max(3, sum(1 for _, i in finite if lrs[i] < floor))
    head = sorted(s for s, _ in finite[:n])
    start, low = head[len(head) // 2], min(finite[n:] or finite)[0]
    plateau = [raw[i] for _, i in finite[:n] if math.isfinite(raw[i])] if raw is not None else []
    noise = statistics.pstdev(plateau) if len(plateau) >= 3 else 0.0
    if len(finite) <= n or start - low < max(FLAT * start, NOISE_WIDTHS * noise):
        # No descent to read: stay well below where the loss starts to diverge.
        edge = max(i for s, i in finite if s <= start * (1 + FLAT))
        return lrs[edge] / EDGE_DIVISOR
    target = start - DESCENT * (start - low)
    return lrs[next(i for s, i in finite[n:] if s <= target)]


def range_test(
    model: Any,
    make_step: Callable[[Any, Any], Any],
    make_optimizer: Callable[[float], Any],
    loader: Any,
    sampler: Any,
    accelerator: Any,
    trainable: dict[str, torch.Tensor],
    steps: int,
    band: tuple[float, float],
    lo: float = PROBE_RANGE[0],
    hi: float = PROBE_RANGE[1],
) -> Probe:
    """Train `steps` optimizer steps with the lr rising from lo to hi (stopping early once the loss diverges), then
    put back the trainable weights, the RNG and accelerate's step counter. `make_optimizer(lr)` builds the run's
    optimizer afresh, `make_step(optimizer, scheduler)` the run's TrainStep on it."""
    saved = {n: p.detach().clone() for n, p in trainable.items()}
    rng, counter = rng_state(), accelerator.step
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    # Prepared so that accumulation and a gradient scaler behave as in the run; unregistered afterwards.
    optimizer = accelerator.prepare_optimizer(make_optimizer(lo), device_placement=False)
    schedule = _Rising(optimizer, accelerator, steps, lo, hi)
    step = make_step(optimizer, schedule)
    lrs: list[float] = []
    losses: list[float] = []
    micro: list[torch.Tensor] = []
    t0 = time.perf_counter()
    model.train()
    try:
        for batch in _batches(loader, sampler, accelerator.device):
            lr = schedule.get_last_lr()[0]
            micro.append(step(batch)[0])
            if not accelerator.sync_gradients:
                continue
            loss = accelerator.reduce(torch.stack(micro).mean(), reduction="mean").item()  # the same on every process
            micro = []
            lrs.append(lr)
            losses.append(loss)
            smoothed = smooth(losses)
            if len(lrs) >= steps or not math.isfinite(loss) or smoothed[-1] > DIVERGED * min(smoothed):
                break
    finally:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(saved[n])
        model.zero_grad(set_to_none=True)
        set_rng_state(rng)
        accelerator.step = counter
        accelerator._optimizers.remove(optimizer)  # accelerate keeps a list of what it prepared
        if scaler is not None:
            accelerator.scaler.load_state_dict(scaler)
    smoothed = smooth(losses)
    suggestion = suggest(lrs, smoothed, band[0], losses)
    return Probe(lrs, losses, smoothed, suggestion, min(max(suggestion, band[0]), band[1]), band,
                 time.perf_counter() - t0)  # fmt: skip


def plot(probe: Probe, path: Path, title: str) -> None:
    """The probe's curve (raw and smoothed loss against the lr, log scale) with the suggestion and the chosen lr."""
    import matplotlib  # deferred: only runs that probe draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [(lr, s) for lr, s in zip(probe.lrs, probe.smoothed, strict=True) if math.isfinite(s)]
    ax.plot(probe.lrs, probe.losses, color="0.75", lw=1, label="loss")
    ax.plot([lr for lr, _ in finite], [s for _, s in finite], color="C0", lw=2, label="smoothed")
    ax.axvline(probe.suggestion, color="C1", ls="--", lw=1, label=f"suggestion {probe.suggestion:.2g}")
    if probe.lr != probe.suggestion:
        ax.axvline(probe.lr, color="C2", ls="-", lw=1, label=f"chosen (clamped) {probe.lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    start = finite[0][1] if finite else 1.0  # the divergence is cut off: the plateau and the descent matter
    ax.set_ylim(bottom=min([x for x in probe.losses if math.isfinite(x)] or [0.0]) * 0.9, top=start * 1.6)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# The collapse guard


@dataclass
class Guard:
    """Judges each epoch (see the module's docstring). An epoch at the prior's loss that predicts one constant is not
    yet a collapse: a model fine-tuned in full often predicts the majority class after its first epoch and learns in
    the next (MiniLM on CoLA at 5e-5), and its logits then vary with the input as much as a collapsed model's do. So
    the run has collapsed when every epoch so far was so, for at least two epochs and half of the run, and the loss
    once rose above the prior's (UNSTABLE): the sign that the steps were too large, so that a lower lr helps. A run
    that sat at the prior's loss all along (a weak teacher, few steps) is only recorded. `retry`:
    raise Collapse for the pipeline to restart; otherwise the run goes on and `collapsed` keeps those epochs."""

    prior: float  # prior_loss of the training labels
    key: str  # the loss log's task-loss key
    steps_per_epoch: int
    epochs: int  # of the run
    retry: bool
    collapsed: list[int] = field(default_factory=list)
    learnt: bool = False  # an epoch predicted more than one value, or its loss fell below the prior's

    def after_epoch(self, epoch: int, constant: Sequence[str], history: dict[str, list[float]]) -> None:
        losses = history.get(self.key, [])
        if self.learnt or not math.isfinite(self.prior) or not losses:
            return
        tail = losses[-max(1, self.steps_per_epoch // 4) :]
        if not constant or sum(tail) / len(tail) < PRIOR_SHARE * self.prior:
            self.learnt = True  # learning: never judged again (the best epoch is kept whatever follows)
            return
        self.collapsed.append(epoch)
        window = max(1, self.steps_per_epoch // 4)
        peak = max(sum(losses[i : i + window]) / len(losses[i : i + window]) for i in range(0, len(losses), window))
        if peak < UNSTABLE * self.prior:
            return  # never worse than a constant: too little training, not too large a step (lowering would hurt)
        if len(self.collapsed) >= max(2, math.ceil(self.epochs / 2)) and len(losses) >= GUARD_MIN_STEPS:
            why = f"epochs 1-{epoch}: every {constant[0]} prediction the same, the task loss at the labels' prior"
            if self.retry:
                raise Collapse(f"the run collapsed ({why})", why, epoch)
