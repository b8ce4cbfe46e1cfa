"""`kdlora report` on fixture run directories with known numbers, parameter counts per rank, and the images."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import tiny_bert_config

from kdlora.cli import main
from kdlora.config import build_config
from kdlora.report import Run, config_key, find_runs, median_top_k, rank_counts

LAYERS = 4  # tiny_bert_config's layers; the kd-lora fixture student keeps 2


def fake_run(
    root: Path, task: str, method: str, seed: int, score: float, lr: float | None = None, infer_s=None, **metrics
) -> Path:
    """A finished run directory as `kdlora train` leaves it, minus the weights: config, metrics, merged/config.json."""
    run = root / task / f"seed-{seed}" / method / (f"lr-{lr}" if lr else "")
    model = {"name": "/m/tiny"} if method != "kd-lora" else {"teacher": str(root / "t"), "student_layers": [0, 2]}
    cfg = build_config(
        {
            "model": model,
            "data": {"task": task},
            "train": {"method": method, "seed": seed, "output_dir": str(run), **({"lr": lr} if lr else {})},
        }
    )
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    config = tiny_bert_config(num_hidden_layers=2 if method == "kd-lora" else LAYERS, num_labels=2)
    config.save_pretrained(run / "merged")
    loss = [1.0 / (1 + i) for i in range(40)]
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "task": task,
                "method": method,
                "score": score,
                "best_epoch": 1,
                "train_loss": loss,
                **({"train_loss_task": loss} if method == "kd-lora" else {}),
                "trainable_params": {"fft": 30000, "lora": 5000, "kd-lora": 3000}[method],
                "lora_params": 0,
                "total_params": {"fft": 30000, "lora": 30000, "kd-lora": 18000}[method],
                "peak_memory_mb": {"fft": 300.0, "lora": 200.0, "kd-lora": 120.0}[method],
                "merged_mb": 1.0,
                **metrics,
            }
        )
    )
    infer_s = infer_s or {"fft": 0.2, "lora": 0.2, "kd-lora": 0.1}[method]
    (run / "inference.json").write_text(json.dumps({"median_s": infer_s}))
    return run


SCORES = {  # task -> method -> scores of seeds 1, 2, 3
    "cola": {"fft": [50, 52, 54], "lora": [40, 42, 44], "kd-lora": [45, 46, 47]},
    "stsb": {"fft": [80, 80, 80], "lora": [70, 72, 74], "kd-lora": [78, 79, 80]},
}


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    for task, methods in SCORES.items():
        for method, scores in methods.items():
            for seed, score in enumerate(scores, 1):
                fake_run(tmp_path, task, method, seed, score)
    unfinished = tmp_path / "rte" / "seed-1" / "fft"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text((tmp_path / "cola/seed-1/fft/config.yaml").read_text())
    return tmp_path


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_report_tables_have_the_right_numbers(runs_dir, capsys):
    assert main(["report", str(runs_dir)]) == 0
    rows = {(r["task"], r["method"]): r for r in read_csv(runs_dir / "table1.csv")}
    for task, methods in SCORES.items():
        for method, scores in methods.items():
            row = rows[task, method]
            assert float(row["score"]) == pytest.approx(statistics.mean(scores))
            assert float(row["std"]) == pytest.approx(statistics.stdev(scores))
            fft, lora = statistics.mean(methods["fft"]), statistics.mean(methods["lora"])
            assert float(row["pct_of_fft"]) == pytest.approx(100 * statistics.mean(scores) / fft)
            assert float(row["pct_of_lora"]) == pytest.approx(100 * statistics.mean(scores) / lora)
    # GLUE average: the mean of the task means; its std is that of the per-seed averages.
    kd_avg = rows["average", "kd-lora"]
    assert float(kd_avg["score"]) == pytest.approx((46 + 79) / 2)
    per_seed = [(45 + 78) / 2, (46 + 79) / 2, (47 + 80) / 2]
    assert float(kd_avg["std"]) == pytest.approx(statistics.stdev(per_seed))
    assert float(kd_avg["pct_of_fft"]) == pytest.approx(100 * 62.5 / 66)

    report = (runs_dir / "report.md").read_text()
    assert "| kd-lora | 46.00 ± 1.00 | 79.00 ± 1.00 | 62.50 ± 1.00 | 94.7 | 109.6 |" in report
    assert "## Unfinished runs (not counted)" in report and "- rte/seed-1/fft" in report
    assert "kd-lora" in capsys.readouterr().out

    arms = {(r["task"], r["method"]): r for r in read_csv(runs_dir / "arms.csv")}
    assert float(arms["cola", "kd-lora"]["peak_train_memory_mb"]) == 120.0
    assert float(arms["cola", "kd-lora"]["inference_s"]) == 0.1
    assert arms["cola", "kd-lora"]["how"] == "3 seeds"
    assert len(read_csv(runs_dir / "runs.csv")) == 18


def test_report_follows_symlinked_runs_once(runs_dir, tmp_path_factory):
    """A variant's kd-lora runs beside links to the baseline's fft and lora runs: one report over all of them."""
    view = tmp_path_factory.mktemp("variant")
    for task, methods in SCORES.items():
        for seed in (1, 2, 3):
            for method in ("fft", "lora"):
                (view / task / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
                (view / task / f"seed-{seed}" / method).symlink_to(runs_dir / task / f"seed-{seed}" / method)
            fake_run(view, task, "kd-lora", seed, methods["kd-lora"][seed - 1] + 10)
    (view / "again").symlink_to(view / "cola")  # a second way to the same runs counts once
    (view / "loop").symlink_to(view)  # and a link back up the tree ends
    assert main(["report", str(view), "--quiet"]) == 0
    rows = {(r["task"], r["method"]): float(r["score"]) for r in read_csv(view / "table1.csv")}
    assert rows["cola", "fft"] == 52 and rows["cola", "lora"] == 42 and rows["cola", "kd-lora"] == 56
    runs = read_csv(view / "runs.csv")
    assert len(runs) == 18 and "cola/seed-1/fft" in {r["path"] for r in runs}


def test_speed_up_is_the_median_of_per_seed_ratios(tmp_path):
    """Seeds timed under different loads: each seed's ratio is fair, a ratio of medians across seeds is not."""
    times = {"fft": [0.2, 0.4, 1.0], "lora": [0.2, 0.4, 1.0], "kd-lora": [0.1, 0.5, 0.4]}  # ratios 2, 0.8, 2.5
    for method, secs in times.items():
        for seed, t in enumerate(secs, 1):
            fake_run(tmp_path, "cola", method, seed, 50.0, infer_s=t)
    assert main(["report", str(tmp_path), "--quiet"]) == 0
    arms = {r["method"]: r for r in read_csv(tmp_path / "arms.csv")}
    assert float(arms["kd-lora"]["speedup_vs_fft"]) == pytest.approx(2.0)  # the median of the medians would give 1.0
    assert float(arms["kd-lora"]["inference_s"]) == pytest.approx(0.4)
    table2 = {r["method"]: r for r in read_csv(tmp_path / "table2.csv") if r["rank"] in ("", "8")}
    assert float(table2["kd-lora"]["inference_speedup_vs_fft"]) == pytest.approx(2.0)


def test_report_table2_counts_follow_the_lora_formula(runs_dir):
    main(["report", str(runs_dir), "--quiet"])
    rows = read_csv(runs_dir / "table2.csv")
    hidden = tiny_bert_config().hidden_size
    for row in rows:
        if row["method"] == "fft":
            assert row["rank"] == ""
            continue
        layers = 2 if row["method"] == "kd-lora" else LAYERS
        r = int(row["rank"])
        # the default all-linear: q, k, v, attention output (hidden -> hidden); intermediate, output (hidden <-> ffn)
        ffn = tiny_bert_config().intermediate_size
        assert int(row["lora_params"]) == layers * r * (4 * 2 * hidden + 2 * (hidden + ffn))
        head = hidden * hidden + hidden + hidden * 2 + 2  # pooler + classifier
        assert int(row["trainable_params"]) == int(row["lora_params"]) + head
    assert sorted(int(r["rank"]) for r in rows if r["method"] == "lora") == [8, 16, 32, 64]
    speedup = {r["method"]: r["inference_speedup_vs_fft"] for r in rows}
    assert float(speedup["kd-lora"]) == pytest.approx(2.0)


def test_bert_base_query_value_lora_at_rank_8_is_294912(tmp_path):
    from transformers import BertConfig

    run_dir = tmp_path / "run"
    BertConfig(num_labels=2).save_pretrained(run_dir / "merged")  # bert-base sizes, no weights
    run = Run(run_dir, "cola", "lora", 1, 0.0, {}, {"lora": {"target_modules": None}}, "")
    counts = {r["rank"]: r for r in rank_counts(run)}
    assert counts[8]["lora_params"] == 294_912 == 12 * 2 * 8 * (768 + 768)
    assert counts[64]["lora_params"] == 8 * 294_912
    assert counts[8]["trainable_params"] == 294_912 + 768 * 768 + 768 + 768 * 2 + 2  # + pooler + classifier
    assert counts[8]["total_params"] == 109_483_778


def test_report_pngs_are_valid_images(runs_dir):
    from PIL import Image

    main(["report", str(runs_dir), "--quiet"])
    for name in ("figure2.png", "score_vs_params.png"):
        with Image.open(runs_dir / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300


def test_several_configs_are_summarised_by_the_median_of_the_top_k(tmp_path):
    scores = [60, 58, 30, 55, 57, 20, 59, 61]  # eight configs (lr) of one task and method, seed 1
    for i, score in enumerate(scores):
        fake_run(tmp_path, "cola", "lora", 1, score, lr=1e-4 * (i + 1))
    main(["report", str(tmp_path), "--quiet", "--top-k", "6"])
    row = read_csv(tmp_path / "table1.csv")[0]
    assert float(row["score"]) == median_top_k(scores, 6) == statistics.median([61, 60, 59, 58, 57, 55])
    assert row["how"] == "median of top 6 of 8 configs"


def test_median_top_k_on_known_numbers():
    assert median_top_k([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 6) == 7.5
    assert median_top_k([3, 1, 2], 6) == 2
    assert median_top_k([5, 5, 1, 9], 2) == 7
    with pytest.raises(ValueError):
        median_top_k([], 6)


def test_config_key_ignores_seed_and_paths_but_not_hyperparameters(tmp_path):
    a = fake_run(tmp_path / "a", "cola", "kd-lora", 1, 1.0)
    b = fake_run(tmp_path / "b", "cola", "kd-lora", 2, 1.0)
    c = fake_run(tmp_path / "c", "cola", "kd-lora", 1, 1.0, lr=1e-3)
    keys = [config_key(yaml.safe_load((d / "config.yaml").read_text())) for d in (a, b, c)]
    assert keys[0] == keys[1] != keys[2]


def test_runs_that_adapted_the_same_modules_are_seeds_of_one_config(tmp_path):
    # all-linear in one config, the same modules by name in another: the targets the runs recorded decide
    spelled = ["intermediate.dense", "key", "output.dense", "query", "value"]
    written = [["all-linear"], list(reversed(spelled)), ["query", "value"]]
    adapted = [spelled, spelled, ["query", "value"]]
    for seed, (targets, recorded) in enumerate(zip(written, adapted, strict=True), start=1):
        run = fake_run(tmp_path, "cola", "lora", seed, 1.0, lora_target_modules=recorded)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["lora"]["target_modules"] = targets
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    keys = [r.key for r in sorted(find_runs(tmp_path)[0], key=lambda r: r.seed)]
    assert keys[0] == keys[1] != keys[2]
    assert config_key(yaml.safe_load((tmp_path / "cola/seed-1/lora/config.yaml").read_text())) != keys[0]


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"kdlora: error: {tmp_path / 'missing'} is not a directory",
        f"kdlora: error: no finished kdlora runs under {tmp_path}",
    ]
