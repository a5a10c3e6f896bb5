"""Validation metrics, one primary metric per task, so every run selects its best checkpoint the way GLUE scores it.

GLUE's published metrics: Matthews correlation for CoLA, F1 (of the positive class) for MRPC and QQP, Pearson
correlation for STS-B (Spearman reported beside it), accuracy for every other task. Rows without a label
(-1, or NaN for regression) are left out.
"""

from __future__ import annotations

import numpy as np

PRIMARY_METRIC = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}


def primary_metric(task: str, kind: str = "classification") -> str:
    """The metric that ranks checkpoints for `task`: higher is better for every one of them but a language model's
    perplexity (kdcache.names.better)."""
    if kind == "lm":
        return "perplexity"
    if task in PRIMARY_METRIC:
        return PRIMARY_METRIC[task]
    return "pearson" if kind == "regression" else "accuracy"


def compute_metrics(outputs: np.ndarray, labels: np.ndarray, *, task: str, kind: str = "classification") -> dict[str, float]:
    """All metrics for one evaluation pass; `outputs` are (N, C) logits, or (N, 1)/(N,) for regression.

    Returns the primary metric under its name and under "metric", plus the usual companions (accuracy beside
    F1 and MCC, Spearman beside Pearson).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    labels = np.asarray(labels)
    if kind == "regression":
        prediction = outputs.reshape(len(outputs), -1)[:, 0]
        target = labels.astype(np.float64)
        keep = ~np.isnan(target)
        prediction, target = prediction[keep], target[keep]
        result = {"pearson": _correlation(prediction, target), "spearman": _correlation(_ranks(prediction), _ranks(target)),
                  "mse": float(np.mean((prediction - target) ** 2)) if len(target) else float("nan")}
    else:
        keep = labels != -1
        prediction, target = outputs[keep].argmax(axis=1), labels[keep].astype(np.int64)
        result = {"accuracy": float(np.mean(prediction == target)) if len(target) else float("nan")}
        name = primary_metric(task, kind)
        if name == "f1":
            result["f1"] = _f1(prediction, target)
        elif name == "mcc":
            result["mcc"] = _mcc(prediction, target)
    result["metric"] = result[primary_metric(task, kind)]
    result["rows"] = int(keep.sum())
    return result


#: A score has learned something only when it closes at least this share of the gap between a constant
#: predictor's score and a perfect one (1 for every primary metric): below it a model is "not clearly better" than
#: the constant, said at the end of a run; a run whose best never got there has no level to fall from
#: (docs/cli.md, "When training goes wrong"). A tenth: noise on a few hundred validation rows stays under it.
CLEAR_GAIN = 0.1


def clearly_better(floor: float, kind: str = "classification") -> float:
    """The score a model must reach to be clearly better than a constant predictor scoring `floor` (a perfect score
    is 1 for every primary metric: a perplexity of 1 too, approached from above)."""
    return floor + CLEAR_GAIN * (1.0 - floor)


def unigram_perplexity(train_tokens: np.ndarray, next_tokens: np.ndarray, outputs: int) -> float:
    """A language model's constant predictor: the training tokens' frequencies (add-one smoothed over the `outputs`
    ids), its perplexity on `next_tokens` (the real positions' next tokens of the selection split)."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=outputs)[:outputs] + 1.0
    log_p = np.log(counts / counts.sum())
    next_tokens = np.asarray(next_tokens, dtype=np.int64)
    return float(np.exp(-log_p[next_tokens].mean())) if len(next_tokens) else float("nan")


def constant_baseline(train_labels: np.ndarray, labels: np.ndarray, *, task: str, kind: str = "classification",
                      label_names: list[str] | None = None) -> dict[str, object]:
    """The score of a predictor that ignores its input (the training labels' majority class; for regression their
    mean) on `labels`: the floor a trained model must clear to have learned anything at all."""
    train_labels, labels = np.asarray(train_labels), np.asarray(labels)
    if kind == "regression":
        known = train_labels[~np.isnan(train_labels.astype(np.float64))]
        value = float(known.mean()) if len(known) else 0.0
        score = compute_metrics(np.full((len(labels), 1), value), labels, task=task, kind=kind)
        return {"metric": score["metric"], "predictor": f"the constant {value:.4g} (the training labels' mean)"}
    known = train_labels[train_labels != -1].astype(np.int64)
    majority = int(np.bincount(known).argmax()) if len(known) else 0
    width = max(majority, int(labels.max(initial=0))) + 1
    outputs = np.zeros((len(labels), width))
    outputs[:, majority] = 1.0
    name = label_names[majority] if label_names and majority < len(label_names) else str(majority)
    return {"metric": compute_metrics(outputs, labels, task=task, kind=kind)["metric"],
            "predictor": f"always the majority class {name!r}"}


def _f1(prediction: np.ndarray, target: np.ndarray, positive: int = 1) -> float:
    tp = float(np.sum((prediction == positive) & (target == positive)))
    fp = float(np.sum((prediction == positive) & (target != positive)))
    fn = float(np.sum((prediction != positive) & (target == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _mcc(prediction: np.ndarray, target: np.ndarray) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004); 0 when either side is constant, as sklearn does."""
    classes = np.union1d(prediction, target)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (np.searchsorted(classes, target), np.searchsorted(classes, prediction)), 1)
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - t @ p) / denominator)


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return 0.0  # a constant predictor carries no correlation; report 0 rather than NaN so selection works
    return float(np.corrcoef(a, b)[0, 1])
