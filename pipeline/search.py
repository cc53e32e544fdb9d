"""Hyper-parameter search: the Hydra callback that tags a search's best trial in MLflow.

`conf/hparams_search/mlp_optuna.yaml` runs Hydra's Optuna sweeper over `pipeline.crossval`, whose
task function returns the mean fold accuracy (the objective), and configures this callback under
`hydra.callbacks`:

    python -m pipeline.crossval -m hparams_search=mlp_optuna dataset=digits hydra.sweeper.n_trials=5

When the search ends, the callback finds the sweep's crossval runs by their shared `sweep` tag,
tags the one with the highest `accuracy_mean` `best_trial=true` and logs one line naming it.
It refuses to start a search over any other stage: `pipeline.train` returns no objective, and
tuning on its test accuracy would fit the test set.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STAGE = "crossval"
OBJECTIVE = "accuracy_mean"  # the metric crossval logs and its Hydra main returns
BEST_TAG = "best_trial"


class TagBestTrial(Callback):
    """Refuses a search over another stage; tags the best trial once the search has ended.
    Hydra turns a callback's exception into a warning and goes on, so a failure here raises
    SystemExit: one line, exit 1, like a stage's errors."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.job.name != STAGE:
            raise SystemExit(
                f"error: a hyper-parameter search optimizes cross-validated accuracy: run it with "
                f"`python -m pipeline.{STAGE} -m hparams_search=...`, not with "
                f"pipeline.{config.hydra.job.name} (tuning on the test accuracy fits the test set)"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        from pipeline.compare import load_runs, resolve_sweep
        from pipeline.errors import PipelineError
        from pipeline.tracking import sweep_settings, sweep_tag, tracking_uri

        try:
            client = mlflow.MlflowClient(tracking_uri(sweep_settings(config)))
            runs, _ = load_runs(client, sweep=resolve_sweep(client, sweep_tag(config.hydra)))
        except PipelineError as err:
            raise SystemExit(
                f"error: cannot tag the search's best trial in MLflow: {err}"
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
