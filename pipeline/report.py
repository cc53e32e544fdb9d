"""Stage 5: one self-contained HTML report (images embedded, opens offline) and a Markdown summary.

Reads what the earlier stages wrote; imports no TensorFlow (predictions come from train's CSV).
Outputs reports/report.html, reports/report.md and the two figures made here; the report is
also logged to the train run in MLflow.
"""

from __future__ import annotations

import base64
import csv
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.core.data import NUM_CLASSES, load_split
from pipeline.infra import paths
from pipeline.infra.config import Config
from pipeline.infra.errors import DataError
from pipeline.infra.files import atomic_path, read_json
from pipeline.infra.stage import run_stage

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
    return ReportInputs(
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


def confusion(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)
    np.add.at(matrix, (actual, predicted), 1)
    return matrix


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;
text-align:right}img{max-width:100%}pre{background:#f4f4f4;padding:1rem;overflow:auto}
.big{font-size:1.6rem;font-weight:600}"""


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
    trained = inputs.train_run["config"]
    model = trained["model"]
    fold_rows = [[k, f"{v:.4f}"] for k, v in cv["fold_accuracy"].items()]
    fold_rows += [["mean", f"{cv['accuracy_mean']:.4f}"], ["std", f"{cv['accuracy_std']:.4f}"]]
    data_rows = [
        ["train", summary["train"]["x_shape"][0], *summary["train"]["class_counts"]],
        ["test", summary["test"]["x_shape"][0], *summary["test"]["class_counts"]],
    ]
    data_header = ["split", "images", *[str(c) for c in range(NUM_CLASSES)]]
    run_rows = [
        ["train", inputs.train_run["run_id"], inputs.train_run["tracking_uri"]],
        ["crossval", inputs.crossval_run["run_id"], inputs.crossval_run["tracking_uri"]],
    ]
    config_yaml = OmegaConf.to_yaml(inputs.train_run["config"])  # what train really used
    title = f"digit-pipeline report: {summary['dataset']}"

    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Test result</h2>",
        f'<p class="big">test accuracy {tm["test_accuracy"]:.4f} · loss {tm["test_loss"]:.4f}</p>',
        f"<p>{model['name']}, width {trained['width']}, {trained['epochs']} epochs, "
        f"batch {trained['batch_size']}; "
        f"fit took {tm['fit_seconds']:.1f} s.</p>",
        "<h2>Dataset</h2>",
        f"<p>{html.escape(summary['dataset'])}: images {summary['image_shape']}, "
        f"pixels scaled to {summary['x_range']}, sha256 <code>{summary['sha256'][:16]}…</code></p>",
        _table(data_header, data_rows),
        _img(figures["samples"], "sample images"),
        "<h2>Training curves</h2>",
        _img(figures["history"], "training history"),
        "<h2>Confusion matrix and per-class accuracy</h2>",
        _img(figures["confusion"], "confusion matrix"),
        _table(["class", "test images", "accuracy"], per_class),
        "<h2>Misclassified test digits</h2>",
        f"<p>{int((inputs.actual != inputs.predicted).sum())} of {len(inputs.actual)} wrong; "
        f"the first {len(wrong)} (index: true→predicted):</p>",
        _img(figures["misclassified"], "misclassified digits"),
        "<h2>Cross-validation</h2>",
        f"<p>{len(cv['fold_accuracy'])}-fold accuracy {cv['accuracy_mean']:.4f} ± "
        f"{cv['accuracy_std']:.4f} (a new model per fold)</p>",
        _table(["fold", "accuracy"], fold_rows),
        _img(figures["curves"], "fold curves"),
        _img(figures["boxplot"], "fold accuracy boxplot"),
        "<h2>Provenance</h2>",
        _table(["stage", "MLflow run id", "tracking URI"], run_rows),
        f"<pre>{html.escape(config_yaml)}</pre>",
    ]
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    markdown = "\n\n".join(
        [
            f"# {title}",
            f"**Test accuracy {tm['test_accuracy']:.4f}**, loss {tm['test_loss']:.4f} "
            f"({model['name']}, width {trained['width']}, {trained['epochs']} epochs, "
            f"batch {trained['batch_size']})",
            f"## Cross-validation\n\n{len(cv['fold_accuracy'])}-fold accuracy "
            f"{cv['accuracy_mean']:.4f} ± {cv['accuracy_std']:.4f}",
            _markdown_table(["fold", "accuracy"], fold_rows),
            "## Per-class test accuracy",
            _markdown_table(["class", "test images", "accuracy"], per_class),
            "## MLflow runs",
            _markdown_table(["stage", "run id", "tracking URI"], run_rows),
            "The full report with figures: `report.html` (self-contained).",
        ]
    )
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    with atomic_path(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown + "\n", encoding="utf-8")
    return html_path, md_path


def report(root: Path, out_dir: Path) -> Path:
    """Build the report from root's stage outputs and log it to the train run in MLflow."""
    from mlflow import MlflowClient

    inputs = read_inputs(root)
    html_path, md_path = build_report(inputs, out_dir)
    client = MlflowClient(tracking_uri=inputs.train_run["tracking_uri"])
    for path in (html_path, md_path):
        client.log_artifact(inputs.train_run["run_id"], str(path), artifact_path="report")
    log.info("wrote %s (logged to MLflow run %s)", html_path, inputs.train_run["run_id"])
    return html_path


def _run(cfg: Config) -> None:
    report(Path("."), paths.REPORTS_DIR)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, _run)


if __name__ == "__main__":
    main()
