"""Classification metrics as the seed paper reports them: per-class P/R/F1, micro and macro means."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from privfer import EMOTIONS


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, classes) counts; rows are true classes, columns predictions."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y_true.shape} vs {y_pred.shape}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str] = EMOTIONS
) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, plus micro and macro averages.

    Micro averages pool every decision (for single-label data they all equal
    accuracy); macro averages are unweighted means over classes, the seed
    paper's headline number. Undefined ratios (no prediction or no example of a
    class) count as 0, as in scikit-learn's ``zero_division=0``.
    """
    k = len(class_names)
    matrix = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, actual)
    f1 = _ratio(2 * precision * recall, precision + recall)
    micro_p = float(_ratio(tp.sum(), predicted.sum()))
    micro_r = float(_ratio(tp.sum(), actual.sum()))
    micro_f1 = float(_ratio(2 * micro_p * micro_r, micro_p + micro_r))
    return {
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, name in enumerate(class_names)
        },
        "micro": {"precision": micro_p, "recall": micro_r, "f1": micro_f1},
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "accuracy": float(_ratio(tp.sum(), matrix.sum())),
        "support": int(matrix.sum()),
        "confusion_matrix": matrix.tolist(),
    }
