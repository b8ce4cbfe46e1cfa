"""`kdlora report RUNS_DIR`: Table 1, Table 2 and Figure 2 of the paper from finished run directories.

Every directory under RUNS_DIR with a config.yaml is a run, whatever command made it (train, demo, compare, sweep).
Runs count only when their metrics.json says finished; the others are listed as unfinished. Runs of one task and
method with the same config but for the seed are seeds of one config (mean ± std); several configs of one task and
method (a sweep) are summarised as the paper does, by the median of the top-k config scores.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from kdlora.config import DISTILLED, LORA_METHODS, METHODS, LoraArgs, arg
from kdlora.curve import budget_of, write_curve, write_table
from kdlora.errors import KdloraError
from kdlora.io import atomic_write_bytes, atomic_write_text
from kdlora.models import build_model, count_parameters, deployed_parameters
from kdlora.rundir import CHECKPOINT, CONFIG, merged_dir, read_config, read_inference, read_run, result_config
from kdlora.tasks import task_of_model

RANKS = (8, 16, 32, 64)


@dataclass
class ReportArgs:
    """`kdlora report`."""

    runs_dir: str = arg(
        MISSING, "directory searched for run directories (train, demo, compare or sweep outputs)", positional=True
    )
    top_k: int = arg(6, "configs in the median when a task and method has several")
    task: str | None = arg(None, "task of Table 2 and Figure 2 (default cola when present)")
    output_dir: str | None = arg(None, "write the report here instead of into RUNS_DIR")
    quiet: bool = arg(False, "print nothing but errors")

    def __post_init__(self) -> None:
        if self.top_k <= 0:
            raise KdloraError(f"--top-k must be > 0, got {self.top_k}")


@dataclass
class Run:
    path: Path
    task: str
    method: str
    seed: int
    score: float
    metrics: dict[str, Any]
    config: dict[str, Any]
    key: str  # the config without seed and paths: runs with the same key are seeds of one config

    @property
    def inference(self) -> dict[str, Any] | None:
        return read_inference(self.path)

    @property
    def lr(self) -> tuple[float | None, str]:
        """The lr it trained at and how it was reached: auto (the range test), given, or given then lowered by
        the collapse guard. Runs from before --lr auto recorded it only in their config."""
        lr = self.metrics.get("lr", self.config.get("train", {}).get("lr"))
        how = self.metrics.get("lr_chosen_by", "given") + ("+restart" if self.metrics.get("lr_restarts") else "")
        return (float(lr) if isinstance(lr, (int, float)) else None), how

    @property
    def merged_mb(self) -> float | None:
        """Size of the merged model's weights: as the run recorded it, else as found on disk."""
        if self.metrics.get("merged_mb") is not None:
            return float(self.metrics["merged_mb"])
        files = list(merged_dir(self.path).glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) / 2**20 if files else None


def config_key(config: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    """Runs with the same key are seeds of one config: the config as compared between runs (rundir.result_config),
    less the seed and the teacher's run directory (a KD-LoRA run of seed s distils from the FFT run of seed s), with
    the LoRA targets the run recorded in `metrics` (so all-linear and the same modules listed by name agree)."""
    cfg = result_config(config)
    cfg.get("train", {}).pop("seed", None)
    cfg.get("model", {}).pop("teacher", None)
    if (metrics or {}).get("lora_target_modules") and "lora" in cfg:
        cfg["lora"]["target_modules"] = metrics["lora_target_modules"]
    return json.dumps(cfg, sort_keys=True, default=str)


def _config_dirs(root: Path) -> list[Path]:
    """Directories under `root` holding a config.yaml, through symlinked directories too (so that a tree of links
    can put runs of several experiments side by side), each real directory once."""
    seen: set[str] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or a second link to the same runs
            dirnames.clear()
            continue
        seen.add(real)
        # Skip temporary directories of atomic writes and checkpoints; real directories before links, so that a run
        # reached both ways is listed under its own path.
        keep = [d for d in dirnames if not d.startswith(".") and d != CHECKPOINT]
        links = {d for d in keep if os.path.islink(os.path.join(dirpath, d))}
        dirnames[:] = sorted(set(keep) - links) + sorted(links)
        if CONFIG in filenames:
            found.append(Path(dirpath))
    return sorted(found)


def find_runs(root: Path) -> tuple[list[Run], list[Path]]:
    """Finished runs and unfinished run directories under `root` (a run directory itself counts too)."""
    if not root.is_dir():
        raise KdloraError(f"{root} is not a directory")
    finished, unfinished = [], []
    for run_dir in _config_dirs(root):
        metrics, config = read_run(run_dir), read_config(run_dir)
        if config is None:
            continue  # not a kdlora run's config
        method = config["train"]["method"]
        score = metrics.get("score") if metrics is not None else None
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            unfinished.append(run_dir)  # unfinished, or a record without a numeric score: not counted
            continue
        finished.append(
            Run(
                path=run_dir,
                task=metrics["task"],
                method=method,
                seed=config["train"]["seed"],
                score=float(metrics["score"]),
                metrics=metrics,
                config=config,
                key=config_key(config, metrics),
            )
        )
    return finished, unfinished


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation


def median_top_k(scores: Sequence[float], k: int = 6) -> float:
    """The median of the k best scores (all of them when there are fewer): the paper's summary of a sweep."""
    if not scores:
        raise ValueError("no scores")
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    return statistics.median(sorted(scores, reverse=True)[:k])


@dataclass
class Cell:
    """One task and method: mean ± std over the seeds of one config, or the median of the top-k configs."""

    value: float
    std: float | None
    n: int
    how: str
    seeds: dict[int, float] = field(default_factory=dict)  # per-seed scores of a single config
    runs: list[Run] = field(default_factory=list)  # the runs behind the value (the top-k configs' for a sweep)

    def text(self) -> str:
        return f"{self.value:.2f} ± {self.std:.2f}" if self.std is not None else f"{self.value:.2f}"


def aggregate(runs: list[Run], top_k: int = 6) -> Cell:
    configs: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        configs[r.key].append(r)
    if len(configs) == 1:
        group = sorted(runs, key=lambda r: r.seed)
        scores = [r.score for r in group]
        std = statistics.stdev(scores) if len(scores) > 1 else None
        how = f"{len(scores)} seed{'s' * (len(scores) > 1)}"
        return Cell(statistics.mean(scores), std, len(scores), how, {r.seed: r.score for r in group}, group)
    means = sorted(((statistics.mean(r.score for r in g), g) for g in configs.values()), key=lambda x: -x[0])
    top = means[:top_k]
    how = f"median of top {len(top)} of {len(means)} configs"
    value = median_top_k([m for m, _ in means], top_k)
    return Cell(value, None, len(runs), how, {}, [r for _, g in top for r in g])


def table_cells(runs: list[Run], top_k: int) -> dict[tuple[str, str], Cell]:
    by: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        by[r.task, r.method].append(r)
    return {key: aggregate(group, top_k) for key, group in by.items()}


def _pct(a: float, b: float | None) -> float | None:
    return 100 * a / b if b else None


def _methods(cells: dict[tuple[str, str], Cell]) -> list[str]:
    present = {m for _, m in cells}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def averages(cells: dict[tuple[str, str], Cell]) -> tuple[list[str], dict[str, Cell]]:
    """The GLUE average per method over the tasks that every method has; std over seeds where every task has them."""
    methods = _methods(cells)
    tasks = sorted({t for t, _ in cells})
    common = [t for t in tasks if all((t, m) in cells for m in methods)]
    result = {}
    for m in methods:
        if not common:
            continue
        row = [cells[t, m] for t in common]
        seeds = set.intersection(*(set(c.seeds) for c in row)) if all(c.seeds for c in row) else set()
        per_seed = [statistics.mean(c.seeds[s] for c in row) for s in sorted(seeds)]
        std = statistics.stdev(per_seed) if len(per_seed) > 1 else None
        result[m] = Cell(statistics.mean(c.value for c in row), std, len(common), f"{len(common)} tasks")
    return common, result


# ---------------------------------------------------------------------------------------------------------------------
# Parameters at ranks, counted on the real peft-wrapped models built from the runs' configs (meta tensors: no weights)


def rank_counts(run: Run, ranks: Sequence[int] = RANKS) -> list[dict[str, Any]]:
    rows = []
    targets = run.config.get("lora", {}).get("target_modules")
    for rank in ranks if run.method in LORA_METHODS else [None]:
        lora = LoraArgs(r=rank, lora_alpha=2 * rank, target_modules=targets) if rank else None
        merged = merged_dir(run.path)
        task = task_of_model(run.task, json.loads((merged / "config.json").read_text()))
        model, _ = build_model(str(merged), task, run.method, lora, weights=False)
        rows.append(
            {"method": run.method, "rank": rank, **count_parameters(model), "total_params": deployed_parameters(model)}
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Tables


def _md(header: list[str], rows: list[list[Any]]) -> list[str]:
    right = ["---:" if i else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(right) + "|"] + [
        "| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows
    ]


def _f(value: float | None, fmt: str = ".1f") -> str | None:
    return None if value is None else format(value, fmt)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def arm_rows(cells: dict[tuple[str, str], Cell]) -> list[dict[str, Any]]:
    """One row per task and method: score, % of FFT and LoRA, parameters, size, memory, inference (medians of runs)
    and its speed-up over fft (the median of per-seed ratios)."""
    rows = []
    for task in sorted({t for t, _ in cells}):
        for m in _methods(cells):
            if (task, m) not in cells:
                continue
            c, runs = cells[task, m], cells[task, m].runs
            fft, lora = cells.get((task, "fft")), cells.get((task, "lora"))
            inference = [r.inference for r in runs]
            # A speed-up is a ratio of two timings taken side by side: `kdlora compare` times a seed's arms together,
            # so pair each run with the fft run of its seed, then take the median of those ratios.
            fft_time = {r.seed: r.inference["median_s"] for r in (fft.runs if fft else []) if r.inference}
            timed = [(r.seed, i["median_s"]) for r, i in zip(runs, inference, strict=True) if i]
            speedups = [fft_time[seed] / t for seed, t in timed if seed in fft_time]
            rows.append(
                {
                    "task": task,
                    "method": m,
                    "score": c.value,
                    "std": c.std,
                    "n": c.n,
                    "how": c.how,
                    "pct_of_fft": _pct(c.value, fft.value if fft else None),
                    "pct_of_lora": _pct(c.value, lora.value if lora else None),
                    "trainable_params": _median([r.metrics.get("trainable_params") for r in runs]),
                    "total_params": _median([r.metrics.get("total_params") for r in runs]),
                    "merged_mb": _median([r.merged_mb for r in runs]),
                    "peak_train_memory_mb": _median([r.metrics.get("peak_memory_mb") for r in runs]),
                    "memory_kind": runs[0].metrics.get("peak_memory_kind"),
                    "inference_s": _median([i["median_s"] for i in inference if i]),
                    "speedup_vs_fft": _median(speedups),
                    "train_seconds": _median([r.metrics.get("train_seconds") for r in runs]),
                    "lr": _median([r.lr[0] for r in runs]),
                    "lr_chosen_by": "/".join(sorted({r.lr[1] for r in runs})),
                }
            )
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def table1_md(cells: dict[tuple[str, str], Cell]) -> list[str]:
    tasks = sorted({t for t, _ in cells})
    common, avg = averages(cells)
    header = ["method", *tasks, "average", "% of FFT", "% of LoRA"]
    rows = []
    for m in _methods(cells):
        a = avg.get(m)
        row = [m, *[cells[t, m].text() if (t, m) in cells else None for t in tasks], a.text() if a else None]
        row += [_f(_pct(a.value, avg[ref].value) if a and ref in avg else None) for ref in ("fft", "lora")]
        rows.append(row)
    note = f"Average over {', '.join(common)}." if common else "No task has every method: no average."
    return _md(header, rows) + ["", note]


def arms_md(rows: list[dict[str, Any]]) -> list[str]:
    header = ["task", "method", "score", "% FFT", "% LoRA", "trainable", "total", "merged MB", "train MB", "infer s"]
    header += ["speed-up", "lr"]
    body = [
        [
            r["task"],
            r["method"],
            f"{r['score']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "") + f" ({r['how']})",
            _f(r["pct_of_fft"]),
            _f(r["pct_of_lora"]),
            f"{r['trainable_params']:,.0f}" if r["trainable_params"] is not None else None,
            f"{r['total_params']:,.0f}" if r["total_params"] is not None else None,
            _f(r["merged_mb"]),
            _f(r["peak_train_memory_mb"], ".0f"),
            _f(r["inference_s"], ".3f"),
            _f(r["speedup_vs_fft"], ".2f"),
            (f"{r['lr']:.2g}" + ("" if r["lr_chosen_by"] == "given" else f" ({r['lr_chosen_by']})"))
            if r["lr"] is not None
            else None,
        ]
        for r in rows
    ]
    return _md(header, body)


def table2(cells: dict[tuple[str, str], Cell], task: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Trainable parameters at ranks 8/16/32/64 per method, plus size, memory and inference on `task`."""
    rows, lines = [], []
    arms = {r["method"]: r for r in arm_rows(cells) if r["task"] == task}
    for m in _methods(cells):
        if (task, m) not in cells:
            continue
        run = cells[task, m].runs[0]
        arm = arms[m]
        for counts in rank_counts(run):
            rows.append(
                {
                    **counts,
                    "task": task,
                    "merged_mb": arm["merged_mb"],
                    "peak_train_memory_mb": arm["peak_train_memory_mb"],
                    "inference_s": arm["inference_s"],
                    "inference_speedup_vs_fft": arm["speedup_vs_fft"],
                }
            )
    header = ["method", *[f"r={r}" for r in RANKS], "deployed params", "merged MB", "train MB", "infer s", "speed-up"]
    body = []
    for m in _methods(cells):
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        by_rank = {r["rank"]: r for r in mine}
        counts = [
            f"{by_rank[None]['trainable_params']:,}"
            if None in by_rank
            else (f"{by_rank[k]['trainable_params']:,} ({by_rank[k]['lora_params']:,})" if k in by_rank else None)
            for k in RANKS
        ]
        first = mine[0]
        body.append(
            [
                m,
                *counts,
                f"{first['total_params']:,}",
                _f(first["merged_mb"]),
                _f(first["peak_train_memory_mb"], ".0f"),
                _f(first["inference_s"], ".3f"),
                _f(first["inference_speedup_vs_fft"], ".2f"),
            ]
        )
    lines = _md(header, body)
    return rows, lines


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _curves(runs: list[Run], key: str) -> list[list[float]]:
    """The runs' per-step `key` histories, cut to the shortest (seeds of one config have the same step count)."""
    curves = [r.metrics.get(key) or [] for r in runs]
    n = min((len(c) for c in curves), default=0)
    return [c[:n] for c in curves] if n else []


def figure2(cells: dict[tuple[str, str], Cell], task: str, path: Path) -> None:
    """Training loss against optimizer step for each method on `task`: the mean over the seeds of its config (smoothed)
    with the seeds' min-max as a band, so that no seed is picked; a sweep cell shows its best run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    banded = False
    for m in _methods(cells):
        if (task, m) not in cells:
            continue
        cell = cells[task, m]
        runs = cell.runs if cell.seeds else [max(cell.runs, key=lambda r: r.score)]
        curves = _curves(runs, "train_loss")
        if not curves:
            continue
        window = max(1, len(curves[0]) // 25)
        smooth = [_smooth(c, window) for c in curves]
        mean = [statistics.mean(v) for v in zip(*smooth, strict=True)]
        who = f"mean of {len(runs)} seeds" if len(runs) > 1 else f"seed {runs[0].seed}"
        (line,) = ax.plot(mean, label=f"{m} ({who})", lw=1.6)
        if len(runs) > 1:
            steps = range(len(mean))
            low, high = [min(v) for v in zip(*smooth, strict=True)], [max(v) for v in zip(*smooth, strict=True)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, lw=0)
            banded = True
        else:
            ax.plot(curves[0], color=line.get_color(), alpha=0.15, lw=0.6)
        task_curves = _curves(runs, "train_loss_task") if m in DISTILLED else []
        if task_curves:
            task_mean = [statistics.mean(v) for v in zip(*(_smooth(c, window) for c in task_curves), strict=True)]
            ax.plot(task_mean, color=line.get_color(), ls="--", lw=1.2, label="kd-lora, task loss only")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    shade = "band: min-max over seeds" if banded else "raw steps faint"
    ax.set_title(f"Training loss on {task} (moving average; {shade})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)


def score_vs_params(cells: dict[tuple[str, str], Cell], path: Path) -> None:
    """Score against trainable parameters: one point per task and method, the GLUE average as a large marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, avg = averages(cells)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in _methods(cells):
        pts = [
            (statistics.median(r.metrics["trainable_params"] for r in c.runs), c.value, t)
            for (t, mm), c in cells.items()
            if mm == m
        ]
        if not pts:
            continue
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], alpha=0.5, label=m)
        for x, y, t in pts:
            ax.annotate(t, (x, y), fontsize=7, alpha=0.7, xytext=(3, 2), textcoords="offset points")
        if m in avg:
            x = statistics.median(p[0] for p in pts)
            ax.scatter([x], [avg[m].value], s=160, marker="*", color=sc.get_facecolor()[0], edgecolor="black")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("score (0-100); star: average over tasks")
    ax.set_title("Score against trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)


def pareto(rows: list[dict[str, Any]], task: str, path: Path) -> bool:
    """Score against inference throughput on `task`, one point per method (the merged models `kdlora compare` timed,
    relative to fft, which was timed beside them): up and to the right is better. False when nothing was timed."""
    points = [(r["speedup_vs_fft"], r["score"], r["method"]) for r in rows if r["task"] == task and r["speedup_vs_fft"]]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for x, y, m in points:
        ax.scatter([x], [y], s=60, label=m)
    ax.set_xlabel("inference throughput relative to fft (merged models, timed side by side)")
    ax.set_ylabel("score (0-100)")
    ax.set_title(f"Score against throughput on {task}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)
    return True


def _save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)

    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------------


def write_side_tables(runs: list[Run], root: Path, dest: Path, quiet: bool) -> tuple[list[Run], Path | None]:
    """The tables of the runs that are not the paper's comparison: the label-budget learning curve and the language
    models' per-token figures. Returns the other runs, and the path of a side table written (None: none)."""
    # Runs on a label budget make the learning curve, not the tables of the full labelled sets.
    curve = [r for r in runs if budget_of(r.config)]
    # Language models have their own table: per-token figures, not a task score out of 100.
    generative = [r for r in runs if r.metrics.get("kind") == "generation"]
    rest = [r for r in runs if not budget_of(r.config) and r not in generative]
    curve_md = write_curve(curve, dest, quiet) if curve else None
    generative_md = write_generative(generative, root, dest, quiet) if generative else None
    return rest, curve_md or generative_md


def write_report(
    root: Path, top_k: int = 6, task: str | None = None, quiet: bool = False, output_dir: Path | None = None
) -> Path:
    """Write report.md, table1.csv, arms.csv, table2.csv, runs.csv and the figures into `output_dir` (default: `root`).
    Returns the path of report.md. Run paths in it are relative to `root`."""
    dest = output_dir or root
    runs, unfinished = find_runs(root)
    runs, side = write_side_tables(runs, root, dest, quiet)
    if not runs and side is not None:
        return side
    if not runs:
        raise KdloraError(
            f"no finished kdlora runs under {root}" + (f" ({len(unfinished)} unfinished)" * bool(unfinished))
        )
    cells = table_cells(runs, top_k)
    tasks = sorted({r.task for r in runs})
    task = task or ("cola" if "cola" in tasks else tasks[0])
    if task not in tasks:
        raise KdloraError(f"--task {task}: no finished runs of it under {root} (tasks: {', '.join(tasks)})")
    arms = arm_rows(cells)
    t2_rows, t2_md = table2(cells, task)
    figure2(cells, task, dest / "figure2.png")
    score_vs_params(cells, dest / "score_vs_params.png")
    timed = pareto(arms, task, dest / "pareto.png")
    _, avg = averages(cells)

    lines = [
        f"# kdlora report: {root}",
        "",
        f"{len(runs)} finished runs, {len(unfinished)} unfinished. Scores are on the 0-100 scale of each task's GLUE "
        "metric (dev set, best epoch). One config over seeds: mean ± std (sample std). Several configs: the median "
        f"of the top {top_k} config scores, as in the paper.",
        "",
        "## Table 1: scores",
        "",
        *table1_md(cells),
        "",
        "## Every arm",
        "",
        "trainable = LoRA matrices + head (classifier, and pooler / pre_classifier where the model has one), or every "
        "parameter for fft; total = parameters of the deployed model (LoRA merged); merged MB = its safetensors on "
        "disk; train MB = peak training memory (" + (arms[0]["memory_kind"] or "?") + "); infer s = one pass over "
        "the validation set with the merged model (median of the timed passes in inference.json; median over seeds); "
        "speed-up = fft's time / this arm's, both timed in the same run, median over seeds.",
        "",
        *arms_md(arms),
        "",
        f"## Table 2: trainable parameters per LoRA rank and costs ({task})",
        "",
        "Counted on the peft-wrapped models built from each run's config (no weights). Cells: trainable parameters "
        "(LoRA matrices only in brackets). The head trains with the LoRA matrices, so it is part of the trainable "
        "count at every rank.",
        "",
        *t2_md,
        "",
        "## Figures",
        "",
        f"![Figure 2: training loss on {task}](figure2.png)",
        "",
        "![Score against trainable parameters](score_vs_params.png)",
        *(["", f"![Score against throughput on {task}](pareto.png)"] if timed else []),
    ]
    if unfinished:
        lines += ["", "## Unfinished runs (not counted)", "", *[f"- {p.relative_to(root)}" for p in unfinished]]
    atomic_write_text(dest / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(dest / "table1.csv", _csv(table1_rows(cells, avg)))
    atomic_write_text(dest / "arms.csv", _csv(arms))
    atomic_write_text(dest / "table2.csv", _csv(t2_rows))
    atomic_write_text(dest / "runs.csv", _csv([run_row(r, root) for r in runs]))
    if not quiet:
        print("\n".join(table1_md(cells)))
        print(
            f"\nwrote {dest / 'report.md'} with table1.csv, arms.csv, table2.csv, runs.csv, figure2.png, "
            "score_vs_params.png and (when the runs were timed) pareto.png beside it"
        )
    return dest / "report.md"


GENERATIVE = ("nll", "perplexity", "kl", "agreement", "exact_match")


def write_generative(runs: list[Run], root: Path, dest: Path, quiet: bool = False) -> Path:
    """generative.md, generative.csv and generative.png in `dest`: a causal LM's runs, one row each (validation
    figures of the best epoch, sizes, costs, the teacher cache), and their training-loss curves."""
    rows = []
    for r in sorted(runs, key=lambda r: (r.task, r.method, str(r.path))):
        m = r.metrics
        rows.append({
            "run": str(r.path.relative_to(root)), "task": r.task, "method": r.method,
            "alpha": r.config.get("kd", {}).get("alpha") if r.method in ("kd-lora", "kd-fft") else None,
            **{k: m.get(k) for k in GENERATIVE}, "best_epoch": m.get("best_epoch"), "lr": r.lr[0],
            "trainable_params": m.get("trainable_params"), "total_params": m.get("total_params"),
            "train_s": m.get("train_seconds"), "train_tokens_per_s": m.get("train_tokens_per_second"),
            "generate_tokens_per_s": m.get("generate_tokens_per_second"),
            "peak_mb": m.get("peak_memory_mb"), "cache_bytes_per_token": m.get("teacher_cache_bytes_per_token"),
        })  # fmt: skip
    header = ["run", "method", "α", "NLL", "ppl", "KL to teacher", "agreement %", "exact match %", "params",
              "train s", "train tok/s", "generate tok/s", "peak MB", "cache B/token"]  # fmt: skip
    table = _md(header, [[
        r["run"], r["method"], r["alpha"], _f(r["nll"], ".3f"), _f(r["perplexity"], ".2f"), _f(r["kl"], ".3f"),
        _f(r["agreement"]), _f(r["exact_match"]), f"{r['total_params']:,}" if r["total_params"] else None,
        _f(r["train_s"], ".0f"), _f(r["train_tokens_per_s"], ".1f"), _f(r["generate_tokens_per_s"], ".1f"),
        _f(r["peak_mb"], ".0f"),
        _f(r["cache_bytes_per_token"], ".0f"),
    ] for r in rows])  # fmt: skip
    arms, arm_table = generative_arms(runs)
    lines = [
        "# Language models: validation figures",
        "",
        "Per arm (one config; a compare's arm is its directory name): mean ± std over its seeds (sample std), at each "
        "run's best epoch.",
        "",
        *arm_table,
        "",
        "## Every run",
        "",
        f"{len(runs)} finished runs. Per completion token of the validation rows, at each run's best epoch: NLL "
        "(nats) and perplexity; KL(teacher ‖ student) over the teacher's cached top-k and tail, and top-1 agreement "
        "(distilled runs); exact match of greedy completions of the first validation rows. params: the deployed "
        "model's (LoRA merged); train tok/s: every token read (prompt and completion) per second of training; "
        "generate tok/s: greedy decoding of those rows with the KV cache (adapters unmerged).",
        "",
        *table,
        "",
        "![training loss](generative.png)",
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in sorted(runs, key=lambda r: str(r.path)):
        loss = r.metrics.get("train_loss") or []
        if loss:
            ax.plot(range(1, len(loss) + 1), _smooth(loss, 10), label=str(r.path.relative_to(root)))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss per learnt token (smoothed)")
    ax.legend(fontsize=7)
    _save_png(fig, dest / "generative.png")
    atomic_write_text(dest / "generative_arms.csv", _csv(arms))
    return write_table(dest, "generative", lines, rows, arm_table, quiet)


def generative_arms(runs: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """A language model's Table 1: per task and config (its runs are seeds of one arm), the validation figures'
    mean ± std over seeds."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.task, r.key)].append(r)
    rows, cells = [], []
    for (task, _), group in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[1][0].path))):
        row: dict[str, Any] = {"task": task, "arm": group[0].path.name, "method": group[0].method, "seeds": len(group)}
        cell = [task, row["arm"], len(group)]
        for k in ("nll", "kl", "agreement", "exact_match"):
            values = [float(r.metrics[k]) for r in group if isinstance(r.metrics.get(k), (int, float))]
            row[k] = statistics.mean(values) if values else None
            row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else None
            digits = ".3f" if k in ("nll", "kl") else ".1f"
            text = _f(row[k], digits)
            cell.append(f"{text} ± {row[f'{k}_std']:{digits}}" if text and row[f"{k}_std"] is not None else text)
        rows.append(row)
        cells.append(cell)
    return rows, _md(["task", "arm", "seeds", "NLL", "KL to teacher", "agreement %", "exact match %"], cells)


def table1_rows(cells: dict[tuple[str, str], Cell], avg: dict[str, Cell]) -> list[dict[str, Any]]:
    rows = []
    for (task, m), c in sorted(cells.items()):
        rows.append({"task": task, "method": m, "score": c.value, "std": c.std, "n": c.n, "how": c.how})
    for m, c in avg.items():
        rows.append({"task": "average", "method": m, "score": c.value, "std": c.std, "n": c.n, "how": c.how})
    for row in rows:
        for ref in ("fft", "lora"):
            base = avg.get(ref) if row["task"] == "average" else cells.get((row["task"], ref))
            row[f"pct_of_{ref}"] = _pct(row["score"], base.value if base else None)
    return rows


def run_row(r: Run, root: Path) -> dict[str, Any]:
    inf = r.inference
    return {
        "path": str(r.path.relative_to(root)),
        "task": r.task,
        "method": r.method,
        "seed": r.seed,
        "score": r.score,
        "best_epoch": r.metrics.get("best_epoch"),
        "trainable_params": r.metrics.get("trainable_params"),
        "lora_params": r.metrics.get("lora_params"),
        "total_params": r.metrics.get("total_params"),
        "merged_mb": r.merged_mb,
        "peak_train_memory_mb": r.metrics.get("peak_memory_mb"),
        "train_seconds": r.metrics.get("train_seconds"),
        "inference_s": inf["median_s"] if inf else None,
        "lr": r.lr[0],
        "lr_chosen_by": r.lr[1],
    }
