"""Stage 2: parse the raw IDX files into model-ready arrays, a dataset summary and a sample grid.

Outputs in data/prepared/: train.npz and test.npz (x: float32 in [0, 1], flattened; y: one-hot
float32; image_shape), summary.json (shapes, sizes, class counts, content hash) and samples.png.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.core.data import NUM_CLASSES, save_split, to_split
from pipeline.core.idx import read_split
from pipeline.infra import paths
from pipeline.infra.config import Config
from pipeline.infra.errors import DataError
from pipeline.infra.files import replaced_together, write_json
from pipeline.infra.stage import run_main, run_stage

log = logging.getLogger(__name__)


def preprocess(
    raw_dir: Path, out_dir: Path, dataset: str, *, train: tuple[str, str], test: tuple[str, str]
) -> dict:
    """Turn raw_dir's four IDX files into out_dir's arrays, summary and sample grid.

    `train` and `test` name each split's (images, labels) files in raw_dir; `dataset` is the
    name the summary records. Returns the summary. Raises DataError for a missing or malformed
    file, or train and test images of different sizes.
    """
    from pipeline.core.grids import sample_grid

    train_images, train_labels, train_sha = read_split(raw_dir / train[0], raw_dir / train[1])
    test_images, test_labels, test_sha = read_split(raw_dir / test[0], raw_dir / test[1])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"train images are {train_images.shape[1:]} but test images {test_images.shape[1:]}"
        )
    train, test = to_split(train_images, train_labels), to_split(test_images, test_labels)
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
    # The four files replace the previous out_dir as one set (files.replaced_together).
    with replaced_together(out_dir.parent, [Path(out_dir.name)]) as staged:
        save_split(train, staged / out_dir.name / "train.npz")
        save_split(test, staged / out_dir.name / "test.npz")
        write_json(staged / out_dir.name / "summary.json", summary)
        sample_grid(train_images, train_labels, staged / out_dir.name / "samples.png")
    log.info(
        "prepared %s: %d train, %d test images of %s",
        dataset,
        len(train.x),
        len(test.x),
        train.image_shape,
    )
    return summary


def _run(cfg: Config) -> None:
    dataset = cfg.dataset
    preprocess(
        paths.RAW_DIR / dataset.name,
        paths.PREPARED_DIR,
        dataset.name,
        train=(dataset.train.images, dataset.train.labels),
        test=(dataset.test.images, dataset.test.labels),
    )


@hydra.main(version_base="1.3", config_path=str(paths.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, _run)


def cli() -> None:
    """The installed command (digit-preprocess): main inside the one-line envelope (run_main)."""
    run_main(main)


if __name__ == "__main__":
    cli()
