"""Test-set metrics: accuracy for every task, F1 and ROC AUC for binary tasks.

Example:
    >>> import numpy as np
    >>> classification_metrics(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 0]))["test_accuracy"]
    1.0
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score


def classification_metrics(logits: np.ndarray, y: np.ndarray, prefix: str = "test_") -> dict[str, float]:
    """Accuracy (and F1/AUC of class 1 for binary problems) from logits."""
    pred = logits.argmax(1)
    out = {f"{prefix}accuracy": float((pred == y).mean())}
    if logits.shape[1] == 2:
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z[:, 1]) / np.exp(z).sum(1)
        out[f"{prefix}f1"] = float(f1_score(y, pred, zero_division=0))
        out[f"{prefix}auc"] = float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else float("nan")
    return out
