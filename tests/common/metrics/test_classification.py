import json
import math

import numpy as np
import pytest

from common.metrics.classification import (
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    per_class_accuracy,
)

NAMES = ["NILM", "LSIL", "HSIL", "SCC"]
# class 3 (SCC) has no samples and is never predicted
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 2, 2, 2, 2, 0]
CM = np.array([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
BALANCED = (2 / 3 + 1 / 2 + 3 / 4) / 3


def test_confusion_matrix_and_accuracies_on_a_hand_example():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 4)
    np.testing.assert_array_equal(cm, CM)
    np.testing.assert_allclose(per_class_accuracy(cm), [2 / 3, 1 / 2, 3 / 4, np.nan])
    assert balanced_accuracy(cm) == pytest.approx(BALANCED)
    assert math.isnan(balanced_accuracy(np.zeros((3, 3))))
    with pytest.raises(ValueError, match=r"y_pred must lie in 0\.\.3"):
        confusion_matrix([0], [4], 4)


def test_report_figures():
    report = classification_report(CM, NAMES)
    assert report["n_samples"] == 9
    assert report["accuracy"] == pytest.approx(6 / 9)
    assert report["balanced_accuracy"] == pytest.approx(BALANCED)
    nilm = {"support": 3, "recall": 2 / 3, "precision": 2 / 3, "f1": 2 / 3}
    assert report["per_class"]["NILM"] == pytest.approx(nilm)
    assert report["per_class"]["LSIL"]["f1"] == pytest.approx(2 * 1 / (2 + 2))
    assert report["per_class"]["SCC"] == {"support": 0, "recall": None, "precision": None, "f1": None}
    json.dumps(report, allow_nan=False)  # strict JSON
