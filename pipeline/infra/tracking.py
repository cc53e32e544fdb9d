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
from pipeline.infra.errors import (
    PipelineError,
    TrackingError,
    filesystem_cause,
    first_line,
    interrupt_in,
)
from pipeline.infra.files import atomic_path
from pipeline.infra.paths import PREPARED_DIR
from pipeline.infra.reconcile import close_dead_runs, end_active_run, process_tags, writer_gone

log = logging.getLogger(__name__)
SQLITE_PREFIX = "sqlite:///"
# What `mlflow ui` and `mlflow server` serve on by default.
DEFAULT_UI = "http://127.0.0.1:5000"


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
    # MLflow prints "View run ... at: <this URI>/#/..." when a run on a server ends: a link to
    # its GenAI view, with the URI's password in clear. The stages log ui_link instead.
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


# Keys that say where a run is logged, how fast it trains or where its data comes from, not what
# it is: never params. The data itself is identified by the tag dataset_sha256.
NOT_PARAMS = (
    "tracking.", "threads", "dataset.mirrors", "dataset.timeout", "dataset.retries",
    "dataset.max_file_mb", "dataset.files.", "dataset.train.", "dataset.test.",
)  # fmt: skip


def config_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat MLflow params: what defines the run's result, and only the
    keys that apply to its dataset and model (no `model.filters` on an MLP, no digits-only
    `dataset.test_fraction` on MNIST)."""
    params = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))  # type: ignore[arg-type]
    unused = cfg.unused_keys()
    return {k: v for k, v in params.items() if not k.startswith(NOT_PARAMS) and k not in unused}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


# Settings that change where a run is logged or how fast it trains, not its result: left out of
# run names.
PLUMBING_KEYS = ("tracking", "threads")


def swept_keys(hydra_cfg: Any) -> set[str]:
    """The keys a multirun varies: its command line's sweep overrides (`epochs=5,10`, which
    Hydra's basic sweeper saves in <sweep dir>/multirun.yaml before it launches the jobs) and a
    sweeper's own search space (`hydra.sweeper.params`, e.g. Optuna's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set(OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {})
    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        task = OmegaConf.load(saved).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides(list(task))
        keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
    return keys


def run_name(stage: str, hydra_cfg: Any | None) -> str:
    """What tells the run apart from its neighbours in the runs table and chart legends: in a
    sweep, this job's values of the swept keys (`crossval width=64 epochs=10`); else its
    overrides. A DVC experiment's name comes first. Plumbing keys and passwords left out."""
    return " ".join([stage, run_label(hydra_cfg)]).strip()


def run_label(hydra_cfg: Any | None) -> str:
    """run_name without the stage: `width=64 epochs=10` for a sweep job (see run_name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    parts = [os.environ["DVC_EXP_NAME"]] if os.environ.get("DVC_EXP_NAME") else []
    if hydra_cfg is not None:
        task = list(hydra_cfg.overrides.task)
        keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task)]
        swept = swept_keys(hydra_cfg) if hydra_cfg.mode == RunMode.MULTIRUN else set()
        shown = swept & set(keys) or {k for k in keys if k.split(".")[0] not in PLUMBING_KEYS}
        parts += [redact(text) for key, text in zip(keys, task, strict=True) if key in shown]
    return " ".join(parts)


def sweep_tag(hydra_cfg: Any) -> str:
    """The `sweep` tag every job of one multirun carries (its grouping key): the sweep folder."""
    return str(hydra_cfg.sweep.dir)


def _hydra_config() -> Any | None:
    """This job's Hydra config; None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def hydra_tags() -> dict[str, str]:
    """The command-line overrides, and the sweep a multirun job belongs to (its grouping key)."""
    from hydra.types import RunMode

    hydra_cfg = _hydra_config()
    if hydra_cfg is None:
        return {}
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
            if found.lifecycle_stage == "active":  # a deleted one is refused below
                _mark_model_training(client, found)
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


# MLflow 3's UI opens an experiment on its GenAI overview (traces, judges, prompts) unless the
# experiment is of this kind; the same kind the UI's own "Machine learning" choice sets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _mark_model_training(client: Any, experiment: Any) -> None:
    """Tag the experiment as model training unless it already has a kind (a user's choice
    stands)."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where the MLflow UI shows the experiment's runs table (or one run), in its model-training
    view (the URL parameter `workflowType=machine_learning`; MLflow 3 defaults to its GenAI view
    otherwise). For a sqlite store, the address `mlflow ui` serves by default. Passwords masked."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI
    page = f"/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return redact(f"{base}{page}?workflowType=machine_learning")


def comparisons_experiment(client: Any, experiment_id: str) -> str:
    """The id of the experiment `pipeline.compare` logs to for runs of `experiment_id`'s:
    "<its name>-comparisons", created (as model training, artifacts beside the store) when
    missing, so a comparison never sits among the runs it compares."""
    name = client.get_experiment(experiment_id).name + "-comparisons"
    found = client.get_experiment_by_name(name)
    if found is None:
        found = _create_experiment(client, name, _artifact_location(client.tracking_uri, name))
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
            client.create_experiment(
                experiment,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
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
def logging_errors(store: str, saved: str | None) -> Iterator[None]:
    """Turn a failure of the MLflow store `store` while logging results into a TrackingError
    that says the results are safe on disk (`saved`) and how to log them again; `saved` None:
    the stage's run is starting, so nothing is saved yet. The cause is named (first_line: a full
    disk, a read-only store by errno), with its fix."""
    try:
        yield
    except Exception as err:
        if isinstance(err, PipelineError) or interrupt_in(err):
            raise
        cause = filesystem_cause(err)
        fix = f" Fix: {cause.fix}." if cause else ""
        if saved is None:
            raise TrackingError(
                f"cannot start the stage's MLflow run in {store}: {first_line(err)}.{fix} "
                "No output was written: run the stage again once the store is usable."
            ) from None
        raise TrackingError(
            f"the results are saved ({saved}) but logging them to MLflow at "
            f"{store} failed: {first_line(err)}.{fix} Re-run the stage once the "
            "store is reachable (`dvc repro` re-runs it, as it did not finish) to log them again."
        ) from None


@contextlib.contextmanager
def store_errors(cfg: Config, saved: str | None) -> Iterator[None]:
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
    tags["threads"] = str(cfg.threads)  # how fast, not what: a tag (fit_seconds depends on it)
    tags.update(hydra_tags())
    tags.update(dvc_tags())
    tags.update(process_tags())
    if commit := _git_commit():
        tags["git_commit"] = commit
    with store_errors(cfg, None):
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name(stage, _hydra_config()),
            tags=tags,
            log_system_metrics=cfg.tracking.system_metrics,
        )
    with _ended_with_status():
        with store_errors(cfg, None):
            # The store the run is in, not tracking.uri's null, which means "resolve it".
            mlflow.log_params(redacted(config_params(cfg)))
            mlflow.log_input(
                dataset_input(cfg.dataset.name, dataset_sha256, prepared_dir), context=stage
            )
        yield run


@contextlib.contextmanager
def child_run(name: str, tags: Mapping[str, str]) -> Iterator[Any]:
    """A nested run (e.g. one CV fold) under the active run, in the same experiment, with its
    parent's params and tags (sweep, overrides, dataset, DVC experiment), then `tags`: so a
    filter such as `tags.sweep = "..."` or `params.epochs = "3"` keeps the folds with their
    parent, and the runs table shows their settings."""
    import mlflow

    parent = mlflow.get_run(mlflow.active_run().info.run_id).data
    inherited = {k: v for k, v in parent.tags.items() if not k.startswith("mlflow.")}
    run = mlflow.start_run(
        experiment_id=mlflow.active_run().info.experiment_id,
        run_name=name,
        nested=True,
        tags={**inherited, **tags, **process_tags()},
    )
    with _ended_with_status():
        mlflow.log_params(parent.params)
        yield run


def run_link(run: Any, cfg: Config) -> str:
    """The run's page in the MLflow UI (ui_link), for the stages' last log line."""
    return ui_link(tracking_uri(cfg), run.info.experiment_id, run.info.run_id)


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
