"""What every stage entry point shares: validate first, clean errors, SIGTERM as an interrupt."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from pipeline.infra.config import Config, validate
from pipeline.infra.credentials import redact, redact_log_records
from pipeline.infra.errors import ConfigError, DataError, PipelineError, interrupt_in
from pipeline.infra.files import forget_outcome, outcome, read_json
from pipeline.infra.reconcile import remove_stale_temp_files

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup (temp files, MLflow KILLED) runs."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_sweep_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def output_root() -> Path:
    """Where a stage writes: the project root for a single run (the paths DVC tracks); a sweep's
    job writes into its own Hydra job folder, so jobs never overwrite each other's files."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if _in_sweep_job() else Path(".")


def check_prepared_dataset(prepared_dir: Path, dataset: str) -> None:
    """Refuse prepared data of another dataset than the config's (`dataset`), as recorded in
    prepared_dir/summary.json by preprocess: without it, `python -m pipeline.train
    dataset=digits` would train on MNIST prepared earlier and log it as digits. Call it before
    any output is written or any MLflow run started. A missing summary is left to the stage's
    own read of its inputs, which names the missing file. Raises DataError naming both datasets
    and the fix."""
    summary = prepared_dir / "summary.json"
    if not summary.is_file():
        return
    prepared = read_json(summary).get("dataset")
    if prepared != dataset:
        raise DataError(
            f"{prepared_dir} holds the {prepared!r} dataset but the config says "
            f"dataset={dataset}. Fix: prepare it first (`python -m pipeline.fetch "
            f"dataset={dataset}` then `python -m pipeline.preprocess dataset={dataset}`, or "
            f"`dvc exp run -S dataset={dataset}`), or run with dataset={prepared}"
        )


class SweepJobFailed(CompactHydraException):
    """A known failure inside a sweep (-m) job. Raised there instead of SystemExit so Hydra marks
    only that job failed, lets the other jobs finish, then prints the message (no traceback) and
    exits 1. A SystemExit escapes Hydra's per-job handling: under the joblib launcher, loky then
    SIGKILLs the jobs still running, and their MLflow runs stay RUNNING forever."""


def _fail(message: str) -> NoReturn:
    message = redact(message)  # a store or mirror URI in it may carry a password
    if _in_sweep_job():
        raise SweepJobFailed(message) from None
    raise SystemExit(message) from None


def run_command(action: Callable[[], object]) -> int:
    """Exit code of a plain (non-Hydra) command: 0; 1 after its one-line error; 130 on Ctrl-C.
    Passwords in URIs are masked in its log lines and its error (credentials.redact)."""
    redact_log_records()
    try:
        action()
    except PipelineError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _refuse_chdir() -> None:
    """Refuse `hydra.job.chdir=true` (the default of Hydra before 1.2): Hydra would already have
    moved into the run's folder, where none of the project's relative paths (data/, models/,
    mlflow.db, ...) exist, and a store would be created there."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().job.chdir:
        raise ConfigError(
            "hydra.job.chdir=true is not supported: the stages read and write paths relative to "
            "the project root (data/, models/, mlflow.db). Fix: drop hydra.job.chdir=true; a "
            "sweep's jobs already write into their own folders"
        )


def run_stage(cfg: DictConfig, stage: Callable[[Config], T]) -> T:
    """Validate `cfg` before any work, run `stage` and return what it returns (a sweeper's
    objective, e.g. crossval's mean accuracy); turn known failures into one clear line. Passwords
    in URIs are masked in its log lines and its error (credentials.redact)."""
    redact_log_records()
    try:
        _refuse_chdir()
        settings = validate(cfg)
        remove_stale_temp_files(output_root())  # left by writers killed with kill -9
        forget_outcome()
        with sigterm_as_interrupt():
            return stage(settings)
    except PipelineError as err:
        # Which set of outputs is in place, if the stage began replacing them (files.outcome).
        _fail(f"error: {err}" + (f"; {kept}" if (kept := outcome()) else ""))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = outcome() or "nothing partial was kept"
        _fail(
            f"error: no space left on the device ({err}); {kept}: free some space and run the "
            "stage again."
        )
    except KeyboardInterrupt as err:
        _exit_interrupted(err)
    except Exception as err:
        if (interrupt := interrupt_in(err)) is None:
            raise
        _exit_interrupted(interrupt)


def _exit_interrupted(interrupt: KeyboardInterrupt) -> NoReturn:
    kept = outcome() or "no partial outputs were kept"
    print(f"interrupted ({str(interrupt) or 'Ctrl-C'}); {kept}", file=sys.stderr)
    sys.exit(143 if isinstance(interrupt, Terminated) else 130)
