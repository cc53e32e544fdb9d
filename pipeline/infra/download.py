"""Fetch files from a list of mirrors: verified, retried, atomic, never left half-written.

A mirror is an http(s):// URL, a file:// URL or a local directory. Each file is accepted only if
the SHA-256 of its decompressed bytes matches the expected value, so a re-gzipped but faithful
copy (Debian's Fashion-MNIST) is accepted and a truncated, altered or non-gzip file is rejected.
A cap on the bytes per file (the dataset's max_file_mb) bounds what a mirror can make us write
and decompress: an endless response is cut off there, a gzip bomb stops there.
"""

from __future__ import annotations

import errno
import logging
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.idx import raw_sha256
from pipeline.infra.credentials import login_request
from pipeline.infra.errors import DataError
from pipeline.infra.files import atomic_path

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "No network or no route to the mirrors? Run offline with `dataset=digits` (bundled with "
    "scikit-learn), or point at a local copy of the files: "
    "`dataset.mirrors=[/path/to/dir/]` (file:// URLs work too)."
)
_CHUNK = 1 << 16


def source_url(mirror: str, name: str) -> str:
    """Join a mirror (URL or directory) and a file name into one location string."""
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(mirror).expanduser() / name)


def _over_cap(max_bytes: int) -> str:
    return (
        f"the cap is {max_bytes:,} bytes per file (dataset.max_file_mb={max_bytes / 1e6:g}); "
        "raise it if the file really is that large"
    )


def _copy_local(location: str, dest: Path, max_bytes: int | None) -> None:
    if location.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))
    else:
        path = Path(location)
    if max_bytes is not None:
        if path.exists() and not path.is_file():  # a device or pipe has no size to check
            raise DataError("not a regular file")
        if path.is_file() and (size := path.stat().st_size) > max_bytes:
            raise DataError(f"{size:,} bytes: {_over_cap(max_bytes)}")
    shutil.copyfile(path, dest)


def _download_http(url: str, dest: Path, timeout: float, max_bytes: int | None) -> None:
    # A mirror's user:password@ goes as HTTP Basic authentication (urllib can't parse it).
    request = login_request(url, headers={"User-Agent": "digit-pipeline"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise DataError(f"{total:,} bytes announced (Content-Length): {_over_cap(max_bytes)}")
        from tqdm import tqdm  # imported here: only downloads draw a progress bar

        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=Path(dest).name.split(".tmp")[0].lstrip("."),
            disable=not sys.stderr.isatty(),
            leave=False,
        ) as bar:
            while chunk := response.read(_CHUNK):
                if max_bytes is not None and out.tell() + len(chunk) > max_bytes:
                    raise DataError(
                        f"more than {max_bytes:,} bytes sent, cut off there: {_over_cap(max_bytes)}"
                    )
                out.write(chunk)
                bar.update(len(chunk))
        if total is not None and out.tell() != total:
            raise OSError(f"connection closed after {out.tell()} of {total} bytes")


# No route, no host, nobody listening: asking the same mirror again won't change that, and an
# offline machine should hear so in seconds, not after a round of back-offs.
_UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED)


def _is_transient(err: BaseException) -> bool:
    """Worth retrying on the same mirror: timeouts, resets, server errors; not 404, DNS
    failures or an unreachable host."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else err
        if isinstance(err, socket.gaierror):
            return False
    if isinstance(err, OSError) and err.errno in _UNREACHABLE:
        return False
    return isinstance(err, (TimeoutError, ConnectionError, urllib.error.URLError))


def _fetch_once(location: str, dest: Path, timeout: float, max_bytes: int | None) -> None:
    if location.startswith(("http://", "https://")):
        _download_http(location, dest, timeout, max_bytes)
    else:
        _copy_local(location, dest, max_bytes)


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    return str(err) or type(err).__name__


def fetch_file(
    name: str,
    sha256: str,
    mirrors: Sequence[str],
    dest_dir: Path,
    *,
    timeout: float = 30.0,
    retries: int = 2,
    max_bytes: int | None = None,
) -> Path:
    """Make `dest_dir/name` a verified copy, trying each mirror in turn.

    Skips the download when a valid copy is already there. With `max_bytes`, no more than that
    is downloaded or decompressed per file: a larger file is cut off there and counts as a bad
    file (the next mirror is tried). Raises DataError listing every location tried, and why it
    failed, when no mirror gives a valid file.
    """
    final = Path(dest_dir) / name
    cap_fix = f": {_over_cap(max_bytes)}" if max_bytes is not None else ""
    if final.exists():
        try:
            if raw_sha256(final, max_bytes, cap_fix) == sha256:
                log.info("%s: already present and valid", final)
                return final
        except DataError:
            pass
        log.warning("%s: present but invalid; removing it and fetching it again", final)
        final.unlink()
    if not mirrors:
        raise DataError(f"{name}: the mirror list is empty. {OFFLINE_HINT}")

    tried: list[str] = []
    for mirror in mirrors:
        location = source_url(mirror, name)
        for attempt in range(retries + 1):
            try:
                with atomic_path(final) as tmp:
                    _fetch_once(location, tmp, timeout, max_bytes)
                    try:
                        actual = raw_sha256(tmp, max_bytes, cap_fix)
                    except DataError as err:
                        raise DataError(str(err).removeprefix(f"{tmp}: ")) from None
                    if actual != sha256:
                        raise DataError(f"checksum mismatch: sha256 {actual}, expected {sha256}")
                log.info("%s: fetched from %s", final, location)
                return final
            except DataError as err:  # a bad file: retrying the same mirror would not help
                tried.append(f"{location}: {err}")
                break
            except (OSError, urllib.error.URLError) as err:
                if attempt < retries and _is_transient(err):
                    time.sleep(min(2**attempt, 8))
                    continue
                tried.append(f"{location}: {_describe(err)}")
                break
    listing = "\n  - ".join(tried)
    raise DataError(f"could not fetch a valid {name}; tried:\n  - {listing}\n{OFFLINE_HINT}")
