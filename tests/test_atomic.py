"""A stage's outputs are replaced as one set, and a new MLflow store appears whole (issue #16).

Everything is real: a full disk is a tmpfs filled with a file, a failing output folder is a
read-only bind mount, a kill is SIGKILL, stores are real sqlite files migrated by MLflow. The
mounts need root; the tests that need one skip with the reason elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from run_helpers import (
    STYLES,
    TrainedDigits,
    cli_env,
    compose,
    files_under,
    fill,
    full_disk,
    isolated_mlflow,
    new_store,
    prepared_digits,
    project_copy,
    read_only,
    render,
    run_module,
    sqlite_uri,
    temp_files,
)

from pipeline.infra.errors import ModelError, TrackingError
from pipeline.infra.files import file_sha256, read_json, staging_folders, write_json

TRAIN_OUTPUTS = ("models/model.keras", "plots/train", "runs/train.json", "metrics/train.json")
TRAIN_FILES = (
    "models/model.keras",
    "plots/train/history.csv",
    "plots/train/history.png",
    "plots/train/predictions.csv",
    "runs/train.json",
    "metrics/train.json",
)
KEPT = "are kept as they were, none of the new ones"


def _previous_train_outputs(root: Path) -> dict[str, bytes]:
    """Stand-ins for the previous run's train outputs, each file saying what it is."""
    for name in TRAIN_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(f"previous {name}".encode())
    return files_under(root, *TRAIN_OUTPUTS)


def _error_line(stderr: str) -> str:
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr, stderr
    return line


# =========================================================================== outputs as one set


def test_disk_full_during_train_keeps_the_previous_outputs(tmp_path, tmp_path_factory):
    """The disk fills after the new model is written, before the figures: every train output
    stays the previous one (the old code had the new model beside the old metrics and record)."""
    with full_disk(tmp_path / "disk", "2m") as disk:
        root = project_copy(prepared_digits(tmp_path_factory), disk)
        previous = _previous_train_outputs(root)
        uri = new_store(tmp_path_factory, tmp_path / "store")
        # The model (~41 kB for debug=fast) fits, history.png (~23 kB) after it does not.
        fill(disk, leave=48 * 1024)
        done = run_module(
            "pipeline.train", "debug=fast", f"tracking.uri={uri}",
            f"hydra.run.dir={tmp_path / 'hydra'}", cwd=root,
        )  # fmt: skip

        assert done.returncode == 1, done.stdout + done.stderr
        assert files_under(root, *TRAIN_OUTPUTS) == previous
        line = _error_line(done.stderr)
        assert line.startswith("error: no space left on the device"), line
        assert f"the previous outputs ({', '.join(TRAIN_OUTPUTS)}) {KEPT}" in line
        assert staging_folders(root) == [] and temp_files(root) == []


def test_a_failure_between_two_outputs_keeps_the_previous_ones(tmp_path, tmp_path_factory):
    """metrics/ is read-only (even to root: a read-only bind mount), so the last of train's
    outputs cannot be moved in after the first three were: they are moved back, all previous.
    Once it is writable, a run replaces all four and records its model's SHA-256."""
    from pipeline.infra.stage import run_stage
    from pipeline.train import train

    prepared = prepared_digits(tmp_path_factory)
    root = tmp_path / "project"
    previous = _previous_train_outputs(root)
    uri = new_store(tmp_path_factory, tmp_path / "store")
    cfg = compose("debug=fast", f"tracking.uri={uri}")
    with isolated_mlflow(root, uri):
        with read_only(root / "metrics"), pytest.raises(SystemExit) as raised:
            run_stage(cfg, lambda settings: train(settings, prepared, root))
        message = str(raised.value.code)
        assert files_under(root, *TRAIN_OUTPUTS) == previous
        assert message.startswith("error: could not move the new metrics/train.json into place")
        assert message.endswith(f"the previous outputs ({', '.join(TRAIN_OUTPUTS)}) {KEPT}")
        assert "\n" not in message
        assert staging_folders(root) == [] and temp_files(root) == []

        run_stage(cfg, lambda settings: train(settings, prepared, root))
    replaced = files_under(root, *TRAIN_OUTPUTS)
    assert sorted(replaced) == sorted(TRAIN_FILES)
    assert all(replaced[name] != previous[name] for name in TRAIN_FILES)
    record = read_json(root / "runs" / "train.json")
    assert record["model_sha256"] == file_sha256(root / "models" / "model.keras")
    assert staging_folders(root) == []


# The child replaces a.txt and the folder d as one set, and is SIGKILLed at its n-th rename: 1
# is the journal's, 2-5 move the previous a.txt aside, the new one in, then the same for d.
_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from pipeline.infra.files import replaced_together

    root, kill_at, renames = Path(sys.argv[1]), int(sys.argv[2]), []
    rename = os.replace

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(src, dst)

    os.replace = replace
    with replaced_together(root, [Path("a.txt"), Path("d")]) as staged:
        (staged / "a.txt").write_text("new a")
        (staged / "d").mkdir()
        (staged / "d" / "b.txt").write_text("new b")
    """
)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5, 6], ids=lambda n: f"rename{n}")
def test_a_kill_while_outputs_are_replaced_leaves_one_set(kill_at, tmp_path):
    """kill -9 at each rename of a replacement, then the next stage start's repair: all
    previous if the journal was not yet in place, else all new (6: never killed)."""
    from pipeline.infra.reconcile import remove_stale_temp_files

    (tmp_path / "d").mkdir()
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "d" / "b.txt").write_text("old b")
    (tmp_path / "d" / "c.txt").write_text("old c")  # a file the new set does not have
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path), str(kill_at)],
        env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == (-9 if kill_at <= 5 else 0), done.stderr
    assert len(staging_folders(tmp_path)) == (1 if kill_at <= 5 else 0)

    remove_stale_temp_files(tmp_path)

    found = files_under(tmp_path, "a.txt", "d")
    if kill_at == 1:
        assert found == {"a.txt": b"old a", "d/b.txt": b"old b", "d/c.txt": b"old c"}
    else:
        assert found == {"a.txt": b"new a", "d/b.txt": b"new b"}
    assert staging_folders(tmp_path) == []


def test_predict_and_registry_refuse_a_model_of_another_run(
    trained_digits: TrainedDigits, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    """models/model.keras and runs/train.json of different runs: predict would use one model
    and registry register the other. Both refuse in one line naming the fix."""
    from pipeline import predict, registry

    for folder in ("models", "runs"):
        shutil.copytree(trained_digits.root / folder, tmp_path / folder)
    image = render(trained_digits.test_images[0], STYLES[0], tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    [result] = predict.predict_files([image])  # the recorded run's model: used
    assert isinstance(result, predict.Prediction)

    record = read_json(tmp_path / "runs" / "train.json")
    write_json(tmp_path / "runs" / "train.json", {**record, "model_sha256": "ab" * 32})
    with pytest.raises(ModelError) as raised:
        predict.predict_files([image])
    message = str(raised.value)
    assert message.startswith("models/model.keras is not the model of the run in runs/train.json")
    assert "`dvc repro`" in message and "dvc checkout" in message and "\n" not in message

    assert registry.main(["--tracking-uri", new_store(tmp_path_factory, tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


# =========================================================================== the store


def test_a_store_created_on_a_full_disk_is_usable_once_space_is_freed(tmp_path):
    """A fully migrated store is ~1 MB: on a disk with 256 kB free its creation fails in one
    line and leaves nothing at mlflow.db (the old code left it half migrated, and every later
    start failed with "table ... already exists"); with the space freed, it is created."""
    from pipeline.infra.tracking import _open_store

    with full_disk(tmp_path / "disk", "2m") as disk:
        db = disk / "mlflow.db"
        filler = fill(disk, leave=256 * 1024)
        with pytest.raises(TrackingError) as raised:
            _open_store(sqlite_uri(db), "full-disk")
        message = str(raised.value)
        assert message.startswith(f"cannot create MLflow store {sqlite_uri(db)}"), message
        assert "full" in message and "\n" not in message
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "mlflow.db.lock"]

        filler.unlink()
        experiment = _open_store(sqlite_uri(db), "full-disk")
        import mlflow

        client = mlflow.MlflowClient(sqlite_uri(db))
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id, "FINISHED")
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        assert sorted(p.name for p in disk.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


def test_a_half_migrated_store_is_named_with_its_fix(tmp_path):
    """The store an older version (or `mlflow` itself) left half migrated on a full disk: one
    line naming the file and what to do, instead of "table ... already exists"."""
    from pipeline.infra.tracking import _open_store

    with full_disk(tmp_path / "disk", "2m") as disk:
        db = disk / "mlflow.db"
        filler = fill(disk, leave=256 * 1024)
        made = subprocess.run(
            [sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({sqlite_uri(db)!r})"
             ".search_experiments()"],
            env=cli_env(), capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert made.returncode == 1 and "full" in made.stderr, made.stderr
        filler.unlink()
        shutil.copyfile(db, tmp_path / "mlflow.db")
    db = tmp_path / "mlflow.db"

    with pytest.raises(TrackingError) as raised:
        _open_store(sqlite_uri(db), "half-migrated")
    message = str(raised.value)
    assert message.startswith(f"MLflow store {db} was not completely created"), message
    assert f"Fix: delete {db}" in message and "\n" not in message
