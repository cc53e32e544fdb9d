"""What every stage entry point shares: validate first, clean errors, SIGTERM as an interrupt."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from pipeline.infra.config import Config, closest_key, validate
from pipeline.infra.credentials import redact, redact_log_records
from pipeline.infra.errors import (
    ConfigError,
    DataError,
    PipelineError,
    filesystem_cause,
    interrupt_in,
)
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


# Each stage's workspace lock, <stage>.lock (git-ignored), relative to the workspace root.
LOCKS_DIR = Path(".locks")


@contextlib.contextmanager
def one_run_at_a_time() -> Iterator[None]:
    """Hold this stage's lock in this workspace for the whole run, or refuse at once in one
    line: two runs of one stage writing the same outputs would leave one run's model beside the
    other's metrics. Refusing (not waiting) tells the user at once instead of overwriting the
    first run's outputs later, as DVC refuses a second `dvc repro` in one workspace. A sweep's
    jobs write into their own folders and run in parallel; they take no lock. The lock is an
    flock (filelock), which the kernel releases when its holder dies, even of kill -9."""
    from filelock import FileLock, Timeout
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or _in_sweep_job():
        yield
        return
    stage = HydraConfig.get().job.name
    LOCKS_DIR.mkdir(exist_ok=True)
    lock = FileLock(LOCKS_DIR / f"{stage}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PipelineError(
            f"another {stage} run is in progress in this workspace ({Path.cwd()}; it holds "
            f"{LOCKS_DIR / stage}.lock), and a second would mix its outputs with the first's. "
            "Fix: wait for it to finish, or run experiments side by side as a sweep (-m) or "
            "with `dvc exp run --queue`, which write elsewhere"
        ) from None
    try:
        yield
    finally:
        lock.release()


def claim_sweep_dir(base: str) -> str:
    """The folder a sweep writes into, created here: `base`, else `base`_2, `base`_3, ..., the
    first that did not exist (mkdir is atomic, also between processes). conf/config.yaml names a
    sweep's folder by the second it starts in (`${unique_dir:multirun/<date>/<time>}`), and the
    folder is the `sweep` tag of its runs: without this, two sweeps started in the same second
    would write into one folder and compare would merge them. Registered with use_cache, and
    Hydra copies a sweep's resolver cache into each job's config, so one sweep claims once."""
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}_{n}"
        try:
            Path(name).mkdir(parents=True)
        except FileExistsError:
            continue
        return name
    raise AssertionError("unreachable")


if not OmegaConf.has_resolver("unique_dir"):
    OmegaConf.register_new_resolver("unique_dir", claim_sweep_dir, use_cache=True)


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


_job_label = ""


def label_log_records(label: str) -> None:
    """From now on start every log message of this process with `[label] `: the parallel jobs of
    a sweep print to one terminal, and `fold 1/5: accuracy 0.97` alone does not say whose it is.
    A record factory, like credentials.redact_log_records (Hydra replaces the handlers for each
    job); a later call replaces the label, "" ends it (a job's end: Hydra's own lines between
    jobs are no job's)."""
    global _job_label
    _job_label = label.replace("%", "%%")  # the message is %-formatted with its args
    base = logging.getLogRecordFactory()
    if getattr(base, "labels_jobs", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        if _job_label:
            record.msg = f"[{_job_label}] {record.msg}"
        return record

    factory.labels_jobs = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _label_sweep_job_logs() -> None:
    from hydra.core.hydra_config import HydraConfig

    from pipeline.infra.tracking import run_label

    if _in_sweep_job():
        hydra_cfg = HydraConfig.get()
        label_log_records(f"job {hydra_cfg.job.num} {run_label(hydra_cfg)}".strip())


def _fail(message: str) -> NoReturn:
    message = redact(message)  # a store or mirror URI in it may carry a password
    if _in_sweep_job():
        raise SweepJobFailed(message) from None
    if stage := os.environ.get("DVC_STAGE"):  # DVC removes a stage's outputs before running it
        message += f" (DVC removed its previous outputs: `dvc checkout {stage}` restores them)"
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
    forget_outcome()  # an earlier sweep job's, in this process
    try:
        _refuse_chdir()
        settings = validate(cfg)
        _label_sweep_job_logs()
        remove_stale_temp_files(output_root())  # left by writers killed with kill -9
        with one_run_at_a_time(), sigterm_as_interrupt():
            return stage(settings)
    except PipelineError as err:
        # Which set of outputs is in place, if the stage began replacing them (files.outcome).
        _fail(f"error: {err}" + (f"; {kept}" if (kept := outcome()) else ""))
    except KeyboardInterrupt as err:
        _exit_interrupted(err)
    except Exception as err:
        if (interrupt := interrupt_in(err)) is not None:
            _exit_interrupted(interrupt)
        # A full disk, a read-only file system or a missing permission: the stage's own
        # writes, or its MLflow store's (under MLflow's and SQLAlchemy's wrappers).
        if (cause := filesystem_cause(err)) is None:
            raise
        # Which set of outputs is in place, if the stage began replacing them (files.outcome).
        kept = f"; {kept}" if (kept := outcome()) else ". Nothing partial was kept"
        _fail(f"error: {cause.describe()}{kept}: {cause.fix} and run the stage again.")
    finally:
        if _job_label:
            label_log_records("")


def _exit_interrupted(interrupt: KeyboardInterrupt) -> NoReturn:
    kept = outcome() or "no partial outputs were kept"
    print(f"interrupted ({str(interrupt) or 'Ctrl-C'}); {kept}", file=sys.stderr)
    sys.exit(143 if isinstance(interrupt, Terminated) else 130)


def _hydra_error_line(err: CompactHydraException) -> str:
    """Hydra's refusal of an override as one line: an unknown key (`epoch=3`) with the closest
    schema key; an unknown group option (`model=cnnn`) with the options, less the search path."""
    cause = err.__cause__
    unknown = (ConfigAttributeError, ConfigKeyError)
    if isinstance(cause, unknown) and (key := getattr(cause, "full_key", None)):
        return f"error: unknown config key '{key}'{closest_key(key)}. Fix: use a key `--help` lists"
    text = str(err).split("Config search path")[0]
    if isinstance(cause, OmegaConfBaseException):
        text += f" {cause}"
    return "error: " + " ".join(text.split())


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
    except CompactHydraException as err:  # an override Hydra refused before the stage
        print(redact(_hydra_error_line(err)), file=sys.stderr)
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
