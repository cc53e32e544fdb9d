"""Stage 5: one self-contained HTML report (images embedded, opens offline) and a Markdown summary.

Reads what the earlier stages wrote; imports no TensorFlow (predictions come from train's CSV).
Outputs reports/report.html, reports/report.md and the two figures made here; the report is
also logged to the train run in MLflow.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.core.data import NUM_CLASSES, load_split
from pipeline.core.metrics import confusion
from pipeline.infra import paths
from pipeline.infra.config import Config
from pipeline.infra.credentials import redact
from pipeline.infra.errors import DataError
from pipeline.infra.files import atomic_path, read_json, replaced_together
from pipeline.infra.render import Code, Headline, Image, Section, Table, Text, document
from pipeline.infra.stage import check_prepared_dataset, run_main, run_stage

log = logging.getLogger(__name__)
GALLERY_SIZE = 24


@dataclass
class ReportInputs:
    """Everything the report shows, read from the earlier stages' outputs."""

    summary: dict
    train_metrics: dict
    crossval_metrics: dict
    train_run: dict
    crossval_run: dict
    actual: np.ndarray
    predicted: np.ndarray
    test_images: np.ndarray
    figures: dict[str, Path]


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path} is missing: run the earlier stages first (`dvc repro`).")
    return path


def read_inputs(root: Path) -> ReportInputs:
    prepared = root / paths.PREPARED_DIR
    plots = root / paths.PLOTS_DIR
    with open(_require(plots / "train" / "predictions.csv"), encoding="utf-8") as f:
        rows = [(int(r["actual"]), int(r["predicted"])) for r in csv.DictReader(f)]
    actual, predicted = (np.array(column, dtype=int) for column in zip(*rows, strict=True))
    inputs = ReportInputs(
        summary=read_json(_require(prepared / "summary.json")),
        train_metrics=read_json(_require(root / paths.METRICS_DIR / "train.json")),
        crossval_metrics=read_json(_require(root / paths.METRICS_DIR / "crossval.json")),
        train_run=read_json(_require(root / paths.RUNS_DIR / "train.json")),
        crossval_run=read_json(_require(root / paths.RUNS_DIR / "crossval.json")),
        actual=actual,
        predicted=predicted,
        test_images=load_split(_require(prepared / "test.npz")).images,
        figures={
            "samples": _require(prepared / "samples.png"),
            "history": _require(plots / "train" / "history.png"),
            "curves": _require(plots / "crossval" / "curves.png"),
            "boxplot": _require(plots / "crossval" / "boxplot.png"),
        },
    )
    check_same_data(inputs)
    return inputs


def check_same_data(inputs: ReportInputs) -> None:
    """Refuse outputs of train or crossval made on other data than data/prepared/ now holds
    (their run records' dataset_sha256 against summary.json's sha256), and predictions of
    another test split (rows of predictions.csv against test.npz's images): after `train` on
    digits, then `fetch` and `preprocess` of MNIST, the report would title digits' numbers
    "mnist" and log itself to the digits run. DataError naming what differs and the fix."""
    prepared = inputs.summary["sha256"]
    summary_path = paths.PREPARED_DIR / "summary.json"
    for stage, record in (("train", inputs.train_run), ("crossval", inputs.crossval_run)):
        path, used = paths.RUNS_DIR / f"{stage}.json", record.get("dataset_sha256")
        fix = f"Fix: re-run {stage} (`dvc repro`, or `python -m pipeline.{stage}`)"
        if used is None:
            raise DataError(
                f"{path} names no prepared data (an older version wrote it), so it may be of "
                f"other data than {summary_path}. {fix}"
            )
        if used != prepared:
            raise DataError(
                f"{path} is a run on other data ({record['config']['dataset']['name']}, sha256 "
                f"{used[:16]}…) than {summary_path} ({inputs.summary['dataset']}, sha256 "
                f"{prepared[:16]}…). {fix}"
            )
    if len(inputs.predicted) != len(inputs.test_images):
        raise DataError(
            f"{paths.PLOTS_DIR / 'train' / 'predictions.csv'} has {len(inputs.predicted)} rows "
            f"but the test split has {len(inputs.test_images)} images "
            f"({paths.PREPARED_DIR / 'test.npz'}): they are of other data. Fix: re-run train "
            "(`dvc repro`, or `python -m pipeline.train`)"
        )


# Settings that are one stage's own or the plumbing's: a difference there is no other model.
NOT_THE_MODEL = ("dataset.", "tracking.", "crossval.", "folds", "threads", "validation_split")


def config_differences(trained: dict, validated: dict) -> list[str]:
    """The settings of the model and its training that differ between train's config and
    crossval's (dotted keys, sorted), as "<key> <crossval's value> (train <train's value>)"."""
    from pipeline.infra.tracking import flatten

    ours, theirs = flatten(trained), flatten(validated)
    return [
        f"{key} {theirs.get(key)} (train {ours.get(key)})"
        for key in sorted(ours.keys() | theirs.keys())
        if not key.startswith(NOT_THE_MODEL) and ours.get(key) != theirs.get(key)
    ]


def _number(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def headline(train_metrics: dict) -> list[str]:
    """Every `test_<name>` metric of metrics/train.json as "<name> <value>" (underscores as
    spaces, floats to 4 places): test_accuracy first, as "test accuracy <value>", then the others
    in the file's order. A metric train adds needs no change here."""
    keys = sorted((k for k in train_metrics if k.startswith("test_")), key="test_accuracy".__ne__)
    figures = [
        f"{k.removeprefix('test_').replace('_', ' ')} {_number(train_metrics[k])}" for k in keys
    ]
    if not figures:
        raise DataError(
            "metrics/train.json has no test_ metric: rerun the train stage (`dvc repro`)"
        )
    return [f"test {figures[0]}", *figures[1:]]


def build_report(inputs: ReportInputs, out_dir: Path) -> tuple[Path, Path]:
    """Write report.html and report.md into out_dir; returns their paths."""
    from pipeline.core.grids import image_gallery
    from pipeline.core.plots import confusion_matrix

    matrix = confusion(inputs.actual, inputs.predicted)
    per_class = [
        [c, int(matrix[c].sum()), f"{matrix[c, c] / max(matrix[c].sum(), 1):.4f}"]
        for c in range(NUM_CLASSES)
    ]
    wrong = np.flatnonzero(inputs.actual != inputs.predicted)[:GALLERY_SIZE]
    figures = dict(inputs.figures)
    figures["confusion"] = out_dir / "confusion.png"
    confusion_matrix(matrix, figures["confusion"])
    figures["misclassified"] = out_dir / "misclassified.png"
    image_gallery(
        inputs.test_images[wrong],
        [f"#{i}: {inputs.actual[i]}→{inputs.predicted[i]}" for i in wrong],
        figures["misclassified"],
    )

    tm, cv, summary = inputs.train_metrics, inputs.crossval_metrics, inputs.summary
    # A run record written before timing moved out of metrics/train.json has none.
    timing = inputs.train_run.get("timing")
    fit_time = f"; fit took {timing['fit_seconds']:.1f} s" if timing else ""
    trained = inputs.train_run["config"]
    # Both ran on this data (check_same_data); other settings make crossval's numbers those of
    # another model than the one shown, which is worth saying but not refusing.
    differences = config_differences(trained, inputs.crossval_run["config"])
    warning = (
        f"cross-validation ran another config than train: {', '.join(differences)}; its "
        "numbers are not those of the model shown (re-run crossval with train's config)"
    )
    if differences:
        log.warning("%s", warning)
    mismatch = [Text(f"**Warning: {warning}.**")] if differences else []
    fold_rows = [[k, f"{v:.4f}"] for k, v in cv["fold_accuracy"].items()]
    fold_rows += [["mean", f"{cv['accuracy_mean']:.4f}"], ["std", f"{cv['accuracy_std']:.4f}"]]
    data_rows = [
        ["train", summary["train"]["x_shape"][0], *summary["train"]["class_counts"]],
        ["test", summary["test"]["x_shape"][0], *summary["test"]["class_counts"]],
    ]
    run_rows = [
        ["train", inputs.train_run["run_id"], inputs.train_run["tracking_uri"]],
        ["crossval", inputs.crossval_run["run_id"], inputs.crossval_run["tracking_uri"]],
    ]
    sections = [
        Section(
            "Test result",
            [
                Headline(headline(tm)),
                Text(
                    f"{trained['model']['name']}, width {trained['width']}, "
                    f"{trained['epochs']} epochs, batch {trained['batch_size']}{fit_time}."
                ),
            ],
        ),
        Section(
            "Dataset",
            [
                Text(
                    f"{summary['dataset']}: images {summary['image_shape']}, pixels scaled to "
                    f"{summary['x_range']}, sha256 `{summary['sha256'][:16]}…`"
                ),
                Table(["split", "images", *map(str, range(NUM_CLASSES))], data_rows),
                Image(figures["samples"], "sample images"),
            ],
        ),
        Section(
            "Training curves",
            [Image(figures["history"], "training history")],
            in_markdown=False,
        ),
        Section(
            "Confusion matrix and per-class accuracy",
            [
                Image(figures["confusion"], "confusion matrix"),
                Table(["class", "test images", "accuracy"], per_class),
            ],
        ),
        Section(
            "Misclassified test digits",
            [
                Text(
                    f"{int((inputs.actual != inputs.predicted).sum())} of {len(inputs.actual)} "
                    f"wrong; the first {len(wrong)} (index: true→predicted):"
                ),
                Image(figures["misclassified"], "misclassified digits"),
            ],
            in_markdown=False,  # its text introduces the figure
        ),
        Section(
            "Cross-validation",
            [
                Text(
                    f"{len(cv['fold_accuracy'])}-fold accuracy {cv['accuracy_mean']:.4f} ± "
                    f"{cv['accuracy_std']:.4f} (sample std, ddof=1; a new model per fold)"
                ),
                *mismatch,
                Table(["fold", "accuracy"], fold_rows),
                Image(figures["curves"], "fold curves"),
                Image(figures["boxplot"], "fold accuracy boxplot"),
            ],
        ),
        Section(
            "Provenance",
            [
                Table(["stage", "MLflow run id", "tracking URI"], run_rows),
                Code(OmegaConf.to_yaml(trained), "yaml"),  # what train really used
            ],
        ),
        Section(
            "",
            [Text("The full report with figures: `report.html` (self-contained).")],
            in_html=False,
        ),
    ]
    page, markdown = document(f"digit-pipeline report: {summary['dataset']}", sections)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    for path, text in ((html_path, page), (md_path, markdown)):
        with atomic_path(path) as tmp:
            # Run records of older versions hold a store's or mirror's password in clear.
            tmp.write_text(redact(text), encoding="utf-8")
    return html_path, md_path


def report(root: Path, out_dir: Path, tracking_uri: str | None = None) -> Path:
    """Build the report from root's stage outputs and log it to the train run in MLflow, in the
    store runs/train.json names (with a masked password: this stage's store, `tracking_uri` by
    tracking.store_uri's rule, if it is the same store). A missing sqlite store or an
    unreachable server is a TrackingError (tracking.check_store: no empty store created, no
    minutes of retries), as is a store failing while logging (tracking.logging_errors); the
    report files are kept, and the message names them and how to log them again."""
    from pipeline.infra.tracking import check_store, logging_errors, recorded_store, store_uri

    inputs = read_inputs(root)
    store = recorded_store(inputs.train_run["tracking_uri"], store_uri(tracking_uri))
    # The figures and pages replace the previous out_dir as one set (the page embeds them).
    with replaced_together(out_dir.parent, [Path(out_dir.name)]) as staged:
        build_report(inputs, staged / out_dir.name)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    log_again = (
        "re-run the report (`dvc repro` or `python -m pipeline.report`) to log the saved "
        f"{html_path} and {md_path}"
    )
    check_store(
        store,
        f"put back the store train logged to, or re-run train (`dvc repro`); then {log_again}",
        f"then {log_again}",
    )
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    with logging_errors(store, f"{html_path}, {md_path}"):
        for path in (html_path, md_path):
            client.log_artifact(inputs.train_run["run_id"], str(path), artifact_path="report")
    log.info("wrote %s (logged to MLflow run %s)", html_path, inputs.train_run["run_id"])
    return html_path


def _run(cfg: Config) -> None:
    check_prepared_dataset(paths.PREPARED_DIR, cfg.dataset.name)
    report(Path("."), paths.REPORTS_DIR, cfg.tracking.uri)


@hydra.main(version_base="1.3", config_path=str(paths.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, _run)


def cli() -> None:
    """The installed command (digit-report): main inside the one-line envelope (run_main)."""
    run_main(main)


if __name__ == "__main__":
    cli()
