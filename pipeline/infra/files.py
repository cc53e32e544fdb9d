"""Atomic output: a reader (or DVC) never sees a half-written file at a final path."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it over `final` only if the block succeeds.

    The temporary name, `.<stem>.<pid>.<random>.tmp<suffix>`, keeps `final`'s suffix, because
    writers such as Keras and NumPy choose the format from it, and names the writing process, so
    a later stage can remove the file once that process is gone (a `kill -9` skips the cleanup
    here; see temp_writer). On any error or interrupt the temporary file is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.stem}.{os.getpid()}.", suffix=f".tmp{final.suffix}", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; final files get the usual permissions
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


# atomic_path's temporary names: the writer's pid, then mkstemp's random part (letters, digits, _).
_TEMP_NAME = re.compile(r"\..*\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp(\.[^.]*)?")


def temp_writer(name: str) -> int | None:
    """The pid of the process that created atomic_path's temporary file `name` (a file name);
    None for any other name, including the pid-less names of earlier versions."""
    match = _TEMP_NAME.fullmatch(name)
    return int(match["pid"]) if match else None


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with the same keys, the first row's keys as the header."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
