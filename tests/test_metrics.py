import numpy as np
import pytest

from privfer.metrics import classification_report


def test_report_matches_hand_computed_values():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2])
    report = classification_report(y_true, y_pred, class_names=("a", "b", "c"))
    a, b, c = (report["per_class"][k] for k in "abc")
    assert a["precision"] == pytest.approx(1 / 2) and a["recall"] == pytest.approx(1 / 2)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == pytest.approx(1.0)
    assert b["f1"] == pytest.approx(0.8)
    assert c["precision"] == pytest.approx(1.0) and c["recall"] == pytest.approx(1 / 2)
    assert report["micro"]["f1"] == pytest.approx(4 / 6) == report["accuracy"]
    assert report["macro"]["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_classes_never_predicted_count_as_zero_not_nan():
    report = classification_report(np.array([0, 1]), np.array([0, 0]), class_names=("a", "b"))
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert np.isfinite(report["macro"]["f1"])
