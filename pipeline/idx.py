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

from pipeline.errors import DataError

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


def raw_sha256(path: Path) -> str:
    """SHA-256 of the decompressed content: identical for every faithful copy, however gzipped."""
    digest = hashlib.sha256()
    with _gzip_errors(path), gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
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
