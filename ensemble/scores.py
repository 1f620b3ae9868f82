"""Metrics (macro F1 as the competition computes it, accuracy, log loss) on numpy arrays."""

from __future__ import annotations

import numpy as np

EPS = 1e-15


def per_class_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """F1 of every class and a mask of the classes present in labels or predictions."""
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted_count = confusion.sum(1), confusion.sum(0)
    denominator = support + predicted_count
    f1 = np.divide(2 * tp, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return f1, denominator > 0


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Macro F1 over the classes present in labels or predictions (scikit-learn's f1_score(average='macro'))."""
    f1, present = per_class_f1(labels, predicted, num_classes)
    return float(f1[present].mean()) if present.any() else 0.0


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true class."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0))))


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Macro F1, accuracy and log loss of probabilities [N, C]."""
    predicted = probs.argmax(axis=1)
    return {
        "macro_f1": macro_f1(labels, predicted, probs.shape[1]),
        "accuracy": float((predicted == labels).mean()),
        "log_loss": log_loss(labels, probs),
    }
