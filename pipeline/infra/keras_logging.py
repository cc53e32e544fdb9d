"""MLflow logging of Keras training: the per-epoch metrics callback and a logged model's pins.

Kept apart from pipeline.infra.tracking because it imports Keras (TensorFlow), which the commands
that only read runs (compare, registry) must not pay for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pipeline.core.training import keras, metric_name
from pipeline.infra.errors import first_line

log = logging.getLogger(__name__)


class EpochMetricsLogger(keras.callbacks.Callback):
    """Log each epoch's metrics to the active MLflow run, with step = epoch (1-based), under the
    names `fit` returns them by (train_loss, train_accuracy, val_*).

    If the store fails mid-training, training goes on (its results are saved locally); the
    stage reports the tracking failure when it logs the final results.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        import mlflow

        if self.failed:
            return
        try:
            metrics = {metric_name(k): float(v) for k, v in (logs or {}).items()}
            mlflow.log_metrics(metrics, step=epoch + 1)
        except Exception as err:
            self.failed = True
            log.warning(
                "MLflow logging failed (%s); training continues without it", first_line(err)
            )


def model_requirements() -> list[str]:
    """Pinned pip requirements for the logged model: the packages that are installed here.

    Given explicitly because MLflow's inference of them reloads the model in a subprocess
    (about 14 s a run) and would name the right packages anyway.
    """
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in ("tensorflow", "tensorflow-cpu", "keras", "numpy"):
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return requirements
