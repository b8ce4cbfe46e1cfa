"""The label-scarce protocol's report: score against the number of labelled rows, per arm, mean ± std over seeds.

A run belongs to the curve when its config keeps only `data.label_budget` labelled training rows (`kdlora compare
--label-budget`, or `kdlora train --label-budget`). Its arm is read from its config, not its directory's name:
fft and lora train on the labels alone; a kd-lora run is the student alone when α = 1, KD with the unlabelled rest
when it distils on it (`kd.unlabeled_rest`), and KD on the labelled rows otherwise.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from kdlora.io import atomic_write_bytes, atomic_write_text

# Arm names in the order the table and the figure show them, with what each one is.
CURVE_ARMS = {
    "fft": "FFT teacher (labels)",
    "lora": "LoRA, teacher's model (labels)",
    "student": "student alone (α = 1)",
    "kd-lora": "KD-LoRA (labels)",
    "kd-lora-unlabeled": "KD-LoRA + unlabelled rest",
}


def budget_of(config: dict[str, Any]) -> int | None:
    return (config.get("data") or {}).get("label_budget")


def curve_arm(config: dict[str, Any]) -> str:
    """The protocol's arm of a run, from its config."""
    method, kd = config["train"]["method"], config.get("kd") or {}
    if method not in ("kd-lora", "kd-fft"):
        return method
    if kd.get("unlabeled_rest"):
        return f"{method}-unlabeled"
    return "student" if kd.get("alpha") == 1 else method


def curve_cells(runs: list[Any]) -> dict[tuple[str, int, str], list[float]]:
    """(task, budget, arm) -> the scores of its seeds, in seed order."""
    cells: dict[tuple[str, int, str], list[tuple[int, float]]] = defaultdict(list)
    for r in runs:
        cells[r.task, budget_of(r.config), curve_arm(r.config)].append((r.seed, r.score))
    return {k: [s for _, s in sorted(v)] for k, v in cells.items()}


def _arms(cells: dict[tuple[str, int, str], list[float]]) -> list[str]:
    present = {a for _, _, a in cells}
    return [a for a in CURVE_ARMS if a in present] + sorted(present - set(CURVE_ARMS))


def _mean_std(scores: list[float]) -> tuple[float, float | None]:
    return statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else None


def curve_rows(cells: dict[tuple[str, int, str], list[float]]) -> list[dict[str, Any]]:
    """One row per task (and 'mean', over the tasks every arm of a budget has) and budget: each arm's mean, std and n.
    The task mean averages per-task means, so a task with more seeds does not weigh more."""
    arms, rows = _arms(cells), []
    tasks = sorted({t for t, _, _ in cells})
    for budget in sorted({b for _, b, _ in cells}):
        for task in tasks:
            row: dict[str, Any] = {"task": task, "budget": budget}
            for arm in arms:
                scores = cells.get((task, budget, arm))
                mean, std = _mean_std(scores) if scores else (None, None)
                row.update({arm: mean, f"{arm}_std": std, f"{arm}_n": len(scores or [])})
            rows.append(row)
        common = [t for t in tasks if all((t, budget, a) in cells for a in arms)]
        if len(common) > 1:
            row = {"task": "mean", "budget": budget, "tasks": ",".join(common)}
            for arm in arms:
                row[arm] = statistics.mean(statistics.mean(cells[t, budget, arm]) for t in common)
            rows.append(row)
    return rows


def curve_md(rows: list[dict[str, Any]], arms: list[str]) -> list[str]:
    header = ["task", "labels", *[CURVE_ARMS.get(a, a) for a in arms]]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(arms)]
    tasks = ",".join(sorted({r["task"] for r in rows if r["task"] != "mean"}))
    for row in rows:
        # a budget whose mean covers fewer tasks than the table names them: means of other tasks do not compare
        name = row["task"] if row.get("tasks", tasks) == tasks else f"mean of {row['tasks'].replace(',', ', ')}"
        cells = []
        for arm in arms:
            mean, std, n = row.get(arm), row.get(f"{arm}_std"), row.get(f"{arm}_n")
            text = "—" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
            cells.append(text + (f" ({n})" if n and n != 3 and mean is not None else ""))
        lines.append(f"| {name} | {row['budget']} | " + " | ".join(cells) + " |")
    return lines


def curve_png(cells: dict[tuple[str, int, str], list[float]], path: Path) -> None:
    """One panel per task: each arm's mean score against the labelled rows (log scale), std over seeds as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, arms = sorted({t for t, _, _ in cells}), _arms(cells)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for arm in arms:
            points = sorted((b, s) for (t, b, a), s in cells.items() if t == task and a == arm)
            if not points:
                continue
            means = [_mean_std(s)[0] for _, s in points]
            stds = [_mean_std(s)[1] or 0.0 for _, s in points]
            ax.errorbar([b for b, _ in points], means, yerr=stds, marker="o", capsize=3, label=CURVE_ARMS.get(arm, arm))
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("labelled training rows")
        ax.set_ylabel("dev score")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _csv(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))  # the mean rows add their list of tasks
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_curve(runs: list[Any], dest: Path, quiet: bool = False) -> Path:
    """label_budget.md, label_budget.csv and label_budget.png in `dest`; returns the markdown's path."""
    cells = curve_cells(runs)
    rows, arms = curve_rows(cells), _arms(cells)
    table = curve_md(rows, arms)
    lines = [
        "# When distillation pays: score against labelled rows",
        "",
        f"{len(runs)} finished runs. Dev-set score of the best epoch, mean ± std over seeds (sample std; the count "
        "in brackets where it is not 3). Each seed draws its own labelled rows, stratified by class; the student arms "
        "start from the teacher's layers.",
        "",
        *table,
        "",
        "![score against labelled rows](label_budget.png)",
    ]
    curve_png(cells, dest / "label_budget.png")
    return write_table(dest, "label_budget", lines, rows, table, quiet)


def write_table(dest: Path, stem: str, lines: list[str], rows: list[dict[str, Any]], table: list[str],
                quiet: bool) -> Path:  # fmt: skip
    """STEM.md (the lines) and STEM.csv (the rows) in `dest`, the table printed unless quiet; returns the .md's path
    (the figure STEM.png is the caller's)."""
    atomic_write_text(dest / f"{stem}.md", "\n".join(lines) + "\n")
    atomic_write_text(dest / f"{stem}.csv", _csv(rows))
    if not quiet:
        print("\n".join(table))
        print(f"\nwrote {dest / (stem + '.md')} with {stem}.csv and {stem}.png beside it")
    return dest / f"{stem}.md"
