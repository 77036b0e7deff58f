import math

import pytest
import torch

from safeflow.evaluation import detection_metrics
from safeflow.errors import DataError


def test_metrics_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [2.0, 0.5, -1.0, 0.3, -0.2, -3.0, -4.0]  # tp=2 fn=1 fp=1 tn=3
    m = detection_metrics(y, s)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["fpr"] == pytest.approx(1 / 4)
    # AUROC: pairs (pos > neg): 2.0 beats 4, 0.5 beats 4, -1.0 beats 2 -> 10/12
    assert m["auroc"] == pytest.approx(10 / 12)


def test_auroc_ties_count_half_and_single_class_is_nan():
    assert detection_metrics([1, 0], [1.0, 1.0])["auroc"] == pytest.approx(0.5)
    assert math.isnan(detection_metrics([1, 1], [1.0, 2.0])["auroc"])


def test_mismatched_inputs():
    with pytest.raises(DataError):
        detection_metrics(torch.tensor([1, 0]), torch.tensor([1.0]))
