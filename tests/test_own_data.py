"""Your own data: every file format, label discovery, regression, pairs, predictions on raw files, the checks."""

import csv
import json
import random

import pytest
from conftest import WORDS

from kdlora.cli import main
from kdlora.config import DataArgs
from kdlora.data import iter_raw_rows, load_splits, load_task
from kdlora.errors import KdloraError
from kdlora.kinds import kind_of


def _rows(n, seed=0, pair=False, regression=False, labels=("neg", "pos")):
    """Rows with a learnable signal: 'good' in the text means the last label (or a high score)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % len(labels)
        words = [rng.choice(WORDS[:8]) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randint(0, len(words)), "good" if y == len(labels) - 1 else "bad")
        row = {"uid": f"r{i}", "body": " ".join(words) + " ."}
        if pair:
            row["other"] = "the cat ."
        row["tag"] = 4.5 * (y == len(labels) - 1) + rng.random() * 0.5 if regression else labels[y]
        rows.append(row)
    return rows


def write(path, rows):
    """rows to path in the format its extension names."""
    suffix = path.suffix
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".csv", ".tsv"):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def data(tmp_path, train_rows, dev_rows, suffix=".csv", **kw):
    train = write(tmp_path / f"train{suffix}", train_rows)
    dev = write(tmp_path / f"dev{suffix}", dev_rows)
    return DataArgs(train_file=str(train), validation_file=str(dev), **{"label_column": "tag", **kw})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_format_reads_the_same_examples(tmp_path, suffix):
    args = data(tmp_path, _rows(12), _rows(4, seed=1), suffix, text_columns=["body"], id_column="uid")
    task = load_task(args)
    assert task.custom and task.labels == ("neg", "pos") and task.metric == "accuracy"
    assert task.name == "own-data" or task.name  # named after the files' directory
    splits = load_splits(args, ["train", "validation"])
    first = splits["train"][0]
    assert (first.id, first.key, first.text_b, first.label) == (0, "r0", None, 0)
    assert [e.label for e in splits["train"]] == [i % 2 for i in range(12)]


def test_label_discovery_sorts_and_labels_fix_the_order(tmp_path):
    rows = _rows(9, labels=("10", "2", "1"))
    args = data(tmp_path, rows, rows[:3], text_columns=["body"])
    assert load_task(args).labels == ("1", "2", "10")  # integers in numeric order
    fixed = data(tmp_path, rows, rows[:3], text_columns=["body"], labels=["10", "2", "1"])
    assert load_task(fixed).labels == ("10", "2", "1")
    assert load_splits(fixed, ["train"])["train"][0].label == 0  # "10" is class 0 now
    with pytest.raises(KdloraError, match="not in --labels"):
        load_task(data(tmp_path, rows, rows[:3], text_columns=["body"], labels=["1", "2"]))


def test_regression_from_float_labels_and_by_flag(tmp_path):
    args = data(tmp_path, _rows(8, regression=True), _rows(4, regression=True), text_columns=["body"])
    task = load_task(args)
    assert task.kind == "regression" and task.metric == "pearson_spearman" and task.num_labels == 1
    ints = data(tmp_path, _rows(8, labels=("1", "5")), _rows(4, labels=("1", "5")), ".jsonl", problem="regression")
    ints.text_columns = ["body"]
    assert load_task(ints).kind == "regression"


def test_pairs_are_guessed_or_named(tmp_path):
    rows = [{"sentence1": r["body"], "sentence2": "a dog .", "tag": r["tag"]} for r in _rows(6)]
    args = data(tmp_path, rows, rows)
    assert load_task(args).text_columns == ("sentence1", "sentence2")
    assert load_splits(args, ["train"])["train"][0].text_b == "a dog ."


def test_metrics_of_own_data(tmp_path):
    task = load_task(data(tmp_path, _rows(6, labels=("a", "b", "c")), _rows(3), text_columns=["body"]))
    m = kind_of(task).metrics(task, [0, 1, 2, 0], [0, 1, 1, 0])
    assert m["accuracy"] == 0.75 and m["score"] == 75.0 and "macro_f1" in m
    task = load_task(data(tmp_path, _rows(6), _rows(3), text_columns=["body"], metric="mcc"))
    assert set(kind_of(task).metrics(task, [0, 1], [0, 1])) == {"accuracy", "macro_f1", "matthews_correlation", "score"}


@pytest.mark.parametrize(
    "train, dev, kw, message",
    [
        (None, None, {"text_columns": ["text"]}, "no column 'text'; found 'uid', 'body', 'tag'"),
        (None, None, {}, "pass --text-columns"),
        (None, None, {"text_columns": ["body"], "label_column": "y"}, "no column 'y'"),
        (None, [{"uid": "x", "body": "a cat .", "tag": "maybe"}], {"text_columns": ["body"]}, "'maybe' is not among"),
        ([{"uid": "x", "body": "a cat .", "tag": "pos"}] * 3, None, {"text_columns": ["body"]}, "single class"),
        ([{"uid": "x", "body": "", "tag": "pos"}, {"uid": "y", "body": "b", "tag": "neg"}], None,
         {"text_columns": ["body"]}, "row 1: column 'body' is empty"),
        ([{"uid": "x", "body": "a", "tag": "pos"}, {"uid": "x", "body": "b", "tag": "neg"}], None,
         {"text_columns": ["body"], "id_column": "uid"}, "id 'x' in column 'uid' appears twice"),
        (None, None, {"text_columns": ["body"], "metric": "pearson"}, "does not fit a classification task"),
    ],
)  # fmt: skip
def test_bad_data_is_one_clear_error(tmp_path, train, dev, kw, message):
    args = data(tmp_path, train or _rows(6), dev or _rows(2), ".jsonl", **kw)
    with pytest.raises(KdloraError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_task(args)
        load_splits(args, ["train", "validation"])


def test_non_text_cells_and_bad_targets(tmp_path):
    rows = [{"body": 3.5, "tag": "a"}, {"body": "x", "tag": "b"}]
    with pytest.raises(KdloraError, match=r"column 'body' is not text \(3.5\)"):
        load_splits(data(tmp_path, rows, rows, ".jsonl", text_columns=["body"]), ["train"])
    rows = [{"body": "a", "tag": 1.5}, {"body": "b", "tag": float("inf")}]
    (tmp_path / "nan").mkdir()
    args = data(tmp_path / "nan", rows, rows, ".csv", text_columns=["body"])
    with pytest.raises(KdloraError, match="row 2: label inf is not a finite number"):
        load_splits(args, ["train"])


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"train_file": "missing.csv", "validation_file": "missing.csv"}, "missing.csv does not exist"),
        ({"train_file": "x.xlsx", "validation_file": "x.xlsx"}, "unknown file type '.xlsx'"),
        ({"train_file": "empty.csv", "validation_file": "empty.csv"}, "empty.csv is empty"),
        ({"train_file": "header.csv", "validation_file": "header.csv"}, "has no data rows"),
    ],
)
def test_bad_files(tmp_path, monkeypatch, kw, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.xlsx").write_text("x")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("body,tag\n")
    with pytest.raises(KdloraError, match=message):
        load_task(DataArgs(**kw, text_columns=["body"], label_column="tag"))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"train_file": "a.csv"}, "needs --validation-file"),
        ({"task": "cola", "train_file": "a.csv", "validation_file": "b.csv"}, "'cola' is a GLUE task"),
        ({"text_columns": ["a"]}, "--text-columns describe your own data"),
        ({"label_column": "y"}, "--label-column describe your own data"),
        ({"train_file": "a.csv", "validation_file": "b.csv", "metric": "bleu"}, "unknown metric 'bleu'"),
        ({"train_file": "a.csv", "validation_file": "b.csv", "labels": ["a"]}, "at least two classes"),
    ],
)
def test_data_flags_that_do_not_fit(kw, message):
    with pytest.raises(KdloraError, match=message):
        DataArgs(**kw)


def test_seed_outside_its_domain(capsys):
    assert main(["train", "--method", "fft", "--model", "m", "--seed", "-1"]) == 2
    assert "seed must be in 0..4294967295, got -1" in capsys.readouterr().err


def test_raw_rows_stream_every_format(tmp_path):
    rows = _rows(5)
    for suffix in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        got = list(iter_raw_rows(write(tmp_path / f"in{suffix}", rows), ["body"], "uid"))
        assert got[0] == ("r0", rows[0]["body"], None) and len(got) == 5
    (tmp_path / "in.txt").write_text("the cat .\na dog .\n")
    assert list(iter_raw_rows(tmp_path / "in.txt", None)) == [("0", "the cat .", None), ("1", "a dog .", None)]
    with pytest.raises(KdloraError, match="pass --text-columns"):
        list(iter_raw_rows(tmp_path / "in.csv", None))
    (tmp_path / "gap.txt").write_text("the cat .\n\n")
    with pytest.raises(KdloraError, match="line 2 is empty"):
        list(iter_raw_rows(tmp_path / "gap.txt", None))


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the CLI on the user's files


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, tiny_bert_dir):
    """kd-lora on a CSV with string labels and an id column, the teacher trained from --teacher-model, test rows
    predicted into the run."""
    root = tmp_path_factory.mktemp("own")
    train = write(root / "reviews" / "train.csv", _rows(64))
    dev = write(root / "reviews" / "dev.jsonl", _rows(16, seed=1))
    test = write(root / "reviews" / "test.csv", [{k: v for k, v in r.items() if k != "tag"} for r in _rows(5, 2)])
    out = root / "run"
    argv = ["train", "--method", "kd-lora", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2"]
    argv += ["--train-file", str(train), "--validation-file", str(dev), "--test-file", str(test)]
    argv += ["--text-columns", "body", "--label-column", "tag", "--id-column", "uid", "--metric", "macro_f1"]
    assert (
        main([*argv, "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--quiet", "--output-dir", str(out)]) == 0
    )
    return root, out


def test_own_data_run_writes_labels_card_and_predictions(own_run):
    root, out = own_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "reviews" and {"accuracy", "macro_f1"} <= set(metrics)
    assert len(metrics["data_fingerprint"]) == 64 and metrics["num_test_predictions"] == 5
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)] and rows[0]["label"] in ("neg", "pos")
    assert abs(float(rows[0]["prob_neg"]) + float(rows[0]["prob_pos"]) - 1) < 1e-4
    for sub in ("merged", "adapter"):
        card = (out / sub / "README.md").read_text()
        assert card.startswith("---\nbase_model:") and "reviews: kd-lora" in card and "macro_f1" in card
        assert metrics["data_fingerprint"][:16] in card

    from transformers import pipeline

    clf = pipeline("text-classification", model=str(out / "merged"))
    assert clf("the good cat .")[0]["label"] in ("neg", "pos")


def test_predict_and_evaluate_on_raw_files(own_run):
    root, out = own_run
    (root / "raw.txt").write_text("the good cat .\nthe bad dog .\n")
    assert main(["predict", "--model-dir", str(out), "--input-file", str(root / "raw.txt"),
                 "--output-file", str(root / "p.jsonl")]) == 0  # fmt: skip
    lines = [json.loads(line) for line in (root / "p.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["0", "1"] and set(lines[0]["probabilities"]) == {"neg", "pos"}
    # A CSV with the run's own text column, the ids carried over, in input order.
    write(root / "raw.csv", _rows(70, seed=3))
    assert main(["predict", "--model-dir", str(out), "--input-file", str(root / "raw.csv"), "--id-column", "uid",
                 "--output-file", str(root / "p.csv"), "--batch-size", "8"]) == 0  # fmt: skip
    with (root / "p.csv").open() as f:
        assert [r["id"] for r in csv.DictReader(f)] == [f"r{i}" for i in range(70)]
    # evaluate reads the run's own data and labels
    assert main(["evaluate", "--model-dir", str(out), "--output", str(root / "eval.json")]) == 0
    result = json.loads((root / "eval.json").read_text())
    assert result["task"] == "reviews" and "macro_f1" in result
    bad = main(["predict", "--model-dir", str(out), "--input-file", str(root / "raw.csv"),
                "--output-file", str(root / "p.txt")])  # fmt: skip
    assert bad == 2 and not (root / "p.txt").exists()


def test_lora_and_fft_on_regression_pairs(tmp_path, tiny_bert_dir):
    rows = _rows(32, pair=True, regression=True)
    train, dev = write(tmp_path / "sim" / "train.parquet", rows), write(tmp_path / "sim" / "dev.parquet", rows[:8])
    for method in ("fft", "lora"):
        argv = ["train", "--method", method, "--model", str(tiny_bert_dir), "--train-file", str(train)]
        argv += ["--validation-file", str(dev), "--text-columns", "body,other", "--label-column", "tag"]
        assert main([*argv, "--epochs", "1", "--quiet", "--output-dir", str(tmp_path / method)]) == 0
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert metrics["task"] == "sim" and {"pearson", "spearman", "mse"} <= set(metrics)


def test_compare_sweep_report_and_bench_on_own_data(tmp_path, tiny_bert_dir):
    """The protocol layer on the user's files: --tasks names the data, the arms read the same files."""
    train = write(tmp_path / "d" / "train.csv", _rows(48))
    dev = write(tmp_path / "d" / "dev.csv", _rows(16, seed=1))
    data = ["--train-file", str(train), "--validation-file", str(dev), "--text-columns", "body"]
    data += ["--label-column", "tag"]
    out = tmp_path / "cmp"
    argv = ["compare", "--tasks", "reviews", "--seeds", "1", "--teacher-model", str(tiny_bert_dir)]
    argv += ["--student-layers", "0,2", "--epochs", "1", "--inference-runs", "1", "--quiet", "--output-dir", str(out)]
    assert main([*argv, *data, "--metric", "macro_f1"]) == 0
    for arm in ("fft", "lora", "kd-lora"):
        metrics = json.loads((out / "reviews" / "seed-1" / arm / "metrics.json").read_text())
        assert metrics["task"] == "reviews" and "macro_f1" in metrics
    assert "reviews" in (out / "report.md").read_text()

    grid = tmp_path / "grid.yaml"
    grid.write_text("points:\n  - {lr: 0.001}\n  - {lr: 0.002}\n")
    sweep = ["sweep", "--method", "lora", "--model", str(tiny_bert_dir), "--grid", str(grid), "--epochs", "1"]
    assert main([*sweep, *data, "--quiet", "--top-k", "1", "--output-dir", str(tmp_path / "sweep")]) == 0
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["task"] == "d"

    bench = ["bench", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0", "--ranks", "2", "--runs", "1"]
    assert main([*bench, *data, "--warmup", "0", "--skip-memory", "--output-dir", str(tmp_path / "bench")]) == 0
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert result["config"]["task"] == "d" and result["inference"]["examples"] == 16


def test_a_save_to_disk_dataset_with_its_own_splits(tmp_path):
    import datasets

    rows = _rows(8)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:4])})
    dd.save_to_disk(str(tmp_path / "mine"))
    args = DataArgs(dataset=str(tmp_path / "mine"), validation_split="test", text_columns=["body"], label_column="tag")
    assert args.task == "mine" and load_task(args).labels == ("neg", "pos")
    assert len(load_splits(args, ["train", "validation"])["validation"]) == 4
    with pytest.raises(KdloraError, match="has no split 'validation'; it has train, test"):
        load_splits(DataArgs(dataset=str(tmp_path / "mine"), text_columns=["body"], label_column="tag"), ["validation"])
