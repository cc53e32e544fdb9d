"""Stage 4: k-fold cross-validation of the configured model on the training set.

A new, freshly initialised model is built for every fold. (The seed article fits one network
across all folds, so later folds are scored on data the network has already trained on: that
leaks and inflates the accuracy.) Outputs: metrics/crossval.json, plots/crossval/{history.csv,
curves.png, boxplot.png}, runs/crossval.json; MLflow: a parent run with one child run per fold
(crossval.repeats=r: r fold assignments, r x folds child runs tagged repeat and fold).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from pipeline.core.data import load_split
from pipeline.core.folds import repeated_fold_indices
from pipeline.core.stats import sample_std
from pipeline.infra import paths
from pipeline.infra.config import Config
from pipeline.infra.files import read_json, replaced_together, write_csv, write_json
from pipeline.infra.stage import check_prepared_dataset, output_root, run_main, run_stage

log = logging.getLogger(__name__)


def crossval(cfg: Config, prepared_dir: Path, out_root: Path) -> dict:
    """Run k-fold CV; returns the metrics written to crossval.json."""
    from pipeline.infra.tracking import (
        child_run,
        open_store_early,
        run_link,
        run_record,
        store_errors,
        tracked_run,
    )

    check_prepared_dataset(prepared_dir, cfg.dataset.name)  # before any store or output
    open_store_early(cfg)  # MLflow's import and store opening overlap TensorFlow's import

    from pipeline.core.models import build_model
    from pipeline.core.plots import fold_boxplot, history_curves, history_rows
    from pipeline.core.training import configure_threads, fit, new_session
    from pipeline.infra.keras_logging import EpochMetricsLogger

    data = load_split(prepared_dir / "train.npz")
    repeats = cfg.crossval.repeats
    folds = repeated_fold_indices(
        data.labels,
        folds=cfg.folds,
        repeats=repeats,
        seed=cfg.seed,
        shuffle=cfg.crossval.shuffle,
        stratified=cfg.crossval.stratified,
    )
    dataset_sha = read_json(prepared_dir / "summary.json")["sha256"]
    names, accuracies, losses, histories, rows = [], [], [], [], []
    configure_threads(cfg.threads)

    import mlflow

    with tracked_run(cfg, "crossval", dataset_sha, prepared_dir) as run:
        for repeat, k, train_idx, val_idx in folds:
            # Repeat 1's fold k keeps the unrepeated run's seed; later repeats get their own.
            new_session(cfg.seed + (repeat - 1) * cfg.folds + k, cfg.deterministic)
            network = build_model(
                **asdict(cfg.model),
                width=cfg.width,
                input_dim=data.x.shape[1],
                image_shape=data.image_shape,
            )
            name = f"fold {k}" if repeats == 1 else f"repeat {repeat} fold {k}"
            tags = {"stage": "crossval-fold", "fold": str(k), "repeat": str(repeat)}
            with child_run(name, tags):
                history = fit(
                    network,
                    data.x[train_idx],
                    data.y[train_idx],
                    epochs=cfg.epochs,
                    batch_size=cfg.batch_size,
                    validation_data=(data.x[val_idx], data.y[val_idx]),
                    callbacks=[EpochMetricsLogger()],
                )
                # Keras scored the fold with the final weights at the end of the last epoch.
                loss, accuracy = history["val_loss"][-1], history["val_accuracy"][-1]
                mlflow.log_metrics({"fold_accuracy": accuracy, "fold_loss": loss})
            log.info("%s/%d: accuracy %.4f", name, cfg.folds, accuracy)
            # fold1.. as before; repeat2_fold1.. when repeated
            names.append(f"fold{k}" if repeats == 1 else f"repeat{repeat}_fold{k}")
            accuracies.append(float(accuracy))
            losses.append(float(loss))
            histories.append(history)
            rows.extend(history_rows(history, repeat=repeat, fold=k))

        metrics = {
            "accuracy_mean": float(np.mean(accuracies)),
            "accuracy_std": sample_std(accuracies),
            "loss_mean": float(np.mean(losses)),
            "loss_std": sample_std(losses),
            "fold_accuracy": dict(zip(names, accuracies, strict=True)),
        }
        with replaced_together(out_root, paths.CROSSVAL_OUTPUTS) as staged:  # as one set
            staged_plots = staged / paths.PLOTS_DIR / "crossval"
            write_csv(staged_plots / "history.csv", rows)
            history_curves(histories, staged_plots / "curves.png")
            fold_boxplot(accuracies, staged_plots / "boxplot.png", repeats=repeats)
            write_json(staged / paths.METRICS_DIR / "crossval.json", metrics)
            write_json(staged / paths.RUNS_DIR / "crossval.json", run_record(run, cfg, dataset_sha))
        plots_dir = out_root / paths.PLOTS_DIR / "crossval"

        with store_errors(cfg, f"{out_root / paths.METRICS_DIR / 'crossval.json'}, {plots_dir}"):
            mlflow.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, dict)})
            mlflow.log_artifacts(str(plots_dir), artifact_path="plots")
    log.info(
        "%d-fold accuracy %.4f ± %.4f%s; MLflow run %s",
        cfg.folds,
        metrics["accuracy_mean"],
        metrics["accuracy_std"],
        f" over {repeats} repeats" if repeats > 1 else "",
        run_link(run, cfg),
    )
    return metrics


def _run(cfg: Config) -> float:
    return crossval(cfg, paths.PREPARED_DIR, output_root())["accuracy_mean"]


@hydra.main(version_base="1.3", config_path=str(paths.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """The mean fold accuracy: the objective a sweeper maximizes (`hparams_search=mlp_optuna`)."""
    return run_stage(cfg, _run)


def cli() -> None:
    """The installed command (digit-crossval): main inside the one-line envelope (run_main)."""
    run_main(main)


if __name__ == "__main__":
    cli()
