"""How far each range test's fall stands above its noise, and what the rule picks with and without its noise test.

    python scripts/lr_probe_noise.py docs/results/lr-auto

Reads every curve under DIR: the lr-find curves (<name>.json: lrs, losses) and the lr plans of the runs exported
beside them (**/lr.json). drop: the smoothed loss's fall from its plateau (the median of the steps below the band's
floor) to its minimum; noise: the standard deviation of the raw losses on the plateau's steps. "without" is the
rule before its noise test (kdlora.lrfind.suggest without the raw losses); "shipped" is the rule as it is, which
takes its no-descent branch (the last lr before the loss rises FLAT above the plateau, over EDGE_DIVISOR) where the
fall is under NOISE_WIDTHS noise widths.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from kdlora.lrfind import BANDS, smooth, suggest


def curves(root: Path) -> dict[str, tuple[list[float], list[float], tuple[float, float]]]:
    out = {}
    for f in sorted(root.glob("*.json")):
        d = json.loads(f.read_text())
        if "lrs" in d:
            out[f.stem] = (d["lrs"], d["losses"], BANDS["full" if "fft" in f.stem else "lora"])
    for f in sorted(root.glob("**/lr.json")):
        probe = json.loads(f.read_text()).get("probe")
        if probe:
            out[str(f.parent.relative_to(root))] = (probe["lrs"], probe["losses"], tuple(probe["band"]))
    return out


def main(root: Path) -> None:
    print("| curve | drop % | noise % | drop / noise | without the noise test | shipped |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (lrs, losses, (lo, hi)) in curves(root).items():
        sm = smooth(losses)
        plateau = statistics.median([v for lr, v in zip(lrs, sm, strict=True) if lr < lo])
        noise = statistics.pstdev([v for lr, v in zip(lrs, losses, strict=True) if lr < lo])
        drop = plateau - min(sm)
        without = min(max(suggest(lrs, sm, lo), lo), hi)
        shipped = min(max(suggest(lrs, sm, lo, losses), lo), hi)
        print(f"| {name} | {100 * drop / plateau:.1f} | {100 * noise / plateau:.2f} | {drop / noise:.1f} | "
              f"{without:.2e} | {shipped:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
