"""MLflow plumbing: one pinned store, sweep grouping, and runs that never stay RUNNING."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.infra.config import LOCAL_TRACKING_URI, Config, validate
from pipeline.infra.credentials import is_masked, login_request, redact, redacted
from pipeline.infra.errors import PipelineError, TrackingError, first_line, interrupt_in
from pipeline.infra.files import atomic_path
from pipeline.infra.paths import PREPARED_DIR
from pipeline.infra.reconcile import close_dead_runs, end_active_run, process_tags, writer_gone

log = logging.getLogger(__name__)
SQLITE_PREFIX = "sqlite:///"


def project_root() -> Path:
    """The project's root directory: DVC_ROOT when DVC runs the stage, else the working directory.

    `dvc exp run --temp`, `--queue` and `--run-all` run the stages in a temporary copy of the
    repository (.dvc/tmp/exps/...) that DVC deletes afterwards, and point DVC_ROOT at the real
    repository (dvc/repo/experiments/queue/base.py), so a store resolved here outlives the copy.
    """
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def absolute_uri(uri: str) -> str:
    """`uri` with a relative sqlite path made absolute against the project root (project_root),
    so every process, Hydra job and DVC experiment writes to the same file."""
    if uri.startswith(SQLITE_PREFIX) and not Path(uri[len(SQLITE_PREFIX) :]).is_absolute():
        uri = SQLITE_PREFIX + str((project_root() / uri[len(SQLITE_PREFIX) :]).resolve())
    return uri


def store_uri(uri: str | None = None) -> str:
    """The MLflow store, by one rule for every stage and command: `uri` when given (a stage's
    tracking.uri, a command's --tracking-uri), else the MLFLOW_TRACKING_URI environment
    variable, else the project's own sqlite store, mlflow.db in the project root. A relative
    sqlite path is made absolute against the project root (absolute_uri)."""
    uri = absolute_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING_URI)
    if redact(uri) != uri:
        # MLflow prints "View run ... at: <this URI>/#/..." when a run on a server ends.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return uri


def tracking_uri(cfg: Config) -> str:
    """The store a stage logs to (store_uri of its tracking.uri)."""
    return store_uri(cfg.tracking.uri)


# What creates a missing store, for the commands that read a trained model from one.
NO_STORE_FIX = (
    "train a model first (`dvc repro` or `python -m pipeline.train`), or name the store with "
    "--tracking-uri or MLFLOW_TRACKING_URI"
)


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[None]:
    """Make `uri` MLflow's store (tracking and, by default, registry) for the block, then restore
    the previous one exactly. mlflow.register_model and mlflow.pyfunc.load_model take no store
    argument, and mlflow.set_tracking_uri alone would also leave MLFLOW_TRACKING_URI exported to
    every later subprocess."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"digits-{cfg.dataset.name}"


def check_server(
    uri: str, fix: str = "fix tracking.uri, or use the local store with tracking=local"
) -> None:
    """Fail early (before any training) when a tracking server is unreachable. A login in the
    URI is sent as HTTP Basic authentication, as MLflow's client does (login_request)."""
    try:
        with urllib.request.urlopen(login_request(uri.rstrip("/") + "/health"), timeout=5):
            pass
    except OSError as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({err}). Start it, {fix}."
        ) from None


def check_store(
    uri: str,
    fix: str,
    server_fix: str = "or name another store with --tracking-uri or MLFLOW_TRACKING_URI",
) -> None:
    """Fail with a clear message instead of letting MLflow create an empty sqlite store, or
    retry an unreachable server for minutes. `fix`: what creates the missing store;
    `server_fix`: what else to do than start an unreachable server ("Start it, <server_fix>.")."""
    if uri.startswith(SQLITE_PREFIX) and not Path(uri[len(SQLITE_PREFIX) :]).is_file():
        raise TrackingError(f"MLflow store {uri} does not exist. Fix: {fix}")
    if uri.startswith(("http://", "https://")):
        check_server(uri, server_fix)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'depth': 1}} -> {'model.depth': 1}; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat MLflow params (checksums left out: they are tagged)."""
    params = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))  # type: ignore[arg-type]
    return {k: v for k, v in params.items() if not k.startswith("dataset.files.")}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def sweep_tag(hydra_cfg: Any) -> str:
    """The `sweep` tag every job of one multirun carries (its grouping key): the sweep folder."""
    return str(hydra_cfg.sweep.dir)


def hydra_tags() -> dict[str, str]:
    """The command-line overrides, and the sweep a multirun job belongs to (its grouping key)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    tags = {"hydra_overrides": redact(" ".join(hydra_cfg.overrides.task))}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        tags["sweep"] = sweep_tag(hydra_cfg)
        tags["sweep_job"] = str(hydra_cfg.job.num)
    return tags


# What DVC exports to the stages of an experiment (`dvc exp run`, also --temp and --queue), and
# the run tag each becomes, so a DVC experiment and its MLflow runs find each other.
DVC_EXPERIMENT_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}


def dvc_tags() -> dict[str, str]:
    """The DVC experiment's name and baseline commit as tags; {} outside a DVC experiment."""
    return {tag: os.environ[var] for var, tag in DVC_EXPERIMENT_TAGS.items() if os.environ.get(var)}


def sweep_settings(config: DictConfig) -> Config:
    """The validated settings a multirun's jobs share: its full config without Hydra's node."""
    return validate(OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]))


def _open_store(uri: str, experiment: str) -> str:
    """Import MLflow, open the store and the experiment; returns the experiment id. A fresh
    sqlite store is created under a file lock: parallel jobs racing on schema creation fail
    (daizutabi/hydraflow#245)."""
    import mlflow
    from filelock import FileLock

    if uri.startswith(("http://", "https://")):
        check_server(uri)
    lock = (
        FileLock(uri[len(SQLITE_PREFIX) :] + ".lock")
        if uri.startswith(SQLITE_PREFIX)
        else contextlib.nullcontext()
    )
    try:
        with lock:
            if uri.startswith(SQLITE_PREFIX):
                _create_sqlite_store(Path(uri[len(SQLITE_PREFIX) :]))
            client = mlflow.MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                found = _create_experiment(client, experiment, _artifact_location(uri, experiment))
    except PipelineError:
        raise
    except Exception as err:  # mlflow raises many types for a bad store
        if uri.startswith(SQLITE_PREFIX) and (
            incomplete := _incomplete_store(Path(uri[len(SQLITE_PREFIX) :]))
        ):
            raise TrackingError(incomplete) from None
        raise TrackingError(f"cannot open MLflow store {uri}: {first_line(err)}") from None
    if found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {experiment!r} is deleted in {uri}. Restore it "
            f"(`MLFLOW_TRACKING_URI={uri} mlflow experiments restore "
            f"--experiment-id {found.experiment_id}`) "
            "or choose another name with tracking.experiment=..."
        )
    close_dead_runs(client, uri, found.experiment_id)  # runs left RUNNING by a kill -9
    return found.experiment_id


def _create_sqlite_store(db: Path) -> None:
    """Create a missing (or empty) sqlite store aside, migrated to MLflow's schema, then move it
    into place; call it under the store's lock. Its ~1 MB of migrations take seconds: a full
    disk or a kill meanwhile leaves no half-migrated `db`, which every later start would fail on
    ("table ... already exists"), only a temporary file, removed here once its writer is gone.
    TrackingError naming the cause if it cannot be created."""
    if db.is_file() and db.stat().st_size > 0:
        return
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for left in db.parent.glob(f".{db.stem}.*.tmp{db.suffix}*"):  # with sqlite's -journal
        with contextlib.suppress(OSError):
            if writer_gone(left):
                left.unlink()
    try:
        with atomic_path(db) as aside:
            # MlflowClient's own default for the Default experiment's artifacts (./mlruns).
            store = SqlAlchemyStore(
                SQLITE_PREFIX + str(aside), DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
            )
            store.engine.dispose()  # closed before the file is moved
    except Exception as err:  # sqlalchemy and alembic raise many types
        raise TrackingError(
            f"cannot create MLflow store {SQLITE_PREFIX}{db}: {first_line(err)}. Nothing was "
            f"left at {db}: free some space (or make {db.parent} writable) and run again"
        ) from None


def _incomplete_store(db: Path) -> str | None:
    """Why the existing sqlite store `db` that MLflow failed to open is incompletely created
    (no schema revision, or an earlier one of MLflow's own migrations than the latest: a
    creation or upgrade stopped by a full disk or a kill), as the message naming the fix; None
    when that is not the cause (a lock, a damaged or foreign file, a store of a newer MLflow:
    MLflow's own error says it)."""
    import sqlite3

    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    if not db.is_file():
        return None
    try:
        with contextlib.closing(
            sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=0.1)
        ) as c:
            rows = c.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.OperationalError as err:
        if "no such table" not in str(err):
            return None  # e.g. locked
        rows = []
    except sqlite3.Error:
        return None  # not a database
    scripts = ScriptDirectory.from_config(_get_alembic_config(db_url=""))  # MLflow's migrations
    latest = scripts.get_current_head()
    if rows and (
        rows[0][0] == latest or rows[0][0] not in {s.revision for s in scripts.walk_revisions()}
    ):
        return None  # complete, or made by a newer MLflow: MLflow's own error says so
    found = f"revision {rows[0][0]}" if rows else "no revision"
    return (
        f"MLflow store {db} was not completely created (its schema has {found}, MLflow needs "
        f"{latest}): a full disk or a kill while it was created or upgraded leaves it so. Fix: "
        f"delete {db} if it holds no runs you need (the next run creates it anew), else "
        "restore it from a backup"
    )


def _create_experiment(client: Any, experiment: str, location: str | None) -> Any:
    """Create the experiment, or take the one a parallel job created a moment earlier: on a
    tracking server no file lock orders the jobs, so on a fresh server the jobs of a sweep race
    to create it and all but one get RESOURCE_ALREADY_EXISTS."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_experiment(
            client.create_experiment(experiment, artifact_location=location)
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found


def _artifact_location(uri: str, experiment: str) -> str | None:
    """A sqlite store keeps artifacts beside it, in mlartifacts/<experiment>/ (MLflow's default
    would be ./mlruns under whatever directory the first run happened to start in)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None  # a tracking server decides (its --artifacts-destination)
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment)
    return (Path(uri[len(SQLITE_PREFIX) :]).parent / "mlartifacts" / folder).as_uri()


_stores: dict[tuple[str, str], Future] = {}


def open_store_early(cfg: Config) -> None:
    """Start importing MLflow and opening the store in a background thread, so it overlaps
    TensorFlow's import and the data loading; `tracked_run` waits for it. Once per process:
    later sweep jobs and folds reuse the open store."""
    key = (tracking_uri(cfg), experiment_name(cfg))
    if key not in _stores:
        _stores[key] = ThreadPoolExecutor(1, thread_name_prefix="mlflow-store").submit(
            _open_store, *key
        )


def _experiment_id(cfg: Config) -> str:
    open_store_early(cfg)
    future = _stores[(tracking_uri(cfg), experiment_name(cfg))]
    try:
        return future.result()
    except BaseException:
        _stores.clear()  # let the next attempt retry instead of replaying the error
        raise


@contextlib.contextmanager
def _ended_with_status() -> Iterator[None]:
    """End the active run FINISHED, KILLED on Ctrl-C/SIGTERM, FAILED on any other error (a
    status the store refuses is retried, then remembered: reconcile.end_active_run)."""
    try:
        yield
    except BaseException as err:
        end_active_run("KILLED" if interrupt_in(err) else "FAILED")
        raise
    end_active_run("FINISHED")


@contextlib.contextmanager
def logging_errors(store: str, saved: str) -> Iterator[None]:
    """Turn a failure of the MLflow store `store` while logging results into a TrackingError
    that says the results are safe on disk (`saved`) and how to log them again."""
    try:
        yield
    except Exception as err:
        if isinstance(err, PipelineError) or interrupt_in(err):
            raise
        raise TrackingError(
            f"the results are saved ({saved}) but logging them to MLflow at "
            f"{store} failed: {first_line(err)}. Re-run the stage once the "
            "store is reachable (`dvc repro` re-runs it, as it did not finish) to log them again."
        ) from None


@contextlib.contextmanager
def store_errors(cfg: Config, saved: str) -> Iterator[None]:
    """logging_errors for the store a stage logs to (tracking_uri)."""
    with logging_errors(tracking_uri(cfg), saved):
        yield


# MLflow keeps at most 36 characters of a dataset digest (MAX_DATASET_DIGEST_SIZE); the full
# SHA-256 is the run's dataset_sha256 tag.
DIGEST_CHARS = 16


def dataset_input(name: str, sha256: str, prepared_dir: Path) -> Any:
    """The prepared data as an MLflow dataset (metadata only: name, digest, the folder as its
    source), which fills the Dataset column of the MLflow UI."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    # "local" names MLflow's local-path source directly; resolving the bare path would warn
    # that two registered source types match it.
    source = json.dumps({"uri": str(prepared_dir.resolve())})
    return MetaDataset(
        get_dataset_source_from_json(source, source_type="local"),
        name=name,
        digest=sha256[:DIGEST_CHARS],
    )


@contextlib.contextmanager
def tracked_run(
    cfg: Config, stage: str, dataset_sha256: str, prepared_dir: Path = PREPARED_DIR
) -> Iterator[Any]:
    """An MLflow run for one stage, with the config as params, provenance tags (config,
    git commit, Hydra sweep, DVC experiment) and the prepared data in `prepared_dir` (of
    SHA-256 `dataset_sha256`) as its dataset input."""
    import mlflow

    experiment_id = _experiment_id(cfg)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    tags = {"stage": stage, "dataset": cfg.dataset.name, "dataset_sha256": dataset_sha256}
    tags.update(hydra_tags())
    tags.update(dvc_tags())
    tags.update(process_tags())
    if commit := _git_commit():
        tags["git_commit"] = commit
    run_name = f"{stage} {tags.get('hydra_overrides', '')}".strip()  # e.g. "train epochs=10"
    with store_errors(cfg, "nothing yet: the stage has not started"):
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    with _ended_with_status():
        with store_errors(cfg, "nothing yet: the stage has not started"):
            # The store the run is in, not tracking.uri's null, which means "resolve it".
            params = {**config_params(cfg), "tracking.uri": tracking_uri(cfg)}
            mlflow.log_params(redacted(params))
            mlflow.log_input(
                dataset_input(cfg.dataset.name, dataset_sha256, prepared_dir), context=stage
            )
        yield run


@contextlib.contextmanager
def child_run(name: str, tags: Mapping[str, str]) -> Iterator[Any]:
    """A nested run (e.g. one CV fold) under the active run, in the same experiment, with the
    DVC experiment tags of its parent."""
    import mlflow

    parent = mlflow.active_run()
    run = mlflow.start_run(
        experiment_id=parent.info.experiment_id,
        run_name=name,
        nested=True,
        tags={**tags, **dvc_tags(), **process_tags()},
    )
    with _ended_with_status():
        yield run


def run_record(run: Any, cfg: Config, dataset_sha256: str) -> dict[str, Any]:
    """What to write next to the outputs so a user (and the report) can find the run again,
    with the SHA-256 of the prepared data it ran on (summary.json's, by which the report refuses
    outputs of other data) and the resolved config the run used. Passwords are masked
    (credentials.redact): a reader finds the store again with recorded_store."""
    return {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": redact(tracking_uri(cfg)),
        "dataset_sha256": dataset_sha256,
        "config": redacted(OmegaConf.to_container(OmegaConf.structured(cfg))),
    }


def recorded_store(recorded: str, store: str) -> str:
    """The store a run record names (its tracking_uri). A password there is masked, so then it
    is `store`, this process's own (store_uri: tracking.uri, --tracking-uri, MLFLOW_TRACKING_URI),
    if that is the same URI with the password. TrackingError naming both otherwise."""
    if not is_masked(recorded):
        return recorded
    if redact(store) == recorded:
        return store
    raise TrackingError(
        f"the run was logged to {recorded}, whose password is not written down, and this "
        f"process's store is {redact(store)}. Fix: name that store with its password "
        "(tracking.uri=..., --tracking-uri or MLFLOW_TRACKING_URI), or keep the password out of "
        "the URI (MLFLOW_TRACKING_PASSWORD, ~/.pgpass: docs/SECURITY.md)"
    )
