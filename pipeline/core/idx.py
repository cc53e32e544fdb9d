"""Read and write IDX files (LeCun's MNIST format), gzipped, with every header field validated."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.core.data import NUM_CLASSES
from pipeline.infra.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N)
_UBYTE = 0x08


@contextlib.contextmanager
def _gzip_errors(path: Path, fix: str = "") -> Iterator[None]:
    """Turn gzip's low-level errors into a DataError that names the file and the fix."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as err:
        # gzip raises BadGzipFile (an OSError) for a non-gzip file, EOFError when truncated.
        kind = "truncated" if isinstance(err, EOFError) else "not a valid gzip file"
        raise DataError(f"{path}: {kind} ({err}){fix}") from None


def read_gzip_bytes(path: Path) -> bytes:
    """Decompress a whole .gz file; a truncated or non-gzip file is a DataError naming it."""
    with _gzip_errors(path, ". Delete it and run `fetch` again."), gzip.open(path, "rb") as f:
        return f.read()


def raw_sha256(path: Path, max_bytes: int | None = None, fix: str = "") -> str:
    """SHA-256 of the decompressed content: identical for every faithful copy, however gzipped.

    With `max_bytes`, decompression stops once the content passes that many bytes (a gzip bomb
    costs no more than that) with a DataError naming the limit, `fix` appended."""
    digest = hashlib.sha256()
    size = 0
    with _gzip_errors(path), gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise DataError(f"{path}: decompresses to more than {max_bytes:,} bytes{fix}")
            digest.update(chunk)
    return digest.hexdigest()


def parse_idx(data: bytes, expected_magic: int, source: Path | str) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking magic number, dimensions and length."""
    if len(data) < 8:
        raise DataError(f"{source}: {len(data)} bytes is too short for an IDX header")
    # The magic number is 0x0000, the element type (0x08 = ubyte), then the number of dimensions.
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise DataError(
            f"{source}: wrong IDX magic number {magic} (expected {expected_magic}); "
            "the file is not the images/labels file its name says"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{source}: IDX header cut short ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected_len = header_len + int(np.prod(dims))
    if len(data) != expected_len:
        raise DataError(
            f"{source}: IDX header declares dimensions {dims} ({expected_len} bytes) "
            f"but the file holds {len(data)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (mtime 0, so the bytes are reproducible)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _UBYTE, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    # filename="": no FNAME field, else the (random) temporary name would be in the header.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(header + array.tobytes())


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
