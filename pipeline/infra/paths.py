"""Where every stage reads and writes, relative to the project root (the working directory).

Paths are fixed here, not in params: DVC re-runs a stage whenever a param it depends on changes,
and an output path is not something that should trigger that (iterative/dvc#9731).
"""

from pathlib import Path

RAW_DIR = Path("data/raw")  # fetch: data/raw/<dataset>/<IDX .gz files>
PREPARED_DIR = Path("data/prepared")  # preprocess: train.npz, test.npz, summary.json, samples.png
MODELS_DIR = Path("models")  # train: model.keras
METRICS_DIR = Path("metrics")  # train.json, crossval.json (dvc metrics)
PLOTS_DIR = Path("plots")  # history CSVs and figures (dvc plots)
RUNS_DIR = Path("runs")  # which MLflow run produced the outputs
REPORTS_DIR = Path("reports")  # report.html, report.md
COMPARE_DIR = Path("compare")  # pipeline.compare's tables (not a DVC output: kept out of reports/)

# Not under the working directory: the conf/ beside the package (the stages' Hydra config_path).
# Absolute on purpose: Hydra resolves a relative config_path against the calling module, which
# for an installed command (`digit-train`) is the package pipeline.train, not a file, and finds
# no conf/ there.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# train's and crossval's outputs, relative to the output root (dvc.yaml's outs and metrics;
# tests/test_params.py checks it), each stage's replaced as one set (files.replaced_together).
TRAIN_OUTPUTS = (
    MODELS_DIR / "model.keras",
    PLOTS_DIR / "train",
    RUNS_DIR / "train.json",
    METRICS_DIR / "train.json",
)
CROSSVAL_OUTPUTS = (
    PLOTS_DIR / "crossval",
    RUNS_DIR / "crossval.json",
    METRICS_DIR / "crossval.json",
)
