"""Detection metrics with unsafe (label 1) as the positive class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import DataError


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties counted half). NaN if one class is absent."""
    pos, neg = score[y_true == 1], score[y_true == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    ranks[order] = np.arange(1, len(order) + 1)
    # average ranks over ties
    _, first, counts = np.unique(values, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        if count > 1:
            ranks[order[start : start + count]] = ranks[order[start : start + count]].mean()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def detection_metrics(y_true: Any, score: Any, threshold: float = 0.0) -> dict[str, float]:
    """Accuracy, precision, recall, F1, FPR (unsafe = positive, predicted iff score > threshold) and AUROC."""
    y = np.asarray(torch.as_tensor(y_true).cpu()).astype(int)
    s = np.asarray(torch.as_tensor(score, dtype=torch.float64).cpu())
    if y.shape != s.shape or y.ndim != 1 or len(y) == 0:
        raise DataError(f"labels {y.shape} and scores {s.shape} must be equal-length, non-empty 1-D arrays")
    pred = s > threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    tn = int((~pred & (y == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(y),
        "accuracy": (tp + tn) / len(y),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "auroc": auroc(y, s),
    }
