"""Errors a user can act on: each stage prints the message (no traceback) and exits non-zero."""


class PipelineError(Exception):
    """Base class: the message names the problem and the fix."""


class DataError(PipelineError):
    """Raw or prepared data is missing, unreachable, corrupt or malformed."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""


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
