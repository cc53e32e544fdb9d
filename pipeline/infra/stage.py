"""What every stage entry point shares: validate first, clean errors, SIGTERM as an interrupt."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

from hydra.errors import CompactHydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline.infra.config import Config, validate
from pipeline.infra.credentials import redact, redact_log_records
from pipeline.infra.errors import (
    ConfigError,
    DataError,
    PipelineError,
    filesystem_cause,
    interrupt_in,
)
from pipeline.infra.files import read_json
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


def _one_line_logging() -> None:
    """Mask passwords in log lines (credentials.redact), and keep MLflow from logging the
    traceback of each sqlite failure it then raises anyway (mlflow.store.db.utils logs it at
    ERROR before raising): the caller reports that error in one line."""
    redact_log_records()
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def run_command(action: Callable[[], object]) -> int:
    """Exit code of a plain (non-Hydra) command: the action's own if it returns an int, else 0;
    1 after its one-line error (also for a full disk, a read-only file system or a missing
    permission); 130 on Ctrl-C. Passwords in URIs are masked in its log lines and its error
    (credentials.redact)."""
    _one_line_logging()
    try:
        code = action()
    except PipelineError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 1
    except OSError as err:
        if (cause := filesystem_cause(err)) is None:
            raise
        print(f"error: {redact(cause.describe())}. Fix: {cause.fix}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


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
    _one_line_logging()
    try:
        _refuse_chdir()
        settings = validate(cfg)
        remove_stale_temp_files(output_root())  # left by writers killed with kill -9
        with sigterm_as_interrupt():
            return stage(settings)
    except PipelineError as err:
        _fail(f"error: {err}")
    except KeyboardInterrupt as err:
        _exit_interrupted(err)
    except Exception as err:
        if (interrupt := interrupt_in(err)) is not None:
            _exit_interrupted(interrupt)
        # A full disk, a read-only file system or a missing permission: the stage's own
        # writes, or its MLflow store's (under MLflow's and SQLAlchemy's wrappers).
        if (cause := filesystem_cause(err)) is None:
            raise
        _fail(
            f"error: {cause.describe()}. Nothing partial was kept: {cause.fix} and run the stage "
            "again."
        )


def _exit_interrupted(interrupt: KeyboardInterrupt) -> NoReturn:
    print(
        f"interrupted ({str(interrupt) or 'Ctrl-C'}); no partial outputs were kept",
        file=sys.stderr,
    )
    sys.exit(143 if isinstance(interrupt, Terminated) else 130)


def run_main(hydra_main: Callable[[], object]) -> None:
    """Run a stage's @hydra.main function as the program, with Hydra's own work outside the
    stage body in the one-line envelope too: creating the run's folder (outputs/<date>/<time>,
    a sweep's multirun/...), writing its .hydra/*.yaml and opening its log. On a full disk, a
    read-only file system or without permission, Hydra prints a chained traceback there; this
    prints one line naming the cause and exits 1. HYDRA_FULL_ERROR=1, Hydra's documented way to
    let its errors propagate, is set to reach them; Hydra's own compact errors (an unknown
    config group option, a misspelt override) are printed as Hydra prints them. A user who set
    HYDRA_FULL_ERROR gets Hydra's full behaviour unchanged. An interrupt that reaches a sweep's
    own process (Ctrl-C, or SIGTERM by callbacks.CloseInterruptedRuns) exits 130 / 143 with
    one line, as a stage does."""
    if os.environ.get("HYDRA_FULL_ERROR"):
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except CompactHydraException as err:  # as hydra._internal.utils.run_and_report prints them
        print(redact(str(err)), file=sys.stderr)
        if isinstance(err.__cause__, OmegaConfBaseException):
            print(redact(str(err.__cause__)), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:  # a sweep's own process (callbacks.CloseInterruptedRuns)
        _exit_interrupted(err)
    except OSError as err:
        if (cause := filesystem_cause(err)) is None:
            raise
        sys.exit(
            redact(
                f"error: Hydra cannot write the run's folder: {cause.describe()}. Fix: "
                f"{cause.fix}; or point hydra.run.dir (hydra.sweep.dir with -m) at a writable "
                "folder."
            )
        )
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
