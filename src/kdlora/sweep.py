"""`kdlora sweep`: train one method on one task at every point of a grid, on an Optuna study, and summarise it.

The train flags give the base config and the grid the points tried on top of it: the paper's grids (`--grid paper`)
or a YAML file. Every point is queued once in the study when it is created; workers take queued points one at a time
(the database hands each to one worker), so several workers on several machines can share a study through
`--storage`. Each point trains into OUTPUT/trials/point-NNN, and the study's summary is the median of the top-k
scores, as in the paper.

A killed worker loses nothing: a point whose run finished is read back, never retrained; a point cut off is queued
again, by the next worker to start on this host (its process is gone) or by any worker once its heartbeat is stale,
and its run resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlora.config import DISTILLED, SECTIONS, RunConfig, arg, build_config
from kdlora.env import process_alive, process_start
from kdlora.errors import KdloraError
from kdlora.io import atomic_write_json, atomic_write_text, load_yaml
from kdlora.report import median_top_k
from kdlora.rundir import read_run, result_config, same_config
from kdlora.train import ensure_teacher, run

# The paper's search spaces, as 25 (FFT) and 24 (LoRA, KD-LoRA) points; the paper does not list its points.
# FFT: lr over 2e-5..5e-5 matters most for full fine-tuning, so it gets five evenly spaced levels, each crossed with
# five (batch, epochs, weight decay) schedules that reach both ends and the middle of every range.
FFT_LRS = (2e-5, 2.75e-5, 3.5e-5, 4.25e-5, 5e-5)
FFT_SCHEDULES = ((8, 2, 0.1), (16, 3, 0.01), (32, 3, 0.1), (16, 4, 0.1), (32, 5, 0.01))
# LoRA / KD-LoRA: the full product of rank {8, 16, 32}, lora_alpha {16, 32} and dropout {0, 0.1} with epochs at the
# two ends of 3..5: 3 * 2 * 2 * 2 = 24. The learning rate is not in the paper's space: it stays the base config's.
LORA_SPACE = {"r": (8, 16, 32), "epochs": (3, 5), "lora_alpha": (16, 32), "lora_dropout": (0.0, 0.1)}
HEARTBEAT_S, GRACE_S = 30, 120  # a running trial without a heartbeat for GRACE_S is taken as dead


def paper_grid(method: str) -> list[dict[str, Any]]:
    if method in ("fft", "kd-fft"):  # full fine-tuning: the paper's FFT space
        return [
            {"lr": lr, "batch_size": b, "epochs": e, "weight_decay": wd} for lr in FFT_LRS for b, e, wd in FFT_SCHEDULES
        ]
    keys = list(LORA_SPACE)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*LORA_SPACE.values())]


def field_path(key: str) -> tuple[str, str]:
    """A grid key, 'lr' or 'train.lr', as its config (section, field)."""
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in SECTIONS[section].__dataclass_fields__:
            return section, name
    else:
        found = [s for s, cls in SECTIONS.items() if key in cls.__dataclass_fields__]
        if len(found) == 1:
            return found[0], key
    raise KdloraError(f"grid key '{key}' is not a config field (e.g. lr, epochs, r, lora_alpha, train.batch_size)")


def load_grid(grid: str, method: str) -> list[dict[str, Any]]:
    """`paper`, or a YAML file with `product:` (key: [values], every combination) and/or `points:` (a list)."""
    if grid == "paper":
        return paper_grid(method)
    data = read_yaml_any(grid)
    if not isinstance(data, dict) or not set(data) <= {"product", "points"} or not data:
        raise KdloraError(f"grid file {grid} must hold 'product:' (key: [values]) and/or 'points:' (a list)")
    points = []
    product = data.get("product") or {}
    if not isinstance(product, dict) or not all(isinstance(v, list) and v for v in product.values()):
        raise KdloraError(f"grid file {grid}: 'product' must map each key to a non-empty list of values")
    if product:
        points += [dict(zip(product, values, strict=True)) for values in itertools.product(*product.values())]
    listed = data.get("points") or []
    if not isinstance(listed, list) or not all(isinstance(p, dict) and p for p in listed):
        raise KdloraError(f"grid file {grid}: 'points' must be a list of key: value mappings")
    points += listed
    if len({json.dumps(p, sort_keys=True) for p in points}) != len(points):
        raise KdloraError(f"grid file {grid} lists a point twice")
    if not points:
        raise KdloraError(f"grid file {grid} holds no point to try")
    return points


def read_yaml_any(path: str) -> Any:
    if not Path(path).is_file():
        raise KdloraError(f"--grid {path}: no such file (or give --grid paper)")
    return load_yaml(path, "grid file")


@dataclass
class SweepArgs:
    base: dict[str, dict[str, Any]]  # the base config's sections (YAML file + train flags)
    grid: str = arg("paper", "'paper' (the paper's grid for --method) or a YAML grid file")
    storage: str | None = arg(None, "SQLAlchemy URL of the study, e.g. postgresql://user@host/db (default SQLite)")
    study_name: str | None = arg(None, "default: kdlora-<task>-<method>")
    top_k: int = arg(6, "summarise by the median of the top k configs (default 6)")
    max_trials: int | None = arg(None, "this worker stops after N trials")
    retry_failed: bool = arg(False, "run again the points that failed with an error (once each)")
    points: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.top_k <= 0:
            raise KdloraError(f"--top-k must be > 0, got {self.top_k}")
        if self.max_trials is not None and self.max_trials <= 0:
            raise KdloraError(f"--max-trials must be > 0, got {self.max_trials}")


def point_config(base: dict[str, dict[str, Any]], point: dict[str, Any], output_dir: Path) -> RunConfig:
    values = copy.deepcopy(base)
    for key, value in point.items():
        section, name = field_path(key)
        values.setdefault(section, {})[name] = value
    values.setdefault("train", {}).update(output_dir=str(output_dir), overwrite=False, resume=False)
    return build_config(values)


def describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


# ---------------------------------------------------------------------------------------------------------------------
# The study


def _storage(url: str) -> Any:
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for _ in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (IntegrityError, ProgrammingError) as exc:
            # Workers started together race to create the study tables; the loser's retry finds them made.
            last = exc
            time.sleep(0.5 + random.random())
        except Exception as exc:  # bad URL, server down, missing driver: one line, with the password hidden
            cause = exc.__cause__ if isinstance(exc, ImportError) and exc.__cause__ else exc  # name the driver
            reason = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
            raise KdloraError(f"cannot open the study storage {_safe_url(url)}: {reason}") from exc
    reason = str(last).splitlines()[0][:200]
    raise KdloraError(f"cannot create the study tables in {_safe_url(url)}: {reason}") from last


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<storage URL>"


def open_study(name: str, storage: Any, points: list[dict[str, Any]], base_key: str) -> Any:
    """Create the study and queue every point, or join the existing one if it holds the same grid and base."""
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        created = False
    if created:
        study.set_user_attr("kdlora_points", points)
        study.set_user_attr("kdlora_base", base_key)
        for i in range(len(points)):
            study.enqueue_trial({"point": i}, user_attrs={"point": i})
        study.set_user_attr("kdlora_queued", True)
        return study
    for _ in range(120):  # the worker that created it may still be queueing its points
        held = study.user_attrs
        if held.get("kdlora_queued"):
            break
        time.sleep(0.5)
    if "kdlora_points" in held and (held["kdlora_points"] != points or held.get("kdlora_base") != base_key):
        raise KdloraError(
            f"study '{name}' already holds another grid or base config: use another --study-name or --output-dir"
        )
    return study


def requeue(study: Any) -> None:
    """Fail the trials of dead workers (this host's at once, others' by heartbeat) and queue every point that has no
    finished, queued or running trial again. A point that failed with an error stays failed."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") == host and not process_alive(attrs.get("pid"), attrs.get("pid_start")):
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
                pass  # another worker got there first
    optuna.storages.fail_stale_trials(study)
    settled = set()
    for t in study.get_trials(deepcopy=False):
        point = point_of(t)
        live = t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
        if point is not None and (live or "error" in t.user_attrs):  # a pruned duplicate settles nothing
            settled.add(point)
    for i in range(len(study.user_attrs.get("kdlora_points", []))):
        if i not in settled:
            study.enqueue_trial({"point": i}, user_attrs={"point": i, "requeued": True})


def retry_failed(study: Any) -> list[int]:
    """Queue once more every point that has an error-failed trial and no finished, queued or running one (after
    the cause was fixed). Done once per worker start, so a point that fails again stays failed."""
    from optuna.trial import TrialState

    failed, live = set(), set()
    for t in study.get_trials(deepcopy=False):
        point = point_of(t)
        if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING):
            live.add(point)
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:
            failed.add(point)
    again = sorted(failed - live)
    for i in again:
        study.enqueue_trial({"point": i}, user_attrs={"point": i, "retried": True})
    return again


def point_of(trial: Any) -> int | None:
    """The grid point a trial runs: given when it was queued, or its parameter once it has started."""
    point = trial.user_attrs.get("point")
    return point if point is not None else trial.params.get("point")


def _waiting(study: Any) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# ---------------------------------------------------------------------------------------------------------------------


def run_sweep(args: SweepArgs) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets our own line
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
    base_cfg = build_config(copy.deepcopy(args.base))
    method, task = base_cfg.train.method, base_cfg.data.task
    out = Path(base_cfg.train.output_dir)
    points = load_grid(args.grid, method)
    for p in points:  # a bad key or value fails now, not at the 17th point
        point_config(args.base, p, out / "trials" / "check")
    base = copy.deepcopy(args.base)
    base_key = json.dumps(result_config(base_cfg), sort_keys=True, default=str)
    out.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = args.study_name or f"kdlora-{task}-{method}"
    study = open_study(name, _storage(url), points, base_key)
    print(f"sweep: study '{name}' in {_safe_url(url)}, {len(points)} points of {method} on {task}", flush=True)

    if method in DISTILLED and base_cfg.model.teacher_model:
        # One teacher for every point: trained here (or reused) and named as a finished run.
        teacher = ensure_teacher(base_cfg)
        base["model"] = {**base.get("model", {}), "teacher": str(teacher), "teacher_model": None}

    def objective(trial: Any) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("pid_start", process_start(os.getpid()))
        if trial.user_attrs.get("point") is None:  # not from the queue: another worker took the last point first
            trial.set_user_attr("duplicate", True)
            raise optuna.TrialPruned()
        i = trial.suggest_int("point", 0, len(points) - 1)
        if _taken(study, trial, i):  # queued twice by two workers restarting at once: run it once
            trial.set_user_attr("duplicate", True)
            raise optuna.TrialPruned()
        cfg = point_config(base, points[i], out / "trials" / f"point-{i:03d}")
        trial.set_user_attr("run_dir", cfg.train.output_dir)
        label = f"sweep: point {i + 1}/{len(points)} ({describe(points[i])})"
        done = read_run(cfg.train.output_dir)
        if done is not None and not same_config(Path(cfg.train.output_dir), cfg):
            trial.set_user_attr("error", "another config's run is in the directory")
            raise KdloraError(
                f"{cfg.train.output_dir} holds a finished run of another config: use another --output-dir"
            )
        try:
            if done is not None:
                print(f"{label}: already finished, read back", flush=True)
                metrics = done
            else:
                print(f"{label}: training into {cfg.train.output_dir}", flush=True)
                metrics = _run(cfg)
        except KdloraError as exc:
            trial.set_user_attr("error", str(exc))
            print(f"{label}: failed: {exc}", flush=True)
            raise
        print(f"{label}: score {metrics['score']:.2f}", flush=True)
        trial.set_user_attr("best_epoch", metrics.get("best_epoch"))
        return float(metrics["score"])

    if args.retry_failed and (again := retry_failed(study)):
        print(f"sweep: retrying failed point(s) {', '.join(str(i + 1) for i in again)}", flush=True)
    ran = 0
    while args.max_trials is None or ran < args.max_trials:
        requeue(study)
        if not _waiting(study):
            break
        study.optimize(objective, n_trials=1, catch=(KdloraError,))
        ran += 1
    summary = summarize(study, points, args.top_k, method, task, _safe_url(url))
    atomic_write_json(out / "sweep.json", summary)
    atomic_write_text(out / "sweep.md", sweep_markdown(summary))
    print(sweep_markdown(summary))
    return summary


def _taken(study: Any, trial: Any, point: int) -> bool:
    """Whether another trial of the study has run or is running `point`."""
    import optuna

    busy = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False)
    return any(t.number != trial.number and point_of(t) == point and t.state in busy for t in trials)


def _run(cfg: RunConfig) -> dict[str, Any]:
    return run(cfg)


def summarize(
    study: Any, points: list[dict[str, Any]], top_k: int, method: str, task: str, storage: str
) -> dict[str, Any]:
    from optuna.trial import TrialState

    rows = []
    for i, p in enumerate(points):
        trials = [t for t in study.get_trials(deepcopy=False) if point_of(t) == i]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
        state = "complete" if complete else ("failed" if errors else "pending")
        rows.append(
            {
                "point": i,
                "params": p,
                "state": state,
                "score": complete[-1].value if complete else None,
                "run_dir": complete[-1].user_attrs.get("run_dir") if complete else None,
                "trials": [t.number for t in trials if "duplicate" not in t.user_attrs],
                "error": errors[-1] if errors and not complete else None,
            }
        )
    scores = [r["score"] for r in rows if r["score"] is not None]
    best = max((r for r in rows if r["score"] is not None), key=lambda r: r["score"], default=None)
    return {
        "study": study.study_name,
        "storage": storage,
        "task": task,
        "method": method,
        "points": rows,
        "complete": len(scores),
        "total": len(points),
        "top_k": top_k,
        "median_top_k": median_top_k(scores, top_k) if scores else None,
        "best": best,
    }


def sweep_markdown(s: dict[str, Any]) -> str:
    lines = [
        f"# sweep {s['study']}: {s['method']} on {s['task']}",
        "",
        f"{s['complete']} of {s['total']} points complete. Median of the top {s['top_k']}: "
        + (f"{s['median_top_k']:.2f}" if s["median_top_k"] is not None else "-")
        + (f"; best {s['best']['score']:.2f} ({describe(s['best']['params'])})" if s["best"] else ""),
        "",
        "| point | params | state | score |",
        "|---:|---|---|---:|",
    ]
    ranked = sorted(s["points"], key=lambda r: -(r["score"] if r["score"] is not None else float("-inf")))
    for r in ranked:
        score = f"{r['score']:.2f}" if r["score"] is not None else "-"
        lines.append(f"| {r['point']} | {describe(r['params'])} | {r['state']} | {score} |")
    return "\n".join(lines) + "\n"
