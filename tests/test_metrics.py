import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdlora.kinds import kind_of
from kdlora.metrics import combine_splits, glue_score
from kdlora.tasks import TASKS, get_task


def _metrics(task, preds, golds):
    return kind_of(task).metrics(task, preds, golds)


PREDS = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
GOLDS = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])


def test_cola_is_matthews():
    m = _metrics(get_task("cola"), PREDS, GOLDS)
    assert m["matthews_correlation"] == pytest.approx(matthews_corrcoef(GOLDS, PREDS))
    assert m["score"] == pytest.approx(100 * matthews_corrcoef(GOLDS, PREDS))


@pytest.mark.parametrize("name", ["mrpc", "qqp"])
def test_mrpc_qqp_mean_of_accuracy_and_f1(name):
    m = _metrics(get_task(name), PREDS, GOLDS)
    acc, f1 = accuracy_score(GOLDS, PREDS), f1_score(GOLDS, PREDS)
    assert (m["accuracy"], m["f1"]) == (pytest.approx(acc), pytest.approx(f1))
    assert m["score"] == pytest.approx(100 * (acc + f1) / 2)


def test_stsb_mean_of_pearson_and_spearman():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 50)
    pred = gold + rng.normal(0, 1, 50)
    m = _metrics(get_task("stsb"), pred, gold)
    p, s = pearsonr(pred, gold)[0], spearmanr(pred, gold)[0]
    assert m["score"] == pytest.approx(100 * (p + s) / 2)
    assert _metrics(get_task("stsb"), np.ones(50), gold)["score"] == 0.0  # constant output: no correlation


@pytest.mark.parametrize("name", ["sst2", "qnli", "rte", "wnli"])
def test_others_accuracy(name):
    assert _metrics(get_task(name), PREDS, GOLDS)["score"] == pytest.approx(100 * accuracy_score(GOLDS, PREDS))


def test_mnli_scores_matched_and_mismatched():
    task = get_task("mnli")
    assert task.eval_splits == ("validation_matched", "validation_mismatched")
    flat = combine_splits(
        task,
        {
            "validation_matched": {"accuracy": 0.8, "score": 80.0},
            "validation_mismatched": {"accuracy": 0.7, "score": 70.0},
        },
    )
    assert flat == {"accuracy_m": 0.8, "accuracy_mm": 0.7, "score": 75.0}


def test_registry_has_all_nine_tasks_and_glue_score():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert get_task("stsb").kind == "regression" and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert glue_score({"cola": 50.0, "rte": 70.0}) == 60.0
