"""Prepared data: the model-ready form of a dataset's images and labels, and its files.

A split is flattened images scaled to float32 [0, 1] (shape (N, rows*cols)) with one-hot float32
labels (shape (N, 10)), saved as a .npz holding x, y and image_shape.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.infra.errors import DataError
from pipeline.infra.files import atomic_path

NUM_CLASSES = 10


@dataclass(frozen=True)
class Split:
    """One prepared split: flattened scaled images, one-hot labels, and the 2-D image shape."""

    x: np.ndarray
    y: np.ndarray
    image_shape: tuple[int, int]

    @property
    def labels(self) -> np.ndarray:
        return self.y.argmax(axis=1)

    @property
    def images(self) -> np.ndarray:
        return self.x.reshape(-1, *self.image_shape)


def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """Flatten, scale to float32 [0, 1], one-hot encode."""
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    return Split(x=x, y=y, image_shape=(int(images.shape[1]), int(images.shape[2])))


def save_split(split: Split, path: Path) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, x=split.x, y=split.y, image_shape=np.array(split.image_shape))


@functools.lru_cache(maxsize=4)
def _load_split_cached(path: str, mtime_ns: int) -> Split:
    with np.load(path) as data:
        return Split(
            x=data["x"], y=data["y"], image_shape=tuple(int(v) for v in data["image_shape"])
        )


def load_split(path: Path) -> Split:
    """Load a prepared split; cached per process, so sweep jobs and folds read the file once.
    DataError, naming the fix (re-run preprocess), for a file that is missing or damaged
    (truncated, overwritten, not a split's .npz)."""
    if not path.exists():
        raise DataError(f"{path} is missing. Run `python -m pipeline.preprocess` (or `dvc repro`).")
    try:
        return _load_split_cached(str(path.resolve()), path.stat().st_mtime_ns)
    # What np.load raises for a file that is not (or no longer) a whole .npz of x, y and
    # image_shape: no zip at all (BadZipFile; the "pickled data ... allow_pickle" ValueError for
    # other bytes), a cut-off member (EOFError, zlib.error), a missing array (KeyError).
    # NumPy's own words are left out: for other bytes they suggest allow_pickle, which would
    # run whatever the file holds.
    except (zipfile.BadZipFile, ValueError, EOFError, zlib.error, KeyError):
        raise DataError(
            f"{path} is damaged: not a whole prepared split (a .npz of x, y and image_shape). "
            "Fix: re-run preprocess (`dvc repro preprocess`, or `python -m pipeline.preprocess`)"
        ) from None
