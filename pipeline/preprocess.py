"""Stage 2: parse the raw IDX files into model-ready arrays, a dataset summary and a sample grid.

Outputs in data/prepared/: train.npz and test.npz (x: float32 in [0, 1], flattened; y: one-hot
float32; image_shape), summary.json (shapes, sizes, class counts, content hash) and samples.png.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline import paths
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.files import atomic_path, write_json
from pipeline.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_gzip_bytes
from pipeline.stage import run_stage

log = logging.getLogger(__name__)
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


def read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Parse one images/labels pair; returns (images, labels, sha256 of their raw bytes)."""
    for path in (images_path, labels_path):
        if not path.exists():
            raise DataError(f"{path} is missing. Run `python -m pipeline.fetch` (or `dvc repro`).")
    image_bytes, label_bytes = read_gzip_bytes(images_path), read_gzip_bytes(labels_path)
    images = parse_idx(image_bytes, IMAGES_MAGIC, images_path)
    labels = parse_idx(label_bytes, LABELS_MAGIC, labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected 3 dimensions (N, rows, cols), got {images.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    digest = hashlib.sha256(image_bytes + label_bytes).hexdigest()
    return images, labels, digest


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
    """Load a prepared split; cached per process, so sweep jobs and folds read the file once."""
    if not path.exists():
        raise DataError(f"{path} is missing. Run `python -m pipeline.preprocess` (or `dvc repro`).")
    return _load_split_cached(str(path.resolve()), path.stat().st_mtime_ns)


def preprocess(raw_dir: Path, out_dir: Path, dataset: str) -> dict:
    """Turn raw_dir's four IDX files into out_dir's arrays, summary and sample grid."""
    from pipeline.plots import sample_grid

    train_images, train_labels, train_sha = read_split(
        raw_dir / paths.TRAIN_IMAGES, raw_dir / paths.TRAIN_LABELS
    )
    test_images, test_labels, test_sha = read_split(
        raw_dir / paths.TEST_IMAGES, raw_dir / paths.TEST_LABELS
    )
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"train images are {train_images.shape[1:]} but test images {test_images.shape[1:]}"
        )
    train, test = to_split(train_images, train_labels), to_split(test_images, test_labels)
    save_split(train, out_dir / "train.npz")
    save_split(test, out_dir / "test.npz")
    summary = {
        "dataset": dataset,
        "image_shape": list(train.image_shape),
        "num_classes": NUM_CLASSES,
        "train": {
            "x_shape": list(train.x.shape),
            "y_shape": list(train.y.shape),
            "class_counts": np.bincount(train_labels, minlength=NUM_CLASSES).tolist(),
        },
        "test": {
            "x_shape": list(test.x.shape),
            "y_shape": list(test.y.shape),
            "class_counts": np.bincount(test_labels, minlength=NUM_CLASSES).tolist(),
        },
        "x_dtype": str(train.x.dtype),
        "x_range": [float(train.x.min(initial=0)), float(train.x.max(initial=0))],
        "sha256": hashlib.sha256((train_sha + test_sha).encode()).hexdigest(),
    }
    write_json(out_dir / "summary.json", summary)
    sample_grid(train_images, train_labels, out_dir / "samples.png")
    log.info(
        "prepared %s: %d train, %d test images of %s",
        dataset,
        len(train.x),
        len(test.x),
        train.image_shape,
    )
    return summary


def _run(cfg: Config) -> None:
    preprocess(paths.RAW_DIR / cfg.dataset.name, paths.PREPARED_DIR, cfg.dataset.name)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, _run)


if __name__ == "__main__":
    main()
