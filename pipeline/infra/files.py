"""Atomic output: a reader (or DVC) never sees a half-written file at a final path, nor a stage's
outputs half replaced (replaced_together)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.infra.errors import PipelineError

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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# replaced_together's staging folder: .outputs.<pid>.<random>.tmp beside the outputs (so a
# rename moves each output in); its "new" tree mirrors root, "old" receives what it replaces.
_STAGING_PREFIX = ".outputs."
_JOURNAL = "replace.json"  # the outputs to move in; its presence means "roll forward"
_HALF = "the outputs are half replaced"
_outcome: list[str] = []  # what happened to the last set of this stage (outcome)


def staging_folders(root: Path) -> list[Path]:
    """replaced_together's staging folders directly under `root`, of any process."""
    return sorted(p for p in Path(root).glob(f"{_STAGING_PREFIX}*.tmp") if p.is_dir())


def outcome() -> str | None:
    """What replaced_together did with the outputs of this process's stage, as a phrase for its
    last message ("the previous outputs (…) are kept as they were, none of the new ones", "none
    of the outputs (…) was written" where there were none, "the new outputs (…) are all in
    place"); None if no set was begun (forget_outcome)."""
    return _outcome[-1] if _outcome else None


def forget_outcome() -> None:
    """Start a new stage (a sweep runs several in one process)."""
    _outcome.clear()


def _names(outputs: Sequence[Path]) -> str:
    return ", ".join(Path(o).as_posix() for o in outputs)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (a few renames) and deliver them after it, so
    an interrupt never lands between two renames. kill -9 cannot be held: finish_replacement
    repairs that. Only the main thread can set handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda number, frame: held.append(number))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)


def _move_in(staging: Path, root: Path, output: Path) -> None:
    """Put staging/new/<output> at root/<output>, the previous one aside into staging/old/;
    run again after an interruption, it completes what is left (finish_replacement)."""
    new, old, final = staging / "new" / output, staging / "old" / output, root / output
    if not (new.exists() or new.is_symlink()):
        return  # moved in already
    if (final.exists() or final.is_symlink()) and not (old.exists() or old.is_symlink()):
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, old)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new, final)


def _move_back(staging: Path, root: Path, output: Path) -> None:
    """Undo _move_in of `output`, whatever part of it was done."""
    new, old, final = staging / "new" / output, staging / "old" / output, root / output
    if not (new.exists() or new.is_symlink()) and (final.exists() or final.is_symlink()):
        os.replace(final, new)
    if old.exists() or old.is_symlink():
        os.replace(old, final)


def finish_replacement(staging: Path) -> bool:
    """Complete or undo the replacement that a process killed in replaced_together began, by
    its staging folder: with the journal written, every output is moved in (all new), else
    nothing was touched and the new outputs are dropped (all old). Then the folder is removed.
    True if it rolled forward. Call it only once the writer is gone (reconcile)."""
    journal = staging / _JOURNAL
    forward = journal.is_file()
    if forward:
        for output in read_json(journal):
            _move_in(staging, staging.parent, Path(output))
    shutil.rmtree(staging)
    return forward


@contextlib.contextmanager
def replaced_together(root: Path, outputs: Sequence[Path]) -> Iterator[Path]:
    """Replace a stage's `outputs` (files or folders, relative to `root`) as one set: after any
    error, interrupt or kill, either every output is the new one or every one is the previous.

    Yields a staging root: the stage writes each output under it as it would under `root`
    (e.g. staged / "models/model.keras"). If the block fails, the staging folder is removed and
    root's outputs are untouched. If it succeeds (every output written, else ValueError), the
    outputs are moved in by rename: first a journal listing them is written (atomic_path), then
    each previous output is moved aside and the new one moved in, with SIGINT/SIGTERM held until
    the last rename. A rename that fails undoes the ones before it (PipelineError, all old). A
    kill -9 before the journal leaves all old, after it the next stage start completes the
    renames (finish_replacement): all new. The staging folder, `.outputs.<pid>.<random>.tmp`
    under `root`, is named like atomic_path's files (temp_writer finds its writer), so DVC and
    git ignore it. outcome() then says which set is in place.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}.", suffix=".tmp", dir=root)
    )
    (staging / "new").mkdir()
    outputs = [Path(o) for o in outputs]
    if any((root / o).exists() for o in outputs):
        kept = (
            f"the previous outputs ({_names(outputs)}) are kept as they were, none of the new ones"
        )
    else:  # a first run, or under `dvc repro`, which removes a stage's outputs before it runs
        kept = f"none of the outputs ({_names(outputs)}) was written"
    _outcome.append(kept)
    try:
        yield staging / "new"
        missing = [o for o in outputs if not (staging / "new" / o).exists()]
        if missing:
            raise ValueError(f"the stage wrote none of {_names(missing)}")
        with atomic_path(staging / _JOURNAL) as tmp:
            tmp.write_text(json.dumps([o.as_posix() for o in outputs]), encoding="utf-8")
        with _signals_held():  # an interrupt held here is raised on leaving, all new
            _move_all_in(staging, root, outputs)
            _outcome[-1] = f"the new outputs ({_names(outputs)}) are all in place"
    finally:
        if not _outcome[-1].startswith(_HALF):
            shutil.rmtree(staging, ignore_errors=True)


def _move_all_in(staging: Path, root: Path, outputs: list[Path]) -> None:
    """replaced_together's renames; if one fails, undo the ones before it (PipelineError)."""
    done: list[Path] = []
    try:
        for output in outputs:
            done.append(output)
            _move_in(staging, root, output)
    except OSError as err:
        failed = done[-1]
        try:
            for output in reversed(done):
                _move_back(staging, root, output)
        except OSError as undo_err:
            # The journal stays: the next stage start moves the rest in (finish_replacement).
            _outcome[-1] = (
                f"{_HALF}, the rest of the new ones are in {staging} "
                f"({undo_err}): the next stage start moves them in"
            )
            raise PipelineError(f"could not move the new {failed.as_posix()} in ({err})") from None
        (staging / _JOURNAL).unlink()
        raise PipelineError(
            f"could not move the new {failed.as_posix()} into place ({err}). Fix: make "
            f"{root / failed.parent} a writable folder on the same file system as {root}, and run "
            "the stage again"
        ) from None
