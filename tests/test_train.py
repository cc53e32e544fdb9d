"""The train stage on the real digits data: what it logs to a real sqlite MLflow store (read back
through MlflowClient), the model it logs and saves, its local outputs, reproducibility, and
how a failing run ends."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_helpers import (
    assert_png,
    client,
    download,
    history,
    isolated_mlflow,
    new_store,
    prepared_digits,
    project_copy,
    run_module,
    runs,
    settings,
    sqlite_uri,
)

EPOCHS = 3
BATCH_SIZE = 32
WIDTH = 32  # the test-size preset's
TINY = ("debug=fast", f"batch_size={BATCH_SIZE}")


@dataclass
class Trained:
    uri: str
    run: Any  # mlflow.entities.Run, as read back from the store
    metrics: dict[str, float]  # what train() returned
    out: Path  # out_root
    commit: str | None  # HEAD of the git repository the run was started in (None: no git)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def git_repo(path: Path) -> str | None:
    """Make `path` a git repository with one commit; return its hash (None if git is missing)."""
    if shutil.which("git") is None:
        return None
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *identity, "-c", "commit.gpgsign=false", *args],
            cwd=path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "test")
    return git("rev-parse", "HEAD")


def train_in(root: Path, prepared: Path, uri: str, *overrides: str, out: Path | None = None):
    from pipeline.train import train

    cfg = settings(*TINY, f"tracking.uri={uri}", *overrides)
    with isolated_mlflow(root):
        return train(cfg, prepared, out if out is not None else root / "out")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_digits(tmp_path_factory)


@pytest.fixture(scope="module")
def test_split(prepared: Path):
    from pipeline.core.data import load_split

    return load_split(prepared / "test.npz")


@pytest.fixture(scope="module")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One train run, started inside a git repository, on a store the pipeline creates itself."""
    root = tmp_path_factory.mktemp("train")
    commit = git_repo(root)
    uri = sqlite_uri(root / "mlflow.db")
    metrics = train_in(root, prepared, uri, f"epochs={EPOCHS}")
    found = runs(uri)
    assert len(found) == 1, f"expected one run, found {len(found)}"
    return Trained(uri=uri, run=found[0], metrics=metrics, out=root / "out", commit=commit)


# --------------------------------------------------------------------------- the MLflow run


def test_run_finished_with_the_configured_params(trained: Trained):
    info, params = trained.run.info, trained.run.data.params
    assert info.status == "FINISHED"
    assert info.end_time is not None and info.end_time >= info.start_time
    assert params["epochs"] == str(EPOCHS)
    assert params["batch_size"] == str(BATCH_SIZE)
    assert params["width"] == str(WIDTH)
    assert params["model.name"] == "mlp"
    assert params["dataset.name"] == "digits"


def test_loss_and_accuracy_are_logged_once_per_epoch(trained: Trained):
    run_id = trained.run.info.run_id
    steps = list(range(1, EPOCHS + 1))
    loss, accuracy = (
        history(trained.uri, run_id, "train_loss"),
        history(trained.uri, run_id, "train_accuracy"),
    )
    assert [step for step, _ in loss] == steps
    assert [step for step, _ in accuracy] == steps
    values = [v for _, v in loss]
    assert values[-1] < values[0], f"loss did not go down: {values}"
    # The last epoch's values are what train.json reports for the training set.
    assert values[-1] == pytest.approx(trained.metrics["train_loss"])
    assert accuracy[-1][1] == pytest.approx(trained.metrics["train_accuracy"])
    # No validation split configured: no validation curves.
    assert not any(k.startswith("val_") for k in trained.run.data.metrics)


def test_test_accuracy_is_logged_equals_train_json_and_beats_chance(trained: Trained):
    written = json.loads((trained.out / "metrics" / "train.json").read_text())
    logged = trained.run.data.metrics
    assert logged["test_accuracy"] == pytest.approx(written["test_accuracy"], abs=1e-9)
    assert logged["test_loss"] == pytest.approx(written["test_loss"], abs=1e-9)
    assert written == pytest.approx(trained.metrics)
    # Chance is 0.1; this tiny MLP reaches ~0.7 after 3 epochs (0.5 with batch_size=128).
    assert written["test_accuracy"] > 0.5


def test_run_is_tagged_with_the_commit_it_was_started_from(trained: Trained):
    if trained.commit is None:
        pytest.skip("git is not installed")
    assert trained.run.data.tags["git_commit"] == trained.commit


def test_run_is_tagged_with_dataset_hash_and_stage(trained: Trained, prepared: Path):
    tags = trained.run.data.tags
    summary = json.loads((prepared / "summary.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", summary["sha256"])
    assert tags["dataset_sha256"] == summary["sha256"]
    assert tags["stage"] == "train"
    assert tags["dataset"] == "digits"


def test_logged_model_predicts_class_probabilities(trained: Trained, test_split, tmp_path):
    import mlflow

    with isolated_mlflow(tmp_path, trained.uri):
        model = mlflow.pyfunc.load_model(f"runs:/{trained.run.info.run_id}/model")
    probabilities = np.asarray(model.predict(test_split.x))
    assert probabilities.shape == (len(test_split.x), 10)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == test_split.labels))
    assert accuracy == pytest.approx(trained.metrics["test_accuracy"], abs=1e-6)


def test_plots_are_logged_as_artifacts(trained: Trained, tmp_path: Path):
    run_id = trained.run.info.run_id
    listed = {a.path for a in client(trained.uri).list_artifacts(run_id, "plots")}
    assert {"plots/history.png", "plots/history.csv", "plots/predictions.csv"} <= listed
    assert_png(download(trained.uri, run_id, "plots/history.png", tmp_path))
    local = trained.out / "plots" / "train"
    for name in ("history.csv", "predictions.csv"):
        fetched = download(trained.uri, run_id, f"plots/{name}", tmp_path)
        assert fetched.read_bytes() == (local / name).read_bytes()


# --------------------------------------------------------------------------- local outputs


def test_saved_model_loads_and_scores_the_logged_test_accuracy(trained: Trained, test_split):
    import keras

    model = keras.saving.load_model(trained.out / "models" / "model.keras")
    _, accuracy = model.evaluate(test_split.x, test_split.y, verbose=0)
    assert accuracy == pytest.approx(trained.run.data.metrics["test_accuracy"], abs=1e-6)
    assert not list((trained.out / "models").glob(".*tmp*")), "a temporary file was left behind"


def test_history_csv_has_one_row_per_epoch(trained: Trained):
    rows = read_csv(trained.out / "plots" / "train" / "history.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    logged = [v for _, v in history(trained.uri, trained.run.info.run_id, "train_loss")]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(logged)
    assert_png(trained.out / "plots" / "train" / "history.png")


def test_predictions_csv_holds_every_test_image(trained: Trained, test_split):
    rows = read_csv(trained.out / "plots" / "train" / "predictions.csv")
    actual = np.array([int(r["actual"]) for r in rows])
    predicted = np.array([int(r["predicted"]) for r in rows])
    np.testing.assert_array_equal(actual, test_split.labels)
    assert set(predicted) <= set(range(10))
    assert np.mean(actual == predicted) == pytest.approx(trained.metrics["test_accuracy"], abs=1e-6)


def test_evaluate_matches_keras_loss_and_accuracy(trained: Trained, test_split):
    """The test metrics train.json holds are the ones Keras computes for the same model."""
    import keras

    from pipeline.core.metrics import evaluate

    model = keras.saving.load_model(trained.out / "models" / "model.keras")
    probabilities = model.predict(test_split.x, verbose=0)
    ours = evaluate(test_split.labels, probabilities)
    loss, accuracy = model.evaluate(test_split.x, test_split.y, verbose=0)
    assert ours["loss"] == pytest.approx(loss, rel=1e-5)
    assert ours["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert {f"test_{k}": v for k, v in ours.items()} == pytest.approx(
        {k: v for k, v in trained.metrics.items() if k.startswith("test_")}, rel=1e-6
    )
    # Keras clips to [1e-7, 1 - 1e-7] before the log: a certain wrong answer costs -log(1e-7).
    labels = np.array([1, 3])
    certain = np.eye(10, dtype=np.float32)[[1, 2]]
    keras_loss = keras.losses.categorical_crossentropy(np.eye(10)[labels], certain)
    assert evaluate(labels, certain)["loss"] == pytest.approx(float(np.mean(keras_loss)), rel=1e-6)


def test_run_record_points_at_the_run(trained: Trained, prepared: Path):
    record = json.loads((trained.out / "runs" / "train.json").read_text())
    summary = json.loads((prepared / "summary.json").read_text())
    assert record["dataset_sha256"] == summary["sha256"]  # the report refuses other data
    assert record["run_id"] == trained.run.info.run_id
    assert record["experiment_id"] == trained.run.info.experiment_id
    assert record["tracking_uri"] == trained.uri
    assert record["config"]["epochs"] == EPOCHS
    assert record["config"]["model"]["name"] == "mlp"


def test_timing_is_in_the_run_record_and_mlflow_not_in_the_metrics(trained: Trained):
    """How long a fit took defines no result: it is not a DVC metric (it would crowd `dvc exp
    show` and make every `dvc metrics diff` differ), but the run record and MLflow keep it."""
    written = json.loads((trained.out / "metrics" / "train.json").read_text())
    assert not {"fit_seconds", "seconds_per_epoch"} & set(written)
    timing = json.loads((trained.out / "runs" / "train.json").read_text())["timing"]
    assert timing["fit_seconds"] > 0
    assert timing["seconds_per_epoch"] == pytest.approx(timing["fit_seconds"] / EPOCHS)
    logged = trained.run.data.metrics
    assert logged["fit_seconds"] == pytest.approx(timing["fit_seconds"])
    assert logged["seconds_per_epoch"] == pytest.approx(timing["seconds_per_epoch"])


# --------------------------------------------------------------------------- other configs


def test_validation_split_logs_validation_histories(prepared, tmp_path, tmp_path_factory):
    uri = new_store(tmp_path_factory, tmp_path)
    metrics = train_in(tmp_path, prepared, uri, "epochs=2", "validation_split=0.2")
    [run] = runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["validation_split"] == "0.2"
    for key in ("val_loss", "val_accuracy"):
        points = history(uri, run.info.run_id, key)
        assert [step for step, _ in points] == [1, 2]
        assert points[-1][1] == pytest.approx(metrics[key])
    rows = read_csv(tmp_path / "out" / "plots" / "train" / "history.csv")
    assert len(rows) == 2
    assert {"val_loss", "val_accuracy"} <= set(rows[0])


def test_cnn_trains_on_8x8_digits(prepared, tmp_path, tmp_path_factory, test_split):
    import keras

    uri = new_store(tmp_path_factory, tmp_path)
    metrics = train_in(tmp_path, prepared, uri, "model=cnn", "epochs=2", "width=16")
    [run] = runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "cnn"
    model = keras.saving.load_model(tmp_path / "out" / "models" / "model.keras")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.filters for layer in convs] == [32, 64]  # conf/model/cnn.yaml
    assert model.input_shape == (None, 64)
    assert model.predict(test_split.x[:3], verbose=0).shape == (3, 10)
    assert metrics["test_accuracy"] > 0.5  # chance is 0.1; it reaches ~0.75


def test_lenet5_trains_on_8x8_digits(prepared, tmp_path, tmp_path_factory, test_split):
    """model=lenet5 (conf/model/lenet5.yaml) through Hydra's composition of conf/."""
    import keras

    uri = new_store(tmp_path_factory, tmp_path)
    metrics = train_in(tmp_path, prepared, uri, "model=lenet5", "epochs=3")
    [run] = runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "lenet5"
    model = keras.saving.load_model(tmp_path / "out" / "models" / "model.keras")
    layers = model.layers
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert sum(isinstance(layer, keras.layers.AveragePooling2D) for layer in layers) == 2
    dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [120, 84, 10]  # width=32 does not change the head
    assert {c.activation.__name__ for c in convs + dense[:-1]} == {"tanh"}
    assert model.input_shape == (None, 64)
    assert model.predict(test_split.x[:3], verbose=0).shape == (3, 10)
    assert metrics["test_accuracy"] > 0.5  # chance is 0.1


@pytest.mark.slow
def test_lenet5_trains_through_the_dvc_stage_command(prepared, tmp_path, tmp_path_factory):
    """dvc.yaml's train command on a params.yaml that DVC's own composition wrote for
    model=lenet5, as `dvc exp run -S model=lenet5` would."""
    from pipeline.params import compose_params

    project = project_copy(prepared, tmp_path / "project")
    uri = new_store(tmp_path_factory, project)
    overrides = [*TINY, "model=lenet5", "epochs=2"]
    params = compose_params([*overrides, f"tracking.uri={uri}"])
    (project / "params.yaml").write_text(params, encoding="utf-8")
    result = run_module(
        "pipeline.train", "--config-dir", ".", "--config-name", "params", cwd=project
    )
    assert result.returncode == 0, result.stderr
    [run] = runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "lenet5"
    assert run.data.params["model.filters"] == "[6, 16]"
    written = json.loads((project / "metrics" / "train.json").read_text())
    assert written["test_accuracy"] > 0.5
    assert (project / "models" / "model.keras").is_file()


# --------------------------------------------------------------------------- reproducibility


@pytest.fixture(scope="module")
def seeded_runs(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three deterministic runs in one process and one store: seed 7 twice, then seed 8."""
    root = tmp_path_factory.mktemp("seeded")
    uri = new_store(tmp_path_factory, root)
    results = {}
    for name, seed in (("first", 7), ("again", 7), ("other", 8)):
        metrics = train_in(
            root, prepared, uri, "epochs=2", f"seed={seed}", "deterministic=true", out=root / name
        )
        results[name] = metrics
    found = runs(uri)
    assert [r.data.params["seed"] for r in found] == ["7", "7", "8"]
    return {
        "uri": uri,
        "runs": dict(zip(("first", "again", "other"), found, strict=True)),
        "metrics": results,
        "root": root,
    }


def test_same_seed_reproduces_the_run_exactly(seeded_runs):
    uri, first, again = seeded_runs["uri"], *(seeded_runs["runs"][k] for k in ("first", "again"))
    assert first.info.run_id != again.info.run_id
    losses = [history(uri, run.info.run_id, "train_loss") for run in (first, again)]
    assert losses[0] == losses[1]
    assert first.data.metrics["test_accuracy"] == again.data.metrics["test_accuracy"]
    assert first.data.metrics["test_loss"] == again.data.metrics["test_loss"]
    first_csv, again_csv = (
        seeded_runs["root"] / name / "plots" / "train" / "predictions.csv"
        for name in ("first", "again")
    )
    assert first_csv.read_bytes() == again_csv.read_bytes()


def test_a_different_seed_gives_a_different_run(seeded_runs):
    uri, first, other = seeded_runs["uri"], *(seeded_runs["runs"][k] for k in ("first", "other"))
    losses = [history(uri, run.info.run_id, "train_loss") for run in (first, other)]
    assert losses[0] != losses[1]


# --------------------------------------------------------------------------- failures


def test_unknown_optimizer_fails_before_any_run_is_started(prepared, tmp_path, tmp_path_factory):
    from pipeline.infra.errors import ConfigError

    uri = new_store(tmp_path_factory, tmp_path)
    with pytest.raises(ConfigError, match=r"model\.optimizer='nonsense'"):
        train_in(tmp_path, prepared, uri, "model.optimizer=nonsense")
    assert runs(uri) == [], "a run was started although the config was invalid"
    assert not (tmp_path / "out").exists()


def test_an_error_inside_the_run_ends_it_failed(prepared, tmp_path, tmp_path_factory):
    import mlflow

    uri = new_store(tmp_path_factory, tmp_path)
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(OSError):
        train_in(tmp_path, prepared, uri, out=blocker)  # the preset's one epoch
    assert mlflow.active_run() is None
    [run] = runs(uri)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    # It failed after fitting (writing the outputs), i.e. inside the run.
    assert [step for step, _ in history(uri, run.info.run_id, "train_loss")] == [1]
