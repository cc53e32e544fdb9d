"""The test metrics: each is one function of the true labels and the predicted probabilities.

train writes every entry of `evaluate` as `test_<name>` into metrics/train.json and MLflow, and
the report shows whatever `test_*` keys it finds there: a new test metric is one function added
to METRICS.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.core.data import NUM_CLASSES

# Keras' backend.epsilon(): the clipping its cross-entropy applies before the log.
EPSILON = 1e-7


def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Fraction of samples whose most probable class is the true one."""
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean categorical cross-entropy, -log p(true class), in nats: as Keras computes it
    (keras.losses.categorical_crossentropy: rows renormalised to sum to 1, then clipped to
    [1e-7, 1 - 1e-7] before the log), so it matches the training loss Keras reports."""
    p = probabilities / probabilities.sum(axis=1, keepdims=True)
    p_true = np.clip(p[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    return float(np.mean(-np.log(p_true.astype(np.float64))))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "loss": loss,
    "accuracy": accuracy,
}


def evaluate(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Every test metric, name -> value, for integer `labels` (N,) in 0..9 and the model's
    class `probabilities` (N, 10)."""
    return {name: metric(labels, probabilities) for name, metric in METRICS.items()}


def confusion(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The confusion matrix (10, 10) of integer class labels `actual` and `predicted` (N,) in
    0..9: entry [t, p] counts the samples of true class t predicted as p (rows true, columns
    predicted, as sklearn.metrics.confusion_matrix); every pair counts, repeats included."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)
    np.add.at(matrix, (actual, predicted), 1)
    return matrix
