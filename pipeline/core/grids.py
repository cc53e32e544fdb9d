"""Image grids: the seed article's 3x3 sample grid and the gallery of misclassified digits.

Apart from plots.py so that editing a grid re-runs only the stages that draw one (preprocess,
report), not training: dvc.yaml's code deps follow the imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from pipeline.core.plots import save_figure


def sample_grid(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """3x3 grid of the first nine images with their labels."""
    fig, axes = plt.subplots(3, 3, figsize=(5, 5))
    for ax, image, label in zip(axes.flat, images[:9], labels[:9], strict=False):
        ax.imshow(image, cmap="gray")
        ax.set_title(str(label))
        ax.axis("off")
    save_figure(fig, path)


def image_gallery(images: np.ndarray, titles: Sequence[str], path: Path, columns: int = 8) -> None:
    """Small multiples of images with a caption each (e.g. misclassified digits)."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.2, rows * 1.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image, cmap="gray")
        ax.set_title(title, fontsize=8)
    save_figure(fig, path)
