"""Stage 1: get the raw IDX files of the configured dataset into data/raw/<dataset>/, verified."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.core.idx import write_idx
from pipeline.infra import paths
from pipeline.infra.config import Config, DatasetConfig, IdxPair
from pipeline.infra.download import fetch_file
from pipeline.infra.errors import DataError
from pipeline.infra.files import atomic_path, replaced_together
from pipeline.infra.stage import run_main, run_stage

log = logging.getLogger(__name__)


def export_digits(
    dest: Path, *, train: IdxPair, test: IdxPair, test_fraction: float, seed: int
) -> list[Path]:
    """Write scikit-learn's 8x8 digits as four IDX files named by `train` and `test`, split
    with a fixed seed (stratified, `test_fraction` of the 1,797 images held out).

    Pixel values 0..16 are stretched to 0..255 so preprocessing is the same as for MNIST.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    arrays = {
        train.images: x_train,
        train.labels: y_train,
        test.images: x_test,
        test.labels: y_test,
    }
    # The four files depend on the split: replaced as one set, never two splits' files mixed
    # (the IDX files of a download are each checked against a fixed SHA-256 instead).
    with replaced_together(dest.parent, [Path(dest.name)]) as staged:
        for name, array in arrays.items():
            with atomic_path(staged / dest.name / name) as tmp:
                write_idx(tmp, array)
    written = [dest / name for name in arrays]
    log.info("digits: wrote %d train / %d test images to %s", len(y_train), len(y_test), dest)
    return written


def fetch(dataset: DatasetConfig, raw_dir: Path) -> list[Path]:
    """Make raw_dir/<dataset.name>/ hold the dataset's four verified IDX .gz files: the ones
    dataset.files lists (the schema checks they are the ones dataset.train/test name), each at
    most dataset.max_file_mb downloaded and decompressed, or for digits, scikit-learn's exported
    under dataset.train/test's names."""
    dest = raw_dir / dataset.name
    dest.mkdir(parents=True, exist_ok=True)
    if dataset.split_by_fetch:
        return export_digits(
            dest,
            train=dataset.train,
            test=dataset.test,
            test_fraction=dataset.test_fraction,
            seed=dataset.split_seed,
        )
    if not dataset.files:
        raise DataError(
            f"dataset.files is empty: nothing to fetch for dataset {dataset.name!r}. List its "
            f"four IDX files with their SHA-256 in conf/dataset/{dataset.name}.yaml"
        )
    return [
        fetch_file(
            name,
            sha256,
            dataset.mirrors,
            dest,
            timeout=dataset.timeout,
            retries=dataset.retries,
            max_bytes=round(dataset.max_file_mb * 1e6),
        )
        for name, sha256 in dataset.files.items()
    ]


def _run(cfg: Config) -> None:
    fetch(cfg.dataset, paths.RAW_DIR)


@hydra.main(version_base="1.3", config_path=str(paths.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, _run)


def cli() -> None:
    """The installed command (digit-fetch): main inside the one-line envelope (run_main)."""
    run_main(main)


if __name__ == "__main__":
    cli()
