import json
import math

import numpy as np
import pytest

from common.metrics.classification import (
    abnormal_counts_per_image,
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    format_report,
    per_class_accuracy,
    screening_report,
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
    assert report["recall_NILM"] == pytest.approx(2 / 3) and report["recall_SCC"] is None
    json.dumps(report, allow_nan=False)  # strict JSON


def test_screening_on_a_hand_built_case():
    """NILM negative, LSIL/HSIL/SCC abnormal. True NILM: 2 passed, 1 flagged as LSIL (false positive).
    True LSIL: both flagged (one as HSIL, still a flag). True HSIL: 3 flagged, 1 called NILM (missed)."""
    screening = screening_report(CM, NAMES, ["LSIL", "HSIL", "SCC"])
    assert screening["abnormal_classes"] == ["LSIL", "HSIL", "SCC"]
    assert (screening["true_positives"], screening["false_negatives"]) == (5, 1)
    assert (screening["true_negatives"], screening["false_positives"]) == (2, 1)
    assert screening["sensitivity"] == pytest.approx(5 / 6)
    assert screening["specificity"] == pytest.approx(2 / 3)
    report = classification_report(CM, NAMES)
    report["screening"] = screening
    assert "sensitivity 0.8333, specificity 0.6667" in format_report(report)
    # no abnormal cell at all: sensitivity undefined, not 0
    assert screening_report(np.diag([4, 0, 0, 0]), NAMES, ["SCC"])["sensitivity"] is None
    with pytest.raises(ValueError, match="abnormal classes must be a non-empty subset"):
        screening_report(CM, NAMES, ["ASCUS"])


def test_abnormal_cells_counted_per_image():
    images = ["a.png"] * 4 + ["b.png"] * 5
    counts = abnormal_counts_per_image(images, Y_TRUE, Y_PRED, NAMES, ["LSIL", "HSIL", "SCC"])
    # a.png: true 0 0 0 1 / predicted 0 0 1 1; b.png: true 1 2 2 2 2 / predicted 2 2 2 2 0
    assert counts == {
        "a.png": {"cells": 4, "true_abnormal": 1, "predicted_abnormal": 2},
        "b.png": {"cells": 5, "true_abnormal": 5, "predicted_abnormal": 4},
    }
    with pytest.raises(ValueError, match="got 2 image names for 9 labels"):
        abnormal_counts_per_image(images[:2], Y_TRUE, Y_PRED, NAMES, ["SCC"])
