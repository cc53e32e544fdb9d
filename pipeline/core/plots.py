"""The training figures: history curves, fold boxplot, confusion matrix (image grids: grids.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, works headless and in CI

import matplotlib.pyplot as plt
import numpy as np

from pipeline.infra.files import atomic_path

TRAIN_COLOR, VALIDATION_COLOR = "red", "green"


def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def history_rows(history: Mapping[str, Sequence[float]], **extra: int) -> list[dict[str, float]]:
    """The history as CSV rows for `dvc plots`: one per epoch (1-based), any extra constant
    columns (e.g. fold) first."""
    epochs = len(next(iter(history.values())))
    return [
        {**extra, "epoch": e + 1, **{k: v[e] for k, v in history.items()}} for e in range(epochs)
    ]


def history_curves(histories: Sequence[Mapping[str, Sequence[float]]], path: Path) -> None:
    """The seed's two panels (cross-entropy loss, accuracy): train red, validation green,
    one line pair per history (one per fold, or one for a single training run). A history
    holds train_loss and train_accuracy, and val_loss and val_accuracy when validated."""
    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for ax, key, title in (
        (loss_ax, "loss", "Cross Entropy Loss"),
        (acc_ax, "accuracy", "Classification Accuracy"),
    ):
        for i, history in enumerate(histories):
            train = history[f"train_{key}"]
            epochs = np.arange(1, len(train) + 1)
            ax.plot(epochs, train, color=TRAIN_COLOR, label="train" if i == 0 else None)
            if f"val_{key}" in history:
                ax.plot(
                    epochs,
                    history[f"val_{key}"],
                    color=VALIDATION_COLOR,
                    label="validation" if i == 0 else None,
                )
        ax.set_title(title)
        ax.legend()
    acc_ax.set_xlabel("epoch")
    save_figure(fig, path)


def fold_boxplot(accuracies: Sequence[float], path: Path, repeats: int = 1) -> None:
    """Box-and-whisker plot of the per-fold accuracies (of all `repeats` x folds fold runs)."""
    fig, ax = plt.subplots(figsize=(4, 5))
    ax.boxplot(accuracies)
    folds = len(accuracies) // repeats
    ax.set_xticks([1], [f"{folds} folds" if repeats == 1 else f"{repeats} x {folds} folds"])
    ax.set_ylabel("accuracy")
    ax.set_title("Cross-validation accuracy")
    save_figure(fig, path)


def confusion_matrix(matrix: np.ndarray, path: Path) -> None:
    """Counts of true (rows) vs predicted (columns) classes."""
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(matrix, cmap="Blues")
    n = matrix.shape[0]
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=7)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)
