"""Validation metrics over a whole split: macro F1 (the competition's metric), accuracy, cross-entropy."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def classification_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Macro F1, accuracy and mean cross-entropy of probabilities [N, C] against integer labels [N]."""
    predicted = probs.argmax(axis=1)
    true_prob = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return {
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "accuracy": float((predicted == labels).mean()),
        "loss": float(-np.log(true_prob).mean()),
    }
