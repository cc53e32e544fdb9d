"""The report stage on small synthetic inputs: confusion counts, a self-contained HTML page with
every section, the Markdown summary, clear errors for missing inputs, and logging to MLflow.

The figures are real PNGs drawn by pipeline.core.plots; the input files are written in the layout
the earlier stages use (pipeline.infra.paths), so read_inputs reads exactly what `dvc repro` would
give it.
"""

from __future__ import annotations

import base64
import csv
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from run_helpers import (
    PROJECT_ROOT,
    REPORT_SECTIONS,
    files_under,
    fill,
    full_disk,
    new_store,
    run_module,
)

from pipeline.core.data import NUM_CLASSES, save_split, to_split
from pipeline.core.grids import sample_grid
from pipeline.core.metrics import confusion
from pipeline.core.plots import fold_boxplot, history_curves
from pipeline.infra import paths
from pipeline.infra.config import Config, ModelConfig
from pipeline.infra.errors import DataError
from pipeline.infra.files import read_json, staging_folders, write_json
from pipeline.report import ReportInputs, build_report, read_inputs

EMBEDDED = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_RUN_ID = "0123456789abcdef0123456789abcdef"
CROSSVAL_RUN_ID = "fedcba9876543210fedcba9876543210"


# --------------------------------------------------------------------------- confusion


def test_confusion_counts_true_rows_predicted_columns() -> None:
    matrix = confusion(np.array([0, 1, 2, 2, 9]), np.array([0, 2, 2, 1, 3]))
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES)
    assert matrix.dtype.kind == "i"
    expected = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)
    expected[0, 0] = expected[1, 2] = expected[2, 2] = expected[2, 1] = expected[9, 3] = 1
    np.testing.assert_array_equal(matrix, expected)


def test_confusion_counts_repeated_pairs() -> None:
    """Every (actual, predicted) pair counts, repeats included (not fancy-index assignment)."""
    matrix = confusion(np.array([3, 3, 3, 3, 7]), np.array([3, 3, 5, 3, 7]))
    assert matrix[3, 3] == 3
    assert matrix[3, 5] == 1
    assert matrix[7, 7] == 1
    assert matrix.sum() == 5
    np.testing.assert_array_equal(matrix.sum(axis=1), np.bincount([3, 3, 3, 3, 7], minlength=10))
    np.testing.assert_array_equal(matrix.sum(axis=0), np.bincount([3, 3, 5, 3, 7], minlength=10))


def test_confusion_of_perfect_predictions_is_diagonal() -> None:
    labels = np.arange(20) % NUM_CLASSES
    np.testing.assert_array_equal(confusion(labels, labels), 2 * np.eye(NUM_CLASSES, dtype=int))


def test_confusion_of_nothing_is_zero() -> None:
    empty = np.array([], dtype=int)
    assert not confusion(empty, empty).any()


# --------------------------------------------------------------------------- synthetic inputs

# 12 test images: 3 of them wrong (indices 1, 4 and 10)
ACTUAL = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
PREDICTED = np.array([0, 7, 2, 3, 9, 5, 6, 7, 8, 9, 6, 1])
TEST_ACCURACY = 0.75
FOLD_ACCURACY = {"fold1": 0.8125, "fold2": 0.6875}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four figures the earlier stages draw, drawn small by pipeline.core.plots (once)."""
    out = tmp_path_factory.mktemp("figures")
    history = {"train_loss": [2.0, 1.0], "train_accuracy": [0.4, 0.7]}
    folds = [
        {**history, "val_loss": [2.1, 1.2], "val_accuracy": [0.35, 0.8]},
        {**history, "val_loss": [2.2, 1.4], "val_accuracy": [0.3, 0.7]},
    ]
    made = {
        "samples": out / "samples.png",
        "history": out / "history.png",
        "curves": out / "curves.png",
        "boxplot": out / "boxplot.png",
    }
    sample_grid(_images(9, 1), np.arange(9), made["samples"])
    history_curves([history], made["history"])
    history_curves(folds, made["curves"])
    fold_boxplot(list(FOLD_ACCURACY.values()), made["boxplot"])
    for path in made.values():
        assert path.read_bytes().startswith(PNG_MAGIC)
    return made


def _train_config() -> dict:
    cfg = Config(epochs=3, width=48, batch_size=16, model=ModelConfig(name="mlp"))
    cfg.dataset.name = "digits"
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def _summary() -> dict:
    return {
        "dataset": "digits",
        "image_shape": [8, 8],
        "num_classes": NUM_CLASSES,
        "train": {
            "x_shape": [30, 64],
            "y_shape": [30, 10],
            "class_counts": [3] * NUM_CLASSES,
        },
        "test": {
            "x_shape": [len(ACTUAL), 64],
            "y_shape": [len(ACTUAL), 10],
            "class_counts": np.bincount(ACTUAL, minlength=NUM_CLASSES).tolist(),
        },
        "x_dtype": "float32",
        "x_range": [0.0, 1.0],
        "sha256": "ab" * 32,
    }


def _inputs(figures: dict[str, Path], predicted: np.ndarray = PREDICTED) -> ReportInputs:
    run = {
        "tracking_uri": "sqlite:////somewhere/mlflow.db",
        "dataset_sha256": _summary()["sha256"],
        "config": _train_config(),
    }
    return ReportInputs(
        summary=_summary(),
        train_metrics={
            "test_accuracy": TEST_ACCURACY,
            "test_loss": 0.8765,
            "train_accuracy": 0.8,
            "train_loss": 0.6,
        },
        crossval_metrics={
            "accuracy_mean": 0.75,
            "accuracy_std": 0.0625,
            "loss_mean": 1.3,
            "loss_std": 0.1,
            "fold_accuracy": dict(FOLD_ACCURACY),
        },
        train_run={
            "run_id": TRAIN_RUN_ID,
            "experiment_id": "1",
            "timing": {"fit_seconds": 1.25, "seconds_per_epoch": 0.42},
            **run,
        },
        crossval_run={"run_id": CROSSVAL_RUN_ID, "experiment_id": "1", **run},
        actual=ACTUAL,
        predicted=predicted,
        test_images=_images(len(ACTUAL), 2),
        figures=dict(figures),
    )


@pytest.fixture(scope="module")
def built(
    figures: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """(report.html, report.md, out_dir) built once from the synthetic inputs."""
    out_dir = tmp_path_factory.mktemp("reports")
    html_path, md_path = build_report(_inputs(figures), out_dir)
    return html_path, md_path, out_dir


# --------------------------------------------------------------------------- build_report


def test_build_report_writes_both_files(built: tuple[Path, Path, Path]) -> None:
    html_path, md_path, out_dir = built
    assert html_path == out_dir / "report.html"
    assert md_path == out_dir / "report.md"
    assert html_path.stat().st_size > 0 and md_path.stat().st_size > 0
    # the two figures drawn by the report itself, and no temporary files left behind
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "confusion.png",
        "misclassified.png",
        "report.html",
        "report.md",
    ]


def test_html_has_every_section(built: tuple[Path, Path, Path]) -> None:
    page = built[0].read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert page.rstrip().endswith("</html>")
    headings = re.findall(r"<h2>([^<]*)</h2>", page)
    for section in REPORT_SECTIONS:
        assert any(h.startswith(section) for h in headings), (section, headings)
    assert "<h1>digit-pipeline report: digits</h1>" in page


def test_html_shows_the_numbers(built: tuple[Path, Path, Path]) -> None:
    page = built[0].read_text(encoding="utf-8")
    assert "test accuracy 0.7500" in page
    assert "loss 0.8765" in page
    assert "mlp, width 48, 3 epochs, batch 16" in page
    assert "3 of 12 wrong" in page
    assert "2-fold accuracy 0.7500 ± 0.0625" in page
    assert "<td>fold1</td><td>0.8125</td>" in page
    assert "<td>fold2</td><td>0.6875</td>" in page
    # dataset table: split, image count, per-class counts
    assert "<td>train</td><td>30</td>" in page
    assert "<td>test</td><td>12</td>" in page
    # provenance: both run ids, the store, the config train used
    assert f"<td>{TRAIN_RUN_ID}</td>" in page
    assert f"<td>{CROSSVAL_RUN_ID}</td>" in page
    assert "sqlite:////somewhere/mlflow.db" in page
    assert "epochs: 3" in page and "width: 48" in page
    # per-class accuracy: class 0 has 2 test images, 1 right; class 4 has 1, 0 right
    assert "<td>0</td><td>2</td><td>0.5000</td>" in page
    assert "<td>4</td><td>1</td><td>0.0000</td>" in page


def test_html_is_self_contained(built: tuple[Path, Path, Path], figures: dict[str, Path]) -> None:
    """Every figure is embedded as base64 PNG (the page opens offline, from anywhere)."""
    html_path, _, out_dir = built
    page = html_path.read_text(encoding="utf-8")
    embedded = dict(EMBEDDED.findall(page))
    assert page.count("<img") == len(EMBEDDED.findall(page)) == 6
    assert sorted(embedded) == sorted(
        [
            "sample images",
            "training history",
            "confusion matrix",
            "misclassified digits",
            "fold curves",
            "fold accuracy boxplot",
        ]
    )
    expected_files = {
        "sample images": figures["samples"],
        "training history": figures["history"],
        "fold curves": figures["curves"],
        "fold accuracy boxplot": figures["boxplot"],
        "confusion matrix": out_dir / "confusion.png",
        "misclassified digits": out_dir / "misclassified.png",
    }
    for alt, path in expected_files.items():
        assert base64.b64decode(embedded[alt]) == path.read_bytes(), alt
    for external in ('src="http', 'src="file', 'href="http', "<link", "<script"):
        assert external not in page


def test_markdown_has_test_accuracy_and_cv_table(built: tuple[Path, Path, Path]) -> None:
    markdown = built[1].read_text(encoding="utf-8")
    lines = markdown.splitlines()
    assert lines[0] == "# digit-pipeline report: digits"
    assert "**Test accuracy 0.7500**, loss 0.8765" in markdown
    assert "## Cross-validation" in markdown
    assert "2-fold accuracy 0.7500 ± 0.0625" in markdown
    table_start = lines.index("| fold | accuracy |")
    assert lines[table_start : table_start + 6] == [
        "| fold | accuracy |",
        "|---|---|",
        "| fold1 | 0.8125 |",
        "| fold2 | 0.6875 |",
        "| mean | 0.7500 |",
        "| std | 0.0625 |",
    ]
    assert "| 0 | 2 | 0.5000 |" in lines  # per-class table
    assert f"| train | {TRAIN_RUN_ID} | sqlite:////somewhere/mlflow.db |" in lines
    assert "report.html" in markdown
    assert "data:image" not in markdown


def test_report_with_no_mistakes(figures: dict[str, Path], tmp_path: Path) -> None:
    """A perfect model still gets a complete report (an empty misclassified gallery)."""
    html_path, _ = build_report(_inputs(figures, predicted=ACTUAL.copy()), tmp_path)
    page = html_path.read_text(encoding="utf-8")
    assert "0 of 12 wrong" in page
    assert len(EMBEDDED.findall(page)) == 6
    assert (tmp_path / "misclassified.png").read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------- read_inputs


def _write_stage_outputs(root: Path, figures: dict[str, Path]) -> None:
    """What fetch..crossval leave under root, in their real layout."""
    inputs = _inputs(figures)
    prepared = root / paths.PREPARED_DIR
    plots = root / paths.PLOTS_DIR
    labels = np.arange(30) % NUM_CLASSES
    save_split(to_split(_images(30, 3), labels), prepared / "train.npz")
    save_split(to_split(inputs.test_images, inputs.actual), prepared / "test.npz")
    write_json(prepared / "summary.json", inputs.summary)
    (plots / "train").mkdir(parents=True)
    (plots / "crossval").mkdir(parents=True)
    with open(plots / "train" / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows(zip(inputs.actual.tolist(), inputs.predicted.tolist(), strict=True))
    write_json(root / paths.METRICS_DIR / "train.json", inputs.train_metrics)
    write_json(root / paths.METRICS_DIR / "crossval.json", inputs.crossval_metrics)
    write_json(root / paths.RUNS_DIR / "train.json", inputs.train_run)
    write_json(root / paths.RUNS_DIR / "crossval.json", inputs.crossval_run)
    (prepared / "samples.png").write_bytes(figures["samples"].read_bytes())
    (plots / "train" / "history.png").write_bytes(figures["history"].read_bytes())
    (plots / "crossval" / "curves.png").write_bytes(figures["curves"].read_bytes())
    (plots / "crossval" / "boxplot.png").write_bytes(figures["boxplot"].read_bytes())


REQUIRED = [
    "plots/train/predictions.csv",
    "data/prepared/summary.json",
    "data/prepared/test.npz",
    "metrics/train.json",
    "metrics/crossval.json",
    "runs/train.json",
    "runs/crossval.json",
    "data/prepared/samples.png",
    "plots/train/history.png",
    "plots/crossval/curves.png",
    "plots/crossval/boxplot.png",
]


@pytest.fixture
def stage_outputs(tmp_path: Path, figures: dict[str, Path]) -> Path:
    root = tmp_path / "project"
    _write_stage_outputs(root, figures)
    return root


def test_read_inputs_reads_the_stage_outputs(stage_outputs: Path) -> None:
    inputs = read_inputs(stage_outputs)
    expected = _inputs({})
    np.testing.assert_array_equal(inputs.actual, ACTUAL)
    np.testing.assert_array_equal(inputs.predicted, PREDICTED)
    np.testing.assert_allclose(inputs.test_images * 255, expected.test_images, atol=1e-3)
    assert inputs.summary == expected.summary
    assert inputs.train_metrics == expected.train_metrics
    assert inputs.crossval_metrics == expected.crossval_metrics
    assert inputs.train_run == expected.train_run
    assert inputs.crossval_run == expected.crossval_run
    assert inputs.figures == {
        "samples": stage_outputs / "data/prepared/samples.png",
        "history": stage_outputs / "plots/train/history.png",
        "curves": stage_outputs / "plots/crossval/curves.png",
        "boxplot": stage_outputs / "plots/crossval/boxplot.png",
    }
    html_path, _ = build_report(inputs, stage_outputs / paths.REPORTS_DIR)
    assert len(EMBEDDED.findall(html_path.read_text(encoding="utf-8"))) == 6


def test_every_test_metric_in_train_json_is_reported(stage_outputs: Path) -> None:
    """A metric train adds (test_<name> in metrics/train.json) reaches both report files."""
    metrics_path = stage_outputs / paths.METRICS_DIR / "train.json"
    write_json(metrics_path, {**_inputs({}).train_metrics, "test_top2_accuracy": 0.9375})
    html_path, md_path = build_report(read_inputs(stage_outputs), stage_outputs / "reports")
    page = html_path.read_text(encoding="utf-8")
    markdown = md_path.read_text(encoding="utf-8")
    assert '<p class="big">test accuracy 0.7500 · loss 0.8765 · top2 accuracy 0.9375</p>' in page
    assert "**Test accuracy 0.7500**, loss 0.8765, top2 accuracy 0.9375" in markdown.splitlines()
    # under the Test result heading in both
    assert page.index("top2 accuracy") > page.index("<h2>Test result</h2>")
    assert markdown.index("top2 accuracy") > markdown.index("## Test result")


@pytest.mark.parametrize("missing", REQUIRED)
def test_missing_input_names_the_file_and_the_fix(stage_outputs: Path, missing: str) -> None:
    (stage_outputs / missing).unlink()
    with pytest.raises(DataError) as exc:
        read_inputs(stage_outputs)
    message = str(exc.value)
    assert str(stage_outputs / missing) in message
    assert "run the earlier stages" in message
    assert "dvc repro" in message


def test_report_stage_cli_fails_cleanly_without_inputs(tmp_path: Path) -> None:
    """`python -m pipeline.report` with nothing to report: one error line, no traceback."""
    done = run_module(
        "pipeline.report", "--config-dir", str(PROJECT_ROOT), "--config-name", "params",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "error: " in done.stderr
    assert "predictions.csv is missing" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / paths.REPORTS_DIR).exists()


# --------------------------------------------------------------------------- MLflow


def test_report_logs_both_files_to_the_train_run(
    stage_outputs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """report() builds the page from the stage outputs and attaches it to train's MLflow run."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    from pipeline.report import report

    monkeypatch.chdir(stage_outputs)
    uri = new_store(tmp_path_factory, stage_outputs)  # already migrated
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "report-test", artifact_location=(stage_outputs / "artifacts").as_uri()
    )
    run = client.create_run(experiment)
    train_run = {"run_id": run.info.run_id, "experiment_id": experiment, "tracking_uri": uri}
    write_json(
        stage_outputs / paths.RUNS_DIR / "train.json",
        {**train_run, "dataset_sha256": _summary()["sha256"], "config": _train_config()},
    )

    html_path = report(stage_outputs, stage_outputs / paths.REPORTS_DIR)

    assert html_path == stage_outputs / "reports" / "report.html"
    assert run.info.run_id in html_path.read_text(encoding="utf-8")
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "report"))
    assert logged == ["report/report.html", "report/report.md"]


# --------------------------------------------------------------------------- mixed-up inputs

OTHER_SHA = "cd" * 32


def _report_cli(root: Path) -> subprocess.CompletedProcess[str]:
    """The report stage as dvc.yaml runs it, on the digits outputs written under root."""
    return run_module(
        "pipeline.report", "--config-dir", str(PROJECT_ROOT), "--config-name", "params",
        "dataset.name=digits", cwd=root, timeout=120,
    )  # fmt: skip


def _edit_record(root: Path, stage: str, **changes: object) -> None:
    record = read_json(root / paths.RUNS_DIR / f"{stage}.json")
    write_json(root / paths.RUNS_DIR / f"{stage}.json", {**record, **changes})


def _refused(done: subprocess.CompletedProcess[str], root: Path) -> str:
    """The one error line of a report that refused before writing anything."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error: " in line]
    assert not (root / paths.REPORTS_DIR).exists()
    return line


@pytest.mark.parametrize("stage", ["train", "crossval"])
def test_report_refuses_a_run_on_other_data(stage_outputs: Path, stage: str) -> None:
    """Train (or crossval) ran on digits, then MNIST was prepared: the report would title MNIST
    with digits' numbers and log itself to the digits run."""
    _edit_record(stage_outputs, stage, dataset_sha256=OTHER_SHA)
    line = _refused(_report_cli(stage_outputs), stage_outputs)
    assert f"runs/{stage}.json" in line
    assert OTHER_SHA[:16] in line and "ab" * 8 in line  # both data, by their sha256
    assert "data/prepared/summary.json" in line
    assert "dvc repro" in line and f"pipeline.{stage}" in line


def test_report_refuses_a_run_record_that_names_no_data(stage_outputs: Path) -> None:
    """A record of an older version, without the prepared data's sha256, cannot be checked."""
    record = read_json(stage_outputs / paths.RUNS_DIR / "train.json")
    del record["dataset_sha256"]
    write_json(stage_outputs / paths.RUNS_DIR / "train.json", record)
    line = _refused(_report_cli(stage_outputs), stage_outputs)
    assert "runs/train.json" in line and "names no prepared data" in line
    assert "dvc repro" in line


def test_report_refuses_predictions_of_another_test_split(stage_outputs: Path) -> None:
    csv_path = stage_outputs / paths.PLOTS_DIR / "train" / "predictions.csv"
    rows = csv_path.read_text(encoding="utf-8").splitlines()
    csv_path.write_text("\n".join(rows[:-2]) + "\n", encoding="utf-8")  # 10 of 12
    line = _refused(_report_cli(stage_outputs), stage_outputs)
    assert "predictions.csv has 10 rows" in line and "test split has 12 images" in line
    assert "dvc repro" in line and "pipeline.train" in line


def test_report_warns_when_crossval_ran_another_config(
    stage_outputs: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Same data, other settings: both results are right for what each ran, so the report is
    made, with a warning line that names the settings that differ."""
    from mlflow import MlflowClient

    uri = new_store(tmp_path_factory, stage_outputs)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "report-test", artifact_location=(stage_outputs / "artifacts").as_uri()
    )
    run_id = client.create_run(experiment).info.run_id
    _edit_record(stage_outputs, "train", run_id=run_id, tracking_uri=uri)
    other = _train_config()
    other["width"], other["model"]["depth"], other["folds"] = 64, 2, 3
    _edit_record(stage_outputs, "crossval", config=other)

    done = _report_cli(stage_outputs)

    assert done.returncode == 0, done.stderr
    warning = (
        "cross-validation ran another config than train: "
        "model.depth 2 (train 1), width 64 (train 48);"
    )
    assert f"WARNING] - {warning}" in done.stdout  # the log line
    for name in ("report.html", "report.md"):
        text = (stage_outputs / paths.REPORTS_DIR / name).read_text(encoding="utf-8")
        assert warning in text, name
        assert "folds" not in text.split(warning)[1].split("\n")[0]  # crossval's own setting


# --------------------------------------------------------------------------- store failures


def _saved_but_not_logged(done: subprocess.CompletedProcess[str], root: Path) -> str:
    """The one error line of a report that was written but could not be logged."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error: " in line]
    for name in ("report.html", "report.md"):
        assert (root / paths.REPORTS_DIR / name).stat().st_size > 0
    assert "reports/report.html" in line and "re-run the report" in line
    return line


def test_report_to_a_missing_store_saves_the_report_and_creates_no_store(
    stage_outputs: Path, tmp_path: Path
) -> None:
    """MlflowClient would create an empty store there and fail on the unknown run."""
    missing = tmp_path / "gone" / "mlflow.db"
    missing.parent.mkdir()
    _edit_record(stage_outputs, "train", tracking_uri=f"sqlite:///{missing}")
    line = _saved_but_not_logged(_report_cli(stage_outputs), stage_outputs)
    assert f"MLflow store sqlite:///{missing} does not exist" in line
    assert not missing.exists()


def test_report_to_an_unreachable_server_fails_within_seconds(
    stage_outputs: Path, closed_port: int
) -> None:
    """Not MLflow's urllib3 retries (over 90 s)."""
    uri = f"http://127.0.0.1:{closed_port}"
    _edit_record(stage_outputs, "train", tracking_uri=uri)
    started = time.monotonic()
    done = _report_cli(stage_outputs)
    assert time.monotonic() - started < 45  # the command's start-up included
    line = _saved_but_not_logged(done, stage_outputs)
    assert f"MLflow tracking server {uri} is unreachable" in line


# --------------------------------------------------------------------------- a full disk


def test_disk_full_during_the_report_keeps_the_previous_report(
    stage_outputs: Path, tmp_path: Path
) -> None:
    """The disk fills after the two figures, before report.html (which embeds all six): the
    previous reports/ stays whole (the old code left the new figures beside the old pages)."""
    with full_disk(tmp_path / "disk", "2m") as disk:
        root = disk / "project"
        shutil.copytree(stage_outputs, root)
        reports = root / paths.REPORTS_DIR
        reports.mkdir()
        for name in ("report.html", "report.md", "confusion.png", "misclassified.png"):
            (reports / name).write_text(f"previous {name}", encoding="utf-8")
        previous = files_under(root, "reports")
        fill(disk, leave=64 * 1024)  # the figures (~30 kB) fit, report.html (~150 kB) does not
        done = run_module(
            "pipeline.report", "--config-dir", str(PROJECT_ROOT), "--config-name", "params",
            "dataset.name=digits", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=root, timeout=120,
        )  # fmt: skip

        assert done.returncode == 1, done.stdout + done.stderr
        [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith("error: no space left on the device"), line
        assert "the previous outputs (reports) are kept as they were" in line
        assert files_under(root, "reports") == previous
        assert staging_folders(root) == []
