"""Errors a user can act on: each stage prints the message (no traceback) and exits non-zero."""


class PipelineError(Exception):
    """Base class: the message names the problem and the fix."""


class DataError(PipelineError):
    """Raw or prepared data is missing, unreachable, corrupt or malformed."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""
