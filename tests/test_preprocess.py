"""Preprocess end to end on the offline `digits` dataset (and the tiny IDX files), in process
and through the real stage CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from run_helpers import PROJECT_ROOT

from pipeline.core.data import load_split
from pipeline.core.idx import raw_sha256, read_split, write_idx
from pipeline.infra.config import DatasetConfig
from pipeline.preprocess import preprocess

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIGITS_TOTAL = 1797  # scikit-learn's bundled 8x8 digits
OUTPUTS = ("train.npz", "test.npz", "summary.json", "samples.png")
DIGITS = DatasetConfig(name="digits")  # what the fetch_digits fixture writes


def file_names(dataset: DatasetConfig) -> list[str]:
    """The four IDX file names of `dataset`: train images and labels, test images and labels."""
    return [dataset.train.images, dataset.train.labels, dataset.test.images, dataset.test.labels]


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def assert_prepared_arrays(x: np.ndarray, y: np.ndarray, features: int) -> None:
    n = len(x)
    assert x.shape == (n, features) and x.dtype == np.float32
    assert y.shape == (n, 10) and y.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(y.sum(axis=1), np.ones(n, dtype=np.float32))


# --------------------------------------------------------------------------- digits, in process


def test_digits_outputs_are_all_written(digits_prepared):
    assert sorted(p.name for p in digits_prepared.iterdir()) == sorted(OUTPUTS)


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_arrays(digits_prepared, split):
    data = load_npz(digits_prepared / f"{split}.npz")
    assert_prepared_arrays(data["x"], data["y"], 64)
    assert data["image_shape"].tolist() == [8, 8]
    assert data["x"].max() == 1.0  # digits' 16 is stretched to 255, scaled to 1
    assert len(np.unique(data["y"].argmax(axis=1))) == 10  # stratified: every class present


def test_digits_summary(digits_prepared):
    summary = json.loads((digits_prepared / "summary.json").read_text())
    assert summary["dataset"] == "digits"
    assert summary["image_shape"] == [8, 8]
    assert summary["num_classes"] == 10
    assert summary["x_dtype"] == "float32"
    assert summary["x_range"] == [0.0, 1.0]
    assert len(summary["sha256"]) == 64
    sizes = {}
    for split in ("train", "test"):
        part = summary[split]
        n = part["x_shape"][0]
        assert part["x_shape"] == [n, 64]
        assert part["y_shape"] == [n, 10]
        assert len(part["class_counts"]) == 10
        assert sum(part["class_counts"]) == n
        labels = load_npz(digits_prepared / f"{split}.npz")["y"].argmax(axis=1)
        assert part["class_counts"] == np.bincount(labels, minlength=10).tolist()
        sizes[split] = n
    assert sizes["train"] + sizes["test"] == DIGITS_TOTAL
    assert sizes["test"] == int(np.ceil(0.25 * DIGITS_TOTAL))  # dataset.test_fraction


def test_digits_samples_png(digits_prepared):
    data = (digits_prepared / "samples.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000  # a real 3x3 grid, not an empty image
    assert b"IEND" in data[-12:]


def test_load_split_reads_what_preprocess_wrote(digits_prepared):
    split = load_split(digits_prepared / "train.npz")
    raw = load_npz(digits_prepared / "train.npz")
    np.testing.assert_array_equal(split.x, raw["x"])
    assert split.image_shape == (8, 8)
    assert split.images.shape == (len(raw["x"]), 8, 8)
    np.testing.assert_array_equal(split.labels, raw["y"].argmax(axis=1))


def test_digits_split_is_reproducible_and_seeded(tmp_path, fetch_digits):
    first = fetch_digits(tmp_path / "a", split_seed=0)
    again = fetch_digits(tmp_path / "b", split_seed=0)
    other = fetch_digits(tmp_path / "c", split_seed=1)
    for name in file_names(DIGITS):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
        assert raw_sha256(first / name) != raw_sha256(other / name), name

    def split_of(raw: Path) -> tuple[np.ndarray, np.ndarray]:
        train = read_split(raw / DIGITS.train.images, raw / DIGITS.train.labels)
        test = read_split(raw / DIGITS.test.images, raw / DIGITS.test.labels)
        return train[1], test[1]

    (train0, test0), (train1, test1) = split_of(first), split_of(other)
    assert (len(train0), len(test0)) == (len(train1), len(test1))
    assert not np.array_equal(train0, train1)
    # the same images, only split differently: identical class counts overall
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([train0, test0])), np.bincount(np.concatenate([train1, test1]))
    )


def test_preprocess_again_on_the_same_raw_data_writes_the_same_bytes(
    tmp_path, digits_prepared, monkeypatch
):
    """Byte-identical outputs, so a re-run preprocess leaves DVC's hash of data/prepared as it
    was and nothing downstream re-runs: no timestamp in the .npz entries, the PNG or the JSON
    (the clock is set a year on, so a stamped time would show)."""
    later = time.time() + 365 * 24 * 3600
    monkeypatch.setattr(time, "time", lambda: later)
    raw = digits_prepared.parent / "raw" / "digits"
    again = tmp_path / "again"
    preprocess(
        raw,
        again,
        "digits",
        train=(DIGITS.train.images, DIGITS.train.labels),
        test=(DIGITS.test.images, DIGITS.test.labels),
    )
    for name in OUTPUTS:
        assert (again / name).read_bytes() == (digits_prepared / name).read_bytes(), name


def test_preprocess_tiny_idx_exact_values(tmp_path, idx_files, mirror_dir, idx_arrays, idx_names):
    out = tmp_path / "prepared"
    summary = preprocess(mirror_dir, out, "tiny", **idx_names)
    train = load_npz(out / "train.npz")
    assert_prepared_arrays(train["x"], train["y"], 28 * 28)
    images, labels = (idx_arrays[name] for name in idx_names["train"])
    np.testing.assert_allclose(train["x"], images.reshape(12, -1) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(train["y"].argmax(axis=1), labels)
    assert summary["train"]["class_counts"] == [2, 2] + [1] * 8
    assert summary["test"]["x_shape"] == [6, 784]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "samples.png").read_bytes()[:8] == PNG_SIGNATURE
    assert list(out.glob(".*.tmp*")) == []


# --------------------------------------------------------------------------- the real CLIs


def test_package_is_importable_from_any_directory(tmp_path):
    """`python -m pipeline.<stage>` must work outside the checkout (the editable install)."""
    result = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"{result.stderr}\npipeline is not installed in this venv: run `make setup` "
        "(pip install -e '.[dev]')"
    )
    assert Path(result.stdout.strip()) == PROJECT_ROOT / "pipeline" / "__init__.py"


def test_cli_fetch_and_preprocess_digits(cli, tmp_path, digits_prepared):
    fetched = cli(tmp_path, "pipeline.fetch", "dataset=digits")
    assert fetched.returncode == 0, fetched.stderr
    raw = tmp_path / "data" / "raw" / "digits"
    assert sorted(p.name for p in raw.iterdir()) == sorted(file_names(DIGITS))

    prepared = cli(tmp_path, "pipeline.preprocess", "dataset=digits")
    assert prepared.returncode == 0, prepared.stderr
    out = tmp_path / "data" / "prepared"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits"
    # the CLI's default split is the one the in-process fixture made, byte for byte
    fixture_raw = digits_prepared.parent / "raw" / "digits"
    for name in file_names(DIGITS):
        assert (raw / name).read_bytes() == (fixture_raw / name).read_bytes(), name
    expected = json.loads((digits_prepared / "summary.json").read_text())
    assert summary["sha256"] == expected["sha256"]
    assert list(raw.glob(".*.tmp*")) == []


def test_a_dataset_with_other_file_names_is_config_only(cli, tmp_path, idx_arrays, idx_names):
    """A new IDX dataset is one YAML file (here in a --config-dir of its own): its files have
    other names, its mirror is a local folder, and fetch and preprocess take it as it is."""
    mirror = tmp_path / "letters-mirror"
    mirror.mkdir()
    files: dict[str, str] = {}
    roles: dict[str, dict[str, str]] = {}
    for split, pair in idx_names.items():
        for kind, tiny_name in zip(("images", "labels"), pair, strict=True):
            name = f"letters-{split}-{kind}.gz"
            write_idx(mirror / name, idx_arrays[tiny_name])
            files[name] = raw_sha256(mirror / name)
            roles.setdefault(split, {})[kind] = name
    conf = tmp_path / "extra-conf"
    (conf / "dataset").mkdir(parents=True)
    dataset = {"name": "letters", "mirrors": [f"{mirror}/"], "files": files, **roles}
    (conf / "dataset" / "letters.yaml").write_text(yaml.safe_dump(dataset), encoding="utf-8")
    project = tmp_path / "project"
    project.mkdir()

    for stage in ("pipeline.fetch", "pipeline.preprocess"):
        result = cli(project, stage, "--config-dir", str(conf), "dataset=letters")
        assert result.returncode == 0, result.stderr

    raw = project / "data" / "raw" / "letters"
    assert sorted(p.name for p in raw.iterdir()) == sorted(files)
    out = project / "data" / "prepared"
    for split, pair in idx_names.items():
        images, labels = (idx_arrays[name] for name in pair)
        prepared = load_npz(out / f"{split}.npz")
        np.testing.assert_allclose(
            prepared["x"], images.reshape(len(images), -1) / 255.0, rtol=0, atol=1e-7
        )
        np.testing.assert_array_equal(prepared["y"].argmax(axis=1), labels)
    assert json.loads((out / "summary.json").read_text())["dataset"] == "letters"


def test_cli_preprocess_without_raw_data_says_how_to_fix(cli, tmp_path):
    result = cli(tmp_path, "pipeline.preprocess", "dataset=digits")
    assert result.returncode != 0
    assert "is missing" in result.stderr and "pipeline.fetch" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "prepared").exists()
