"""The range test's share of training time, per task and over a table, measured and projected to other probe lengths.

    python scripts/lr_probe_share.py docs/results/lr-auto/default-table docs/results/paper-scale/default

Reads the metrics.json of every run under each DIR that chose its lr by the probe. "measured" is the probe's seconds
over the run's training seconds (the loop alone: the probe is not in train_seconds), summed per task and over all
runs. The other rows are projections, not measurements: each run's probe as the setting would run it, at the
seconds per probe step it measured: the steps of its curve (lr.json) that lie in the setting's lr range, at the
setting's steps per decade. A setting's share and floor are those of a probe over the shipped range's seven decades,
so a narrower range keeps the steps per decade and takes fewer steps; a probe that stopped early, once its loss
diverged, is taken to stop at the same lr. A projection says what a setting would cost, not what it would pick: any
change to the probe's length moves its picks, so a setting is judged only by rerunning the tables with it.

Last, an early stop read off the same curves: each probe cut where its smoothed loss first rises RISE above its
plateau (past the band's floor), and whether the rule's pick on the cut curve is the pick on the whole one.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from kdlora import lrfind

RISE = 0.2

SETTINGS = {  # name: (share of the run's steps, floor, lr range)
    "measured (shipped: 0.1 of the steps, at least 30, 1e-7..1)": (
        lrfind.PROBE_SHARE,
        lrfind.PROBE_MIN_STEPS,
        lrfind.PROBE_RANGE,
    ),
    "0.05 of the steps, at least 30": (0.05, 30, lrfind.PROBE_RANGE),
    "range 1e-6..1e-1 at the same steps per decade": (0.1, 30, (1e-6, 1e-1)),
    "range 1e-6..1e-1, 0.05 of the steps, at least 20": (0.05, 20, (1e-6, 1e-1)),
}


def projected(lrs: list[float], total: int, share: float, floor: int, lr_range: tuple[float, float]) -> float:
    """The steps the probe of curve `lrs` (run under the shipped setting) would take under another setting."""
    density = lrfind.probe_steps(total, share, floor) / lrfind.probe_steps(total)  # steps per decade, vs the shipped
    return density * sum(1 for lr in lrs if lr_range[0] <= lr <= lr_range[1] * (1 + 1e-9))


def cut(lrs: list[float], smoothed: list[float], floor: float) -> int:
    """The steps a probe stopping once its smoothed loss rises RISE above its plateau (as lrfind.suggest reads it:
    the median of the steps below the floor, at least three) would take."""
    n = max(3, sum(1 for lr in lrs if lr < floor))
    start = sorted(smoothed[:n])[len(smoothed[:n]) // 2]
    return next((k + 1 for k in range(n, len(lrs)) if smoothed[k] > start * (1 + RISE)), len(lrs))


def early_stop(roots: list[Path]) -> None:
    same = curves = steps = kept = 0
    for f in sorted(p for root in roots for p in root.glob("**/lr.json")):
        probe = json.loads(f.read_text()).get("probe")
        if probe:
            lrs, losses, floor = probe["lrs"], probe["losses"], probe["band"][0]
            smoothed = lrfind.smooth(losses)
            k = cut(lrs, smoothed, floor)
            same += lrfind.suggest(lrs[:k], smoothed[:k], floor, losses[:k]) == lrfind.suggest(
                lrs, smoothed, floor, losses
            )
            curves, steps, kept = curves + 1, steps + len(lrs), kept + k
    print(f"early stop at a {RISE:.0%} rise: the same pick on {same} of {curves} curves, "
          f"{100 * (1 - kept / max(steps, 1)):.1f}% of their steps saved")  # fmt: skip


def main(roots: list[Path]) -> None:
    for root in roots:
        runs = []
        for f in sorted(root.glob("**/metrics.json")):
            m = json.loads(f.read_text())
            if m.get("lr_probe"):
                task = m["task"]
                total = m.get("optimizer_steps") or len(m["train_loss"])  # older records: one loss per step
                lrs = json.loads((f.parent / "lr.json").read_text())["probe"]["lrs"]
                runs.append((task, total, lrs, m["lr_probe"], m["train_seconds"]))
        print(f"{root}: {len(runs)} runs")
        for name, setting in SETTINGS.items():
            share: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for task, total, lrs, probe, train in runs:
                seconds = probe["seconds"] / probe["steps"] * projected(lrs, total, *setting)
                for key in (task, "all"):
                    share[key][0] += seconds
                    share[key][1] += train
            cells = ", ".join(f"{k} {100 * p / t:.1f}%" for k, (p, t) in sorted(share.items()))
            print(f"  {name}: {cells}")
    early_stop(roots)


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
