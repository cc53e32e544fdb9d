"""Stage 3: fit the configured model on the training set, evaluate on the test set, log to MLflow.

Outputs (single run; a sweep job writes the same files into its Hydra job folder):
models/model.keras, metrics/train.json, plots/train/{history.csv,history.png,predictions.csv},
runs/train.json (the MLflow run id, and how long the fit took).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.core.data import load_split
from pipeline.infra import paths
from pipeline.infra.config import Config
from pipeline.infra.files import (
    atomic_path,
    file_sha256,
    read_json,
    replaced_together,
    write_csv,
    write_json,
)
from pipeline.infra.stage import check_prepared_dataset, output_root, run_main, run_stage

log = logging.getLogger(__name__)


def train(cfg: Config, prepared_dir: Path, out_root: Path) -> dict[str, float]:
    """Train, evaluate, save and log one model; returns the metrics written to train.json."""
    from pipeline.infra.tracking import (
        open_store_early,
        run_link,
        run_record,
        store_errors,
        tracked_run,
    )

    check_prepared_dataset(prepared_dir, cfg.dataset.name)  # before any store or output
    open_store_early(cfg)  # MLflow's import and store opening overlap TensorFlow's import

    from pipeline.core.metrics import evaluate
    from pipeline.core.models import build_model
    from pipeline.core.plots import history_curves, history_rows
    from pipeline.core.training import configure_threads, fit, new_session
    from pipeline.infra.keras_logging import EpochMetricsLogger, model_requirements
    from pipeline.infra.serving import log_served_model

    train_split = load_split(prepared_dir / "train.npz")
    test_split = load_split(prepared_dir / "test.npz")
    dataset_sha = read_json(prepared_dir / "summary.json")["sha256"]
    configure_threads(cfg.threads)
    new_session(cfg.seed, cfg.deterministic)
    network = build_model(
        **asdict(cfg.model),
        width=cfg.width,
        input_dim=train_split.x.shape[1],
        image_shape=train_split.image_shape,
    )

    import mlflow
    from mlflow.models import infer_signature

    with tracked_run(cfg, "train", dataset_sha, prepared_dir) as run:
        started = time.perf_counter()
        history = fit(
            network,
            train_split.x,
            train_split.y,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            validation_split=cfg.validation_split,
            callbacks=[EpochMetricsLogger()],
        )
        fit_seconds = time.perf_counter() - started
        # One pass over the test set: its metrics come from the probabilities that the
        # confusion matrix and the model signature need anyway.
        probabilities = network.predict(test_split.x, batch_size=1024, verbose=0)
        predicted = probabilities.argmax(axis=1)
        metrics = {
            **{f"test_{k}": v for k, v in evaluate(test_split.labels, probabilities).items()},
            **{k: v[-1] for k, v in history.items()},  # train_*, and val_* when validating
        }
        # Not a DVC metric: it defines no result (it would crowd `dvc exp show`); the run
        # record and MLflow keep it.
        timing = {"fit_seconds": fit_seconds, "seconds_per_epoch": fit_seconds / cfg.epochs}

        # Every output is written aside, then all replace the previous ones at once; the run
        # record names the model by its SHA-256, which predict and registry check.
        with replaced_together(out_root, paths.TRAIN_OUTPUTS) as staged:
            with atomic_path(staged / paths.MODELS_DIR / "model.keras") as tmp:
                network.save(tmp)
            staged_plots = staged / paths.PLOTS_DIR / "train"
            write_csv(staged_plots / "history.csv", history_rows(history))
            history_curves([history], staged_plots / "history.png")
            write_csv(
                staged_plots / "predictions.csv",
                [
                    {"actual": int(a), "predicted": int(p)}
                    for a, p in zip(test_split.labels, predicted, strict=True)
                ],
            )
            write_json(staged / paths.METRICS_DIR / "train.json", metrics)
            write_json(
                staged / paths.RUNS_DIR / "train.json",
                {
                    **run_record(run, cfg, dataset_sha),
                    "model_sha256": file_sha256(staged / paths.MODELS_DIR / "model.keras"),
                    "timing": timing,
                },
            )
        model_path = out_root / paths.MODELS_DIR / "model.keras"
        plots_dir = out_root / paths.PLOTS_DIR / "train"

        with store_errors(cfg, f"{model_path}, {out_root / paths.METRICS_DIR / 'train.json'}"):
            mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith("test_")})
            mlflow.log_metrics(timing)
            mlflow.log_artifacts(str(plots_dir), artifact_path="plots")
            sample = test_split.x[:5]
            # MLflow validates the input example by predicting it; keep Keras' progress quiet.
            with contextlib.redirect_stdout(io.StringIO()):
                mlflow.tensorflow.log_model(
                    network,
                    name="model",
                    signature=infer_signature(sample, probabilities[:5]),
                    input_example=sample,
                    pip_requirements=model_requirements(),
                )
                # Beside the network, the model `mlflow models serve` serves: images in.
                log_served_model(model_path, test_split.images[:2], model_requirements())
    log.info(
        "test accuracy %.4f, loss %.4f (%.1f s); MLflow run %s",
        metrics["test_accuracy"],
        metrics["test_loss"],
        fit_seconds,
        run_link(run, cfg),
    )
    return metrics


def _run(cfg: Config) -> None:
    train(cfg, paths.PREPARED_DIR, output_root())


@hydra.main(version_base="1.3", config_path=str(paths.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, _run)


def cli() -> None:
    """The installed command (digit-train): main inside the one-line envelope (run_main)."""
    run_main(main)


if __name__ == "__main__":
    cli()
