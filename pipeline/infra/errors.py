"""Errors a user can act on: each stage prints the message (no traceback) and exits non-zero."""


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
    SQL and help links), or the error's type when the message is empty."""
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
