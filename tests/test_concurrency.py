"""Concurrency in one workspace: one run of a stage at a time, and sweeps that never share a folder.

A second `python -m pipeline.train` while one runs would write models/model.keras,
metrics/train.json and runs/train.json beside the first, leaving one run's model with the other's
metrics. The interleaving is forced, not timed: the test holds the train stage's workspace lock
(what a running train holds) and starts a real train process. Two sweeps started in the same
second used to share multirun/<date>/<time> and its `sweep` tag; here both are given the same
folder name (the same timestamp, forced), and each must still get its own folder and tag. Real
processes, a real sqlite store, the digits data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from run_helpers import (
    assert_one_line_error,
    compose,
    prepared_digits,
    project_copy,
    run_module,
    runs,
    sqlite_uri,
)

TRAIN_OUTPUTS = ("models/model.keras", "metrics/train.json", "runs/train.json")


def _hold_stage_lock(project: Path, stage: str):
    """The lock a running `stage` holds in the workspace `project` (stage.one_run_at_a_time)."""
    from filelock import FileLock

    (project / ".locks").mkdir(exist_ok=True)
    return FileLock(project / ".locks" / f"{stage}.lock")


def _fingerprint(project: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((project / name).read_bytes()).hexdigest() for name in TRAIN_OUTPUTS
    }


def _train(project: Path, *args: str):
    return run_module("pipeline.train", "debug=fast", *args, cwd=project)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("concurrency"))


def test_a_second_train_in_one_workspace_refuses_and_outputs_stay_one_runs(project: Path):
    first = _train(project, "width=16")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (project / "multirun").exists(), "a single run claimed a sweep folder"
    before, store = _fingerprint(project), sqlite_uri(project / "mlflow.db")
    runs_before = len(runs(store))

    with _hold_stage_lock(project, "train"):  # a train run in progress in this workspace
        second = _train(project, "width=24")
    line = assert_one_line_error(second, "another train run", "this workspace", "Fix: ")
    assert "dvc exp run --queue" in line and "-m" in line
    assert _fingerprint(project) == before, "the refused run touched the first run's outputs"
    assert len(runs(store)) == runs_before, "the refused run started an MLflow run"

    third = _train(project, "width=24")  # the lock is free again: it runs
    assert third.returncode == 0, third.stderr[-3000:]
    record = json.loads((project / "runs" / "train.json").read_text(encoding="utf-8"))
    metrics = json.loads((project / "metrics" / "train.json").read_text(encoding="utf-8"))
    [run] = [r for r in runs(store) if r.info.run_id == record["run_id"]]
    assert run.data.params["width"] == "24" and record["config"]["width"] == 24
    assert metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])

    import keras

    model = keras.models.load_model(project / "models" / "model.keras")
    assert next(layer.units for layer in model.layers if hasattr(layer, "units")) == 24


def test_the_default_sweep_folder_is_claimed_uniquely():
    """conf/config.yaml's sweep folder goes through the claiming resolver, so the default
    (multirun/<date>/<time>) is unique, not only the tests' forced names."""
    cfg = compose(return_hydra_config=True)
    raw = cfg.hydra.sweep._get_node("dir")._value()
    assert raw.startswith("${unique_dir:multirun/${now:"), raw


def test_two_sweeps_with_the_same_folder_name_stay_apart(project: Path):
    """Both sweeps are given the same folder name (as two started in the same second get); the
    first runs its two jobs in parallel (joblib), while a single train holds the workspace lock:
    sweep jobs write into their own folders and are not serialised by it."""
    base = project / "multirun" / "same-second"
    store = sqlite_uri(project / "sweeps.db")
    common = ("debug=fast", f"tracking.uri={store}", f"hydra.sweep.dir=${{unique_dir:{base}}}")
    with _hold_stage_lock(project, "train"):
        first = run_module(
            "pipeline.train",
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "width=16,24",
            *common,
            cwd=project,
        )
        assert first.returncode == 0, first.stderr[-3000:]
        second = run_module("pipeline.train", "-m", "width=8", *common, cwd=project)
        assert second.returncode == 0, second.stderr[-3000:]

    tags = {}
    for run in runs(store):
        tags.setdefault(run.data.tags["sweep"], []).append(run.data.params["width"])
    assert sorted(tags) == [str(base), f"{base}_2"], tags
    assert sorted(p.name for p in base.parent.iterdir()) == [base.name, f"{base.name}_2"]
    assert sorted(tags[str(base)]) == ["16", "24"] and tags[f"{base}_2"] == ["8"]
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["0", "1"]
    assert [p.name for p in Path(f"{base}_2").iterdir() if p.is_dir()] == ["0"]
    assert (Path(f"{base}_2") / "0" / "metrics" / "train.json").is_file()
