"""Errors a user can act on: each stage prints the message (no traceback) and exits non-zero."""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass


class PipelineError(Exception):
    """Base class: the message names the problem and the fix."""


class DataError(PipelineError):
    """Raw or prepared data is missing, unreachable, corrupt or malformed."""


class ConfigError(PipelineError):
    """A config value that is out of range, mistyped or unknown; the message names the key."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""


class InputError(PipelineError):
    """An input image cannot be used; the message names the file and the problem."""


class ModelError(PipelineError):
    """The model is missing or cannot be loaded or used."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (MLflow's and SQLAlchemy's run to pages, with the
    SQL and help links), or the error's type when the message is empty. When a full disk, a
    read-only file system or a missing permission is behind it (filesystem_cause), that cause
    instead: never a wrapper's words such as SQLAlchemy's "(raised as a result of Query-invoked
    autoflush ...)"."""
    if (cause := filesystem_cause(err)) is not None:
        return cause.describe()
    message = str(getattr(err, "message", None) or err).strip()
    return message.splitlines()[0] if message else type(err).__name__


def interrupt_in(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C/SIGTERM behind `err`, if any. A library can replace the interrupt with its own
    error while unwinding: TensorFlow's device scope raises "Exiting device scope without proper
    scope nesting" when a KeyboardInterrupt lands inside `fit()`, keeping the interrupt only as
    the exception's context."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# The file-system failures a user can act on, by errno: what happened, and the fix.
_FREE_SPACE = "free some space"
_WRITABLE = "work in a writable copy of the project (or remount its file system read-write)"
_PERMITTED = "give this user write permission there (or run as the folder's owner)"
FILESYSTEM_ERRORS = {
    errno.ENOSPC: ("no space left on the device", _FREE_SPACE),
    errno.EDQUOT: ("no space left on the device: disk quota exceeded", _FREE_SPACE),
    errno.EROFS: ("read-only file system", _WRITABLE),
    errno.EACCES: ("permission denied", _PERMITTED),
    errno.EPERM: ("operation not permitted", _PERMITTED),
}
# sqlite reports the same causes in its own words, without an errno. It opens a file it may
# not write read-only and says so only when writing, the same for a read-only file system as
# for a missing permission.
_SQLITE_ERRORS = {
    "database or disk is full": (errno.ENOSPC,),
    "attempt to write a readonly database": (errno.EROFS, errno.EACCES),
}


@dataclass(frozen=True)
class FilesystemCause:
    """A full disk, read-only file system or missing permission behind an error: `codes` (one
    errno, or the two sqlite cannot tell apart), the file if known, sqlite's own words."""

    codes: tuple[int, ...]
    filename: object = None
    words: str = ""

    def describe(self) -> str:
        """E.g. "read-only file system (EROFS): 'outputs/2026-12-04/19-27-33'"."""
        what = " or ".join(
            f"{FILESYSTEM_ERRORS[code][0]} ({errno.errorcode[code]})" for code in self.codes
        )
        if self.words:
            what += f" (sqlite: {self.words})"
        return f"{what}: {self.filename!r}" if self.filename else what

    @property
    def fix(self) -> str:
        return "; or ".join(FILESYSTEM_ERRORS[code][1] for code in self.codes)


def filesystem_cause(err: BaseException) -> FilesystemCause | None:
    """The full disk, read-only file system or missing permission (FILESYSTEM_ERRORS) anywhere
    in the chain of `err`: its causes and contexts, and the database error under SQLAlchemy's
    wrapper (`.orig`), as MLflow raises a sqlite store's failures. None when there is none."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FILESYSTEM_ERRORS:
            return FilesystemCause((current.errno,), current.filename)
        if isinstance(current, sqlite3.Error):
            words = str(current).strip()
            if words in _SQLITE_ERRORS:
                return FilesystemCause(_SQLITE_ERRORS[words], words=words)
        orig = getattr(current, "orig", None)
        pending += [current.__cause__, current.__context__]
        pending += [orig] if isinstance(orig, BaseException) else []
    return None
