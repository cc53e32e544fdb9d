"""Hydra callbacks, configured under `hydra.callbacks`.

- `RedactSavedConfigs` (conf/config.yaml, every run): no password in a URI reaches Hydra's saved
  configs or its log lines.
- `CloseInterruptedRuns` (conf/config.yaml, every sweep): Ctrl-C or SIGTERM on a parallel sweep
  leaves no MLflow run RUNNING and no worker process alive.
- `TagBestTrial` (conf/hparams_search/mlp_optuna.yaml): `pipeline.crossval` returns the mean fold
  accuracy, which Hydra's Optuna sweeper maximizes; when the search ends, the callback finds the
  sweep's crossval runs by their shared `sweep` tag, tags the one with the highest
  `accuracy_mean` `best_trial=true` and logs one line naming it. It refuses a search over any
  other stage: `pipeline.train` returns no objective, and tuning on its test accuracy would fit
  the test set.

    python -m pipeline.crossval -m hparams_search=mlp_optuna dataset=digits hydra.sweeper.n_trials=5
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.infra.credentials import redact, redact_log_records
from pipeline.infra.errors import PipelineError
from pipeline.infra.files import atomic_path
from pipeline.infra.runs import filter_literal, load_runs, resolve_sweep
from pipeline.infra.stage import Terminated
from pipeline.infra.tracking import experiment_name, sweep_settings, sweep_tag, tracking_uri

log = logging.getLogger(__name__)

STAGE = "crossval"
OBJECTIVE = "accuracy_mean"  # the metric crossval logs and its Hydra main returns
BEST_TAG = "best_trial"


class TagBestTrial(Callback):
    """Refuses a search over another stage; tags the best trial once the search has ended.
    Hydra turns a callback's exception into a warning and goes on, so a failure here raises
    SystemExit: one line, exit 1, like a stage's errors."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not sys.stderr.isatty():
            # Optuna's log lines are coloured by colorlog whatever the stream; colorlog honours
            # NO_COLOR (no-color.org). Before the sweeper creates its study and logs.
            os.environ.setdefault("NO_COLOR", "1")
        if config.hydra.job.name != STAGE:
            raise SystemExit(
                f"error: a hyper-parameter search optimizes cross-validated accuracy: run it with "
                f"`python -m pipeline.{STAGE} -m hparams_search=...`, not with "
                f"pipeline.{config.hydra.job.name} (tuning on the test accuracy fits the test set)"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        try:
            client = mlflow.MlflowClient(tracking_uri(sweep_settings(config)))
            runs, _ = load_runs(client, sweep=resolve_sweep(client, sweep_tag(config.hydra)))
        except PipelineError as err:
            raise SystemExit(
                redact(f"error: cannot tag the search's best trial in MLflow: {err}")
            ) from None
        # Finished runs, oldest first: of equal scores the first trial wins, as in Optuna.
        best = max(runs, key=lambda run: run.metrics.get(OBJECTIVE, float("-inf")))
        for run in runs:
            if run is best:
                client.set_tag(run.run_id, BEST_TAG, "true")
            elif BEST_TAG in run.tags:  # a rerun into the same sweep folder: one best only
                client.delete_tag(run.run_id, BEST_TAG)
        log.info(
            "Best trial: MLflow run %s, %s=%.4f, overrides: %s (tagged %s=true)",
            best.run_id,
            OBJECTIVE,
            best.metrics[OBJECTIVE],
            best.tags.get("hydra_overrides", "?"),
            BEST_TAG,
        )


class CloseInterruptedRuns(Callback):
    """Ctrl-C or SIGTERM on a sweep: joblib (and Ray) kill their workers before the jobs can end
    their MLflow runs, which would then stay RUNNING forever. Once the sweep's own process gets
    SIGINT or SIGTERM, it marks the sweep's runs still RUNNING, and their fold runs, KILLED on
    its way out.

    SIGTERM is raised in the sweep's process as an interrupt (stage.Terminated), as Ctrl-C is:
    joblib then aborts the sweep and SIGKILLs its loky workers and their children
    (Parallel._abort, `executor.shutdown(kill_workers=True)`). Left to its default, SIGTERM
    ended only the sweep's process, and each worker (~930 MB) lived on until loky's idle
    timeout, about five minutes, with its job's run still RUNNING."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        armed: list[bool] = []

        def arm() -> None:
            if not armed:
                armed.append(True)
                atexit.register(_kill_running_runs, config)

        previous = signal.getsignal(signal.SIGINT)
        if callable(previous):  # else SIGINT is ignored (a background job): no Ctrl-C can come

            def interrupted(signum: int, frame: Any) -> None:
                arm()
                previous(signum, frame)

            signal.signal(signal.SIGINT, interrupted)

        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:

            def terminated(signum: int, frame: Any) -> None:
                arm()
                raise Terminated(f"received signal {signum}")

            signal.signal(signal.SIGTERM, terminated)


def _kill_running_runs(config: DictConfig) -> None:
    import mlflow

    sweep = sweep_tag(config.hydra)
    running = "attributes.status = 'RUNNING'"
    try:
        cfg = sweep_settings(config)
        client = mlflow.MlflowClient(tracking_uri(cfg))
        experiment = client.get_experiment_by_name(experiment_name(cfg))
        if experiment is None:
            return
        ids = [experiment.experiment_id]
        jobs = client.search_runs(ids, f"{running} and tags.sweep = {filter_literal(sweep)}")
        folds = [
            fold
            for job in jobs
            for fold in client.search_runs(
                ids, f"{running} and tags.mlflow.parentRunId = '{job.info.run_id}'"
            )
        ]
        for run in folds + jobs:
            client.set_terminated(run.info.run_id, "KILLED")
    except Exception as err:  # the store is unreachable or broken: say so, don't mask the exit
        print(redact(f"could not mark the interrupted sweep's runs KILLED: {err}"), file=sys.stderr)
        return
    if jobs:
        print(
            f"interrupted: marked {len(jobs + folds)} runs of sweep {sweep} KILLED", file=sys.stderr
        )


# What Hydra saves into a job's output_subdir (hydra/core/utils.py run_job).
SAVED_CONFIGS = ("config.yaml", "hydra.yaml", "overrides.yaml")


class RedactSavedConfigs(Callback):
    """Masks passwords in URIs (credentials.redact) in every log line from the start (Hydra's
    launcher logs each job's overrides) and in the configs Hydra saves: a job's
    .hydra/{config,hydra,overrides}.yaml and a sweep's multirun.yaml.

    Hydra writes those itself, in clear: a job's just before the job starts (run_job), a sweep's
    before its first job (the sweeper). So each job start rewrites its own and its sweep's, and a
    sweep rewrites its multirun.yaml again on its way out (also after Ctrl-C or a failed job)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        redact_log_records()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        redact_log_records()
        atexit.register(_redact_file, Path(config.hydra.sweep.dir) / "multirun.yaml")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        redact_log_records()
        hydra = config.hydra
        if hydra.output_subdir is not None:
            for name in SAVED_CONFIGS:
                _redact_file(Path(hydra.runtime.output_dir) / hydra.output_subdir / name)
        if hydra.mode == RunMode.MULTIRUN:
            _redact_file(Path(hydra.sweep.dir) / "multirun.yaml")


def _redact_file(path: Path) -> None:
    """Replace `path` (atomically) by a copy with its credentials masked, if it has any."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    if (clean := redact(text)) != text:
        with atomic_path(path) as tmp:
            tmp.write_text(clean, encoding="utf-8")
