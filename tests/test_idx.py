"""IDX reading and writing: every malformed header or pair is a DataError naming the file."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    parse_idx,
    raw_sha256,
    read_gzip_bytes,
    read_split,
    write_idx,
)
from pipeline.infra.config import DatasetConfig
from pipeline.infra.errors import DataError
from pipeline.preprocess import preprocess


def write_raw(path: Path, data: bytes) -> Path:
    """Gzip arbitrary (possibly malformed) IDX bytes to `path`."""
    path.write_bytes(gzip.compress(data, mtime=0))
    return path


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    if magic is not None:
        header = struct.pack(">I", magic) + header[4:]
    return header + array.astype(np.uint8).tobytes()


IMAGES = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
LABELS = np.array([0, 5, 9], dtype=np.uint8)
NAMES = DatasetConfig()  # MNIST's file names, which the tiny files (conftest.py) carry


# --------------------------------------------------------------------------- round trip


def test_write_then_read_round_trip(tmp_path, idx_arrays):
    for name, array in idx_arrays.items():
        path = tmp_path / name
        write_idx(path, array)
        magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
        parsed = parse_idx(read_gzip_bytes(path), magic, path)
        assert parsed.dtype == np.uint8
        np.testing.assert_array_equal(parsed, array)


def test_write_idx_is_reproducible_and_raw_sha256_hashes_the_content(tmp_path):
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    write_idx(a, IMAGES)
    write_idx(b, IMAGES)
    assert a.read_bytes() == b.read_bytes()  # mtime 0: identical bytes every time
    assert raw_sha256(a) == hashlib.sha256(idx_bytes(IMAGES)).hexdigest()
    assert raw_sha256(a) == hashlib.sha256(gzip.decompress(a.read_bytes())).hexdigest()


def test_read_split_returns_images_labels_and_a_content_hash(idx_files, mirror_dir, idx_arrays):
    images, labels, digest = read_split(
        mirror_dir / NAMES.train.images, mirror_dir / NAMES.train.labels
    )
    np.testing.assert_array_equal(images, idx_arrays[NAMES.train.images])
    np.testing.assert_array_equal(labels, idx_arrays[NAMES.train.labels])
    assert len(digest) == 64
    _, _, test_digest = read_split(mirror_dir / NAMES.test.images, mirror_dir / NAMES.test.labels)
    assert test_digest != digest


# --------------------------------------------------------------------------- malformed headers


def test_wrong_magic_number(tmp_path):
    path = write_raw(tmp_path / NAMES.train.images, idx_bytes(LABELS))  # a labels file
    with pytest.raises(DataError, match="magic number") as excinfo:
        parse_idx(read_gzip_bytes(path), IMAGES_MAGIC, path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("magic", [0x0803 | 0x01000000, 0x0903, 0x0802])
def test_wrong_magic_bytes_are_rejected(tmp_path, magic):
    """A non-zero lead, a non-ubyte type code or a wrong dimension count all fail the check."""
    path = write_raw(tmp_path / "images.gz", idx_bytes(IMAGES, magic=magic))
    with pytest.raises(DataError, match="magic number") as excinfo:
        parse_idx(read_gzip_bytes(path), IMAGES_MAGIC, path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("delta", [-1, +1, -28 * 28])
def test_count_in_header_not_matching_size(tmp_path, delta):
    data = idx_bytes(IMAGES)
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    path = write_raw(tmp_path / NAMES.train.images, data)
    with pytest.raises(DataError, match="truncated or corrupt") as excinfo:
        parse_idx(read_gzip_bytes(path), IMAGES_MAGIC, path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (b"\x00\x00\x08", "too short"),
        (struct.pack(">HBBI", 0, 0x08, 3, 12), "cut short"),  # 8 bytes: dims 2 and 3 missing
        (struct.pack(">HBBII", 0, 0x08, 3, 12, 28), "cut short"),  # 12 bytes: dim 3 missing
    ],
    ids=["empty", "3-bytes", "8-bytes", "12-bytes"],
)
def test_header_too_short(tmp_path, data, reason):
    path = write_raw(tmp_path / NAMES.train.images, data)
    with pytest.raises(DataError) as excinfo:
        parse_idx(read_gzip_bytes(path), IMAGES_MAGIC, path)
    message = str(excinfo.value)
    assert str(path) in message
    assert reason in message


def test_read_gzip_bytes_names_a_corrupt_file(tmp_path):
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(IMAGES))[:40])
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(idx_bytes(LABELS))
    for path, reason in ((truncated, "truncated"), (not_gzip, "not a valid gzip file")):
        with pytest.raises(DataError, match=reason) as excinfo:
            read_gzip_bytes(path)
        assert str(path) in str(excinfo.value)
        with pytest.raises(DataError, match=reason):
            raw_sha256(path)


# --------------------------------------------------------------------------- image/label pairs


def test_images_and_labels_length_mismatch(tmp_path):
    images = write_raw(tmp_path / NAMES.train.images, idx_bytes(IMAGES))
    labels = write_raw(tmp_path / NAMES.train.labels, idx_bytes(LABELS[:2]))
    with pytest.raises(DataError, match="3 images but") as excinfo:
        read_split(images, labels)
    assert str(images) in str(excinfo.value)
    assert str(labels) in str(excinfo.value)


@pytest.mark.parametrize("bad_label", [10, 255])
def test_label_out_of_range(tmp_path, bad_label):
    images = write_raw(tmp_path / NAMES.train.images, idx_bytes(IMAGES))
    labels = write_raw(
        tmp_path / NAMES.train.labels, idx_bytes(np.array([0, bad_label, 9], np.uint8))
    )
    with pytest.raises(DataError, match=f"label {bad_label} is outside 0..9") as excinfo:
        read_split(images, labels)
    assert str(labels) in str(excinfo.value)


def test_images_file_with_labels_magic_via_read_split(tmp_path):
    """Swapped files (labels where images should be) fail on the magic number, naming it."""
    images = write_raw(tmp_path / NAMES.train.images, idx_bytes(LABELS))
    labels = write_raw(tmp_path / NAMES.train.labels, idx_bytes(LABELS))
    with pytest.raises(DataError, match="magic number") as excinfo:
        read_split(images, labels)
    assert str(images) in str(excinfo.value)


def test_missing_file_names_it_and_the_fix(tmp_path):
    images = write_raw(tmp_path / NAMES.train.images, idx_bytes(IMAGES))
    labels = tmp_path / NAMES.train.labels
    with pytest.raises(DataError, match=r"pipeline\.fetch") as excinfo:
        read_split(images, labels)
    assert str(labels) in str(excinfo.value)


def test_preprocess_rejects_train_and_test_of_different_image_sizes(
    tmp_path, idx_files, mirror_dir, idx_names
):
    small = np.zeros((6, 8, 8), dtype=np.uint8)
    write_idx(mirror_dir / NAMES.test.images, small)
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"\(28, 28\).*\(8, 8\)"):
        preprocess(mirror_dir, out, "tiny", **idx_names)
    assert not out.exists()  # checked before anything is written
