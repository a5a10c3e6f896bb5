"""`kdcache.metrics` against the reference implementations: sklearn.metrics and scipy.stats."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdcache.train.metrics import PRIMARY_METRIC, compute_metrics, primary_metric


def _logits_for(prediction: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Random logits whose argmax is `prediction` (so the metric sees exactly these predicted classes)."""
    logits = rng.normal(size=(len(prediction), num_classes))
    logits[np.arange(len(prediction)), prediction] = logits.max(axis=1) + 1.0 + rng.random(len(prediction))
    return logits


# --- which metric ranks checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("task,kind,expected", [
    ("cola", "classification", "mcc"), ("mrpc", "classification", "f1"), ("qqp", "classification", "f1"),
    ("stsb", "regression", "pearson"), ("sst2", "classification", "accuracy"), ("rte", "classification", "accuracy"),
    ("mnli", "classification", "accuracy"), ("digits", "classification", "accuracy"),
    ("cifar10", "classification", "accuracy"), ("text", "regression", "pearson"),
])
def test_primary_metric_per_task(task, kind, expected):
    assert primary_metric(task, kind) == expected


def test_primary_metric_table_covers_the_glue_exceptions_only():
    assert PRIMARY_METRIC == {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}


# --- classification against sklearn -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_accuracy_matches_sklearn_on_random_logits(seed, num_classes):
    rng = np.random.default_rng(seed)
    n = 200 + seed
    logits = rng.normal(size=(n, num_classes))
    labels = rng.integers(0, num_classes, size=n)
    result = compute_metrics(logits, labels, task="sst2")
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, logits.argmax(1)), abs=1e-12)
    assert result["metric"] == result["accuracy"]
    assert result["rows"] == n
    assert "f1" not in result and "mcc" not in result


def test_accuracy_hand_made():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])  # predicts 0, 1, 0, 1
    labels = np.array([0, 1, 1, 0])
    assert compute_metrics(logits, labels, task="rte")["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
@pytest.mark.parametrize("seed", range(6))
def test_f1_of_the_positive_class_matches_sklearn(task, seed):
    rng = np.random.default_rng(100 + seed)
    n = 150
    labels = rng.integers(0, 2, size=n)
    # predictions correlated with the labels, so F1 is neither 0 nor 1
    prediction = np.where(rng.random(n) < 0.7, labels, 1 - labels)
    logits = _logits_for(prediction, 2, rng)
    result = compute_metrics(logits, labels, task=task)
    assert result["f1"] == pytest.approx(f1_score(labels, prediction), abs=1e-12)
    assert result["metric"] == result["f1"]
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, prediction), abs=1e-12)


def test_f1_hand_made():
    # tp = 2 (rows 0, 1), fp = 1 (row 2), fn = 1 (row 3), tn = 1 (row 4): F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    labels = np.array([1, 1, 0, 1, 0])
    prediction = np.array([1, 1, 1, 0, 0])
    logits = np.eye(2)[prediction]
    assert compute_metrics(logits, labels, task="mrpc")["f1"] == pytest.approx(2 / 3)


def test_f1_without_true_positives_is_zero():
    labels = np.array([1, 1, 0, 0])
    prediction = np.array([0, 0, 1, 1])
    result = compute_metrics(np.eye(2)[prediction], labels, task="mrpc")
    assert result["f1"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert result["f1"] == f1_score(labels, prediction, zero_division=0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_mcc_matches_sklearn(seed, num_classes):
    rng = np.random.default_rng(200 + seed)
    n = 180
    labels = rng.integers(0, num_classes, size=n)
    prediction = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, size=n))
    logits = _logits_for(prediction, num_classes, rng)
    result = compute_metrics(logits, labels, task="cola")
    assert result["mcc"] == pytest.approx(matthews_corrcoef(labels, prediction), abs=1e-12)
    assert result["metric"] == result["mcc"]
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, prediction), abs=1e-12)


def test_mcc_hand_made():
    # tp=3 tn=2 fp=1 fn=1: MCC = (3*2 - 1*1) / sqrt(4*4*3*3) = 5/12
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    prediction = np.array([1, 1, 1, 0, 0, 0, 1])
    assert compute_metrics(np.eye(2)[prediction], labels, task="cola")["mcc"] == pytest.approx(5 / 12)


def test_mcc_of_a_perfectly_wrong_binary_predictor_is_minus_one():
    labels = np.array([0, 1, 0, 1, 1])
    assert compute_metrics(np.eye(2)[1 - labels], labels, task="cola")["mcc"] == pytest.approx(-1.0)


def test_mcc_when_prediction_uses_classes_absent_from_labels():
    labels = np.array([0, 0, 1, 1, 0, 1])
    prediction = np.array([0, 2, 1, 2, 0, 1])
    result = compute_metrics(np.eye(3)[prediction], labels, task="cola")
    assert result["mcc"] == pytest.approx(matthews_corrcoef(labels, prediction), abs=1e-12)


@pytest.mark.parametrize("constant", [0, 1])
def test_mcc_of_a_constant_predictor_is_zero_not_nan(constant):
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    prediction = np.full(len(labels), constant)
    result = compute_metrics(np.eye(2)[prediction], labels, task="cola")
    assert result["mcc"] == 0.0
    assert result["mcc"] == matthews_corrcoef(labels, prediction)


@pytest.mark.parametrize("task,name,reference", [
    ("cola", "mcc", matthews_corrcoef), ("mrpc", "f1", f1_score), ("sst2", "accuracy", accuracy_score),
])
def test_unlabelled_rows_are_left_out(task, name, reference):
    rng = np.random.default_rng(7)
    n = 120
    labels = rng.integers(0, 2, size=n)
    prediction = np.where(rng.random(n) < 0.65, labels, 1 - labels)
    logits = _logits_for(prediction, 2, rng)
    masked = labels.copy()
    hidden = rng.random(n) < 0.3
    masked[hidden] = -1
    result = compute_metrics(logits, masked, task=task)
    keep = ~hidden
    assert result["rows"] == int(keep.sum())
    assert result[name] == pytest.approx(reference(labels[keep], prediction[keep]), abs=1e-12)
    # and the hidden rows really change the answer when counted: the test can tell the difference
    assert result[name] != pytest.approx(reference(labels, prediction), abs=1e-9)


def test_all_rows_unlabelled_gives_nan_accuracy_and_zero_rows():
    result = compute_metrics(np.zeros((4, 3)), np.full(4, -1), task="sst2")
    assert result["rows"] == 0
    assert np.isnan(result["accuracy"])


# --- regression against scipy -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", ["column", "flat"])
def test_pearson_and_spearman_match_scipy(seed, shape):
    rng = np.random.default_rng(300 + seed)
    n = 97
    target = rng.uniform(0, 5, size=n)
    prediction = target + rng.normal(scale=1.5, size=n)
    prediction[:10] = np.round(prediction[:10])  # some ties, so Spearman's average ranks matter
    target[10:20] = np.round(target[10:20])
    outputs = prediction[:, None] if shape == "column" else prediction
    result = compute_metrics(outputs, target.astype(np.float32), task="stsb", kind="regression")
    t = target.astype(np.float32).astype(np.float64)
    assert result["pearson"] == pytest.approx(pearsonr(prediction, t).statistic, abs=1e-10)
    assert result["spearman"] == pytest.approx(spearmanr(prediction, t).statistic, abs=1e-10)
    assert result["mse"] == pytest.approx(float(np.mean((prediction - t) ** 2)), rel=1e-12)
    assert result["metric"] == result["pearson"]
    assert result["rows"] == n


def test_regression_hand_made():
    prediction = np.array([1.0, 2.0, 3.0, 4.0])
    target = np.array([2.0, 4.0, 6.0, 8.0])
    result = compute_metrics(prediction, target, task="stsb", kind="regression")
    assert result["pearson"] == pytest.approx(1.0)
    assert result["spearman"] == pytest.approx(1.0)
    assert result["mse"] == pytest.approx((1 + 4 + 9 + 16) / 4)
    # a monotone but non-linear relation: Spearman 1, Pearson below 1
    result = compute_metrics(prediction, prediction ** 3, task="stsb", kind="regression")
    assert result["spearman"] == pytest.approx(1.0)
    assert result["pearson"] < 0.99


def test_nan_targets_are_left_out():
    rng = np.random.default_rng(11)
    n = 80
    target = rng.uniform(0, 5, size=n)
    prediction = target + rng.normal(size=n)
    masked = target.copy()
    hidden = rng.random(n) < 0.25
    masked[hidden] = np.nan
    result = compute_metrics(prediction[:, None], masked, task="stsb", kind="regression")
    keep = ~hidden
    assert result["rows"] == int(keep.sum())
    assert result["pearson"] == pytest.approx(pearsonr(prediction[keep], target[keep]).statistic, abs=1e-10)
    assert result["spearman"] == pytest.approx(spearmanr(prediction[keep], target[keep]).statistic, abs=1e-10)
    assert not np.isnan(result["mse"])


@pytest.mark.parametrize("value", [0.0, 0.1, 1 / 3, 2.7, 123.456])
def test_constant_regression_predictor_scores_zero_not_nan(value):
    target = np.random.default_rng(5).uniform(0, 5, size=101)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from a 0/0 either
        result = compute_metrics(np.full((101, 1), value), target, task="stsb", kind="regression")
    for name in ("pearson", "spearman", "metric"):
        assert not np.isnan(result[name])
        assert result[name] == pytest.approx(0.0, abs=1e-9)


def test_constant_target_scores_zero_not_nan():
    prediction = np.random.default_rng(6).normal(size=30)
    result = compute_metrics(prediction, np.full(30, 3.0), task="stsb", kind="regression")
    assert result["pearson"] == pytest.approx(0.0, abs=1e-9)
    assert result["spearman"] == pytest.approx(0.0, abs=1e-9)


def test_fewer_than_two_labelled_rows_scores_zero():
    result = compute_metrics(np.array([1.0, 2.0, 3.0]), np.array([np.nan, 2.0, np.nan]), task="stsb",
                             kind="regression")
    assert result["rows"] == 1
    assert result["pearson"] == 0.0 and result["spearman"] == 0.0
