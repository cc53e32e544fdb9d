"""Hardening: every bad input and fault gives one clear message and loses nothing.

The cases the other modules do not cover (docs/RELIABILITY.md has the whole table): a full disk
while fetching and while a stage writes, Ctrl-C / SIGTERM during a download, an unknown config
group option, folds larger than the training set, a model too large for memory, more mistyped
keys, a locked or deleted MLflow store, a tracking server that dies mid-run, and a static check
that every file the pipeline writes goes through pipeline.infra.files.atomic_path.

Each test asserts what the user sees and the state afterwards (no file at the final path, no
temporary `.*.tmp*` file, the MLflow run status). Everything is real: a local HTTP server on
127.0.0.1, real sqlite stores, a real `mlflow server`, the stage CLIs as subprocesses. Only the
lowest-level file write is patched, to simulate a full disk.
"""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from run_helpers import (
    EXPERIMENT,
    PROJECT_ROOT,
    assert_one_line_error,
    cli_env,
    client,
    compose,
    fill_up,
    free_port,
    full_disk,
    isolated_mlflow,
    names_key,
    new_store,
    prepared_digits,
    project_copy,
    reaped,
    run_module,
    runs,
    settings,
    start_cli,
    temp_files,
)

from pipeline.infra.config import DatasetConfig, validate
from pipeline.infra.download import fetch_file, source_url
from pipeline.infra.errors import ConfigError, DataError, TrackingError

PIPELINE_DIR = PROJECT_ROOT / "pipeline"
NAME = DatasetConfig().train.images  # the first file `fetch` asks for
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
SHA = "0" * 64


def wait_for(condition: Callable[[], object], process: subprocess.Popen, seconds: float):
    """Poll `condition` until it is truthy; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the process exited early ({process.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
    pytest.fail(f"condition not met within {seconds} s")


def stop(process: subprocess.Popen | None) -> None:
    """Kill a process this test started, if it is still running."""
    if process is not None and process.poll() is None:
        process.kill()
        process.communicate()


# =========================================================================== disk full


def _copy_until_full(calls: list[tuple[Path, int]]):
    def copyfile(src, dst, *args, **kwargs):
        with open(src, "rb") as source, open(dst, "wb") as target:
            target.write(source.read(100))  # part of the file reaches the disk, then it is full
        calls.append((Path(dst), Path(dst).stat().st_size))
        raise OSError(errno.ENOSPC, NO_SPACE, str(dst))

    return copyfile


def _open_until_full(calls: list[tuple[Path, int]]):
    class FillingFile(io.FileIO):
        room = 100

        def write(self, data) -> int:
            if self.tell() + len(data) <= self.room:
                return super().write(data)
            super().write(bytes(data[: self.room - self.tell()]))
            calls.append((Path(self.name), Path(self.name).stat().st_size))
            raise OSError(errno.ENOSPC, NO_SPACE)

    def open_(file, mode="r", *args, **kwargs):
        assert mode == "wb", mode
        return FillingFile(file, "wb")

    return open_


@pytest.mark.parametrize("kind", ["dir", "http"])
def test_disk_full_during_fetch_lists_the_location_and_keeps_nothing(
    kind, idx_files, mirror_dir, tmp_path, http_server, monkeypatch
):
    from pipeline.infra import download

    calls: list[tuple[Path, int]] = []
    if kind == "http":
        mirror = http_server(mirror_dir).url
        monkeypatch.setattr(download, "open", _open_until_full(calls), raising=False)
    else:
        mirror = str(mirror_dir) + "/"
        monkeypatch.setattr(shutil, "copyfile", _copy_until_full(calls))
    dest = tmp_path / "dest"

    with pytest.raises(DataError) as raised:
        fetch_file(NAME, idx_files[NAME], [mirror], dest, timeout=5, retries=2)

    message = str(raised.value)
    line = next(ln for ln in message.splitlines() if source_url(mirror, NAME) in ln)
    assert NO_SPACE in line, message
    # One attempt: a full disk is not a transient mirror error, retrying would not help.
    [(partial, size)] = calls
    assert partial.parent == dest and partial.name.startswith(f".{NAME.split('.')[0]}.")
    assert size == 100  # a real partial file existed on disk...
    assert not (dest / NAME).exists()  # ...and neither it nor a final file is left
    assert temp_files(dest) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_in_a_stage_exits_with_one_line_and_keeps_nothing(code, tmp_path, monkeypatch):
    from pipeline.infra.files import write_json
    from pipeline.infra.stage import run_stage

    cfg = compose("dataset=digits")
    final = tmp_path / "metrics" / "train.json"
    real_write_text = Path.write_text
    partial: list[tuple[Path, int]] = []

    def write_until_full(self: Path, data: str, *args, **kwargs) -> int:
        real_write_text(self, data[:10], *args, **kwargs)
        partial.append((self, self.stat().st_size))
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", write_until_full)
    with pytest.raises(SystemExit) as raised:
        run_stage(cfg, lambda settings: write_json(final, {"test_accuracy": 0.9}))

    message = str(raised.value.code)
    assert message.startswith("error: no space left on the device"), message
    assert "free some space and run the stage again" in message
    assert "\n" not in message
    [(tmp, size)] = partial
    assert tmp.parent == final.parent and tmp != final and size == 10
    assert not final.exists()
    assert temp_files(tmp_path) == []


def test_ctrl_c_that_tensorflow_reraised_still_exits_as_an_interrupt(capsys):
    """Ctrl-C inside Keras' fit() can surface as TensorFlow's own RuntimeError; the stage must
    still report an interrupt (exit 130), not a crash with a traceback."""
    from pipeline.infra.stage import run_stage

    def fit_interrupted(settings) -> None:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("Exiting device scope without proper scope nesting")

    with pytest.raises(SystemExit) as raised:
        run_stage(compose("dataset=digits"), fit_interrupted)
    assert raised.value.code == 130
    assert "interrupted (Ctrl-C); no partial outputs were kept" in capsys.readouterr().err


def test_an_ordinary_error_in_a_stage_is_not_mistaken_for_an_interrupt():
    from pipeline.infra.stage import run_stage

    def broken(settings) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_stage(compose("dataset=digits"), broken)


ENOSPC = "no space left on the device (ENOSPC)"
# What a full disk must never print instead of its cause: SQLAlchemy's wrapper, and the old
# claim that results were saved before the stage had started.
NOT_THE_CAUSE = ("Traceback", "raised as a result of", "nothing yet", "Logging error")


def test_a_disk_too_full_for_hydras_run_folder_is_one_line(tmp_path, tmp_path_factory):
    """Hydra writes each run's folder (outputs/<date>/<time>/.hydra/*.yaml, a sweep's
    multirun.yaml) before the stage starts; on a full disk that was Hydra's chained traceback.
    One stage and one sweep: every stage goes through the same stage.run_main (the read-only
    project test in test_dvc_pipeline.py runs them all)."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    sweep = ("pipeline.crossval", "-m", "debug=fast", "hydra.sweep.dir=outputs/sweep", "width=8,16")
    commands = {"train": ("pipeline.train", "debug=fast"), "crossval -m": sweep}
    with full_disk(project / "outputs", size="1m") as outputs:
        fill_up(outputs)
        with ThreadPoolExecutor(2) as pool:
            done = dict(
                zip(
                    commands,
                    pool.map(lambda args: run_module(*args, cwd=project), commands.values()),
                    strict=True,
                )
            )
    for name, result in done.items():
        line = assert_one_line_error(result, ENOSPC, "hydra.run.dir")
        assert line.startswith("error: Hydra cannot write the run's folder"), (name, line)


@pytest.mark.slow
def test_a_full_disk_during_crossval_names_the_cause_and_leaves_no_run_running(
    tmp_path, tmp_path_factory
):
    """The store's disk fills up once the first fold has logged an epoch: the stage says the
    disk is full (not SQLAlchemy's "raised as a result of Query-invoked autoflush"), and once
    space is freed, the explicit repair leaves no run RUNNING (a run whose status the full
    store refused is remembered and closed)."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    with full_disk(tmp_path / "store") as disk:
        uri = new_store(tmp_path_factory, disk)
        process = start_cli(
            project, "pipeline.crossval", "debug=fast", "epochs=10", f"tracking.uri={uri}"
        )
        with reaped(process):
            wait_for(lambda: _running_run(disk / "mlflow.db", trained=True), process, 180)
            filler = fill_up(disk)
            returncode = process.wait(timeout=180)
        log = (project / "cli.log").read_text()
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert returncode == 1 and len(errors) == 1, log
        assert ENOSPC in errors[0] and "free some space" in errors[0], errors[0]
        for wrong in NOT_THE_CAUSE:
            assert wrong not in log, log
        filler.unlink()
        repaired = run_module("pipeline.runs", "close-dead", "--tracking-uri", uri, cwd=project)
        assert repaired.returncode == 0, repaired.stderr
        statuses = {run.info.status for run in runs(uri)}
    assert "RUNNING" not in statuses and statuses, statuses


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[how]
    )


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_damaged_prepared_split_says_to_rerun_preprocess(how, tmp_path, tmp_path_factory):
    from pipeline.core.data import load_split

    damaged = shutil.copytree(prepared_digits(tmp_path_factory), tmp_path / "prepared")
    _damage(damaged / "train.npz", how)
    with pytest.raises(DataError) as raised:
        load_split(damaged / "train.npz")
    message = str(raised.value)
    assert "train.npz is damaged" in message and "dvc repro preprocess" in message, message
    assert "allow_pickle" not in message and "\n" not in message, message


def test_a_damaged_train_npz_is_one_line_from_the_stage(tmp_path, tmp_path_factory):
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    _damage(project / "data" / "prepared" / "train.npz", "truncated")
    store = new_store(tmp_path_factory, project)
    done = run_module("pipeline.train", "debug=fast", f"tracking.uri={store}", cwd=project)
    assert_one_line_error(done, "train.npz is damaged", "python -m pipeline.preprocess")


# =========================================================================== interrupted fetch


def _trickle(handler) -> bool:
    """Promise 10 MB, send 100 kB (more than one read chunk, so part of it reaches the temporary
    file), then one byte every 0.2 s until the test ends: the download is in progress."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(10 * 2**20))
    handler.end_headers()
    try:
        handler.wfile.write(b"\x1f\x8b" + bytes(100_000))
        handler.wfile.flush()
        while not handler.server.stop.wait(0.2):
            handler.wfile.write(b"\0")
            handler.wfile.flush()
    except OSError:
        pass  # the client went away
    return True


def _default_sigint() -> None:
    # A child of a background job inherits SIGINT ignored, and Python then never installs its
    # KeyboardInterrupt handler; give the stage the Ctrl-C a user's terminal would deliver.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupted_download_exits_cleanly_and_keeps_nothing(
    signum, exit_code, mirror_dir, tmp_path, http_server
):
    served = http_server(mirror_dir, routes={f"/{NAME}": _trickle})
    raw = tmp_path / "data" / "raw" / "mnist"

    def partial_download() -> list[Path]:
        try:
            return [p for p in raw.glob(".*.tmp*") if p.stat().st_size > 0]
        except FileNotFoundError:
            return []

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.fetch",
            f"dataset.mirrors=[{served.url}]",
            "dataset.retries=0",
        ],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        wait_for(partial_download, process, 60)  # the request arrived, bytes are on disk
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        stop(process)

    assert process.returncode == exit_code, stderr
    reason = "Ctrl-C" if signum == signal.SIGINT else f"received signal {int(signum)}"
    assert f"interrupted ({reason}); no partial outputs were kept" in stderr, stderr
    assert "Traceback" not in stderr
    assert served.requests == [f"/{NAME}"]
    assert not (raw / NAME).exists()
    assert list(raw.iterdir()) == []  # neither the file nor its temporary copy
    assert temp_files(tmp_path) == []


# =========================================================================== config


def test_unknown_group_option_lists_the_available_options(cli, tmp_path):
    result = cli(tmp_path, "pipeline.train", "dataset=nope")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()  # one line, without Hydra's search path
    assert line.startswith("error: ") and "Could not find 'dataset/nope'" in line, line
    available = line.split("Available options in 'dataset':", 1)[1]
    assert {"digits", "fashion_mnist", "mnist"} <= set(available.split()[:3])
    assert list(tmp_path.iterdir()) == []  # no data/, models/, mlflow.db, not even Hydra's outputs/


def test_misspelt_key_is_refused_before_any_work(cli, tmp_path):
    result = cli(tmp_path, "pipeline.train", "epoch=5")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: unknown config key 'epoch' (did you mean 'epochs'?)"), line
    assert list(tmp_path.iterdir()) == []


def test_more_folds_than_training_samples_is_a_config_error():
    from pipeline.core.folds import fold_indices

    labels = np.arange(4) % 2
    with pytest.raises(ConfigError) as raised:
        fold_indices(labels, folds=5, seed=42, shuffle=True, stratified=False)
    message = str(raised.value)
    assert names_key(message, "folds"), message
    assert "the training set has samples (4)" in message
    assert "Fix: use folds<=4" in message
    assert len(fold_indices(labels, folds=4, seed=42, shuffle=True, stratified=False)) == 4


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("threads=-1", "threads"),
        ("threads=x", "threads"),
        ("batch_size=abc", "batch_size"),
        ("folds=2.5", "folds"),
        ("width=wide", "width"),
        ("width=1e3", "width"),
        ("epochs=null", "epochs"),
        ("deterministic=maybe", "deterministic"),
        ("crossval.stratified=maybe", "crossval.stratified"),
        ("model.filters=[0]", "model.filters"),
        ("dataset.mirrors=abc", "dataset.mirrors"),
    ],
)
def test_more_mistyped_or_out_of_range_keys_are_named(override, key):
    with pytest.raises(ConfigError) as raised:
        validate(compose(override))
    message = str(raised.value)
    assert names_key(message, key), message
    assert "\n" not in message


def test_unknown_activation_is_a_config_error():
    """Passes the schema (any string); Keras is the judge, before any model is built."""
    from dataclasses import asdict

    from pipeline.core.models import build_model

    cfg = settings("dataset=digits", "model.activation=nope")
    with pytest.raises(ConfigError) as raised:
        build_model(**asdict(cfg.model), width=8, input_dim=64, image_shape=(8, 8))
    assert names_key(str(raised.value), "model.activation"), raised.value


@pytest.mark.timeout(300)
def test_a_model_too_big_for_memory_stops_before_tensorflow_allocates(tmp_path, tmp_path_factory):
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    uri = new_store(tmp_path_factory, project)  # already migrated: the check is what takes time
    width = 100_000_000
    result = run_module(
        "pipeline.train", "dataset=digits", f"width={width}", f"tracking.uri={uri}",
        cwd=project, timeout=280,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert f"width={width}" in line and "free memory" in line and "smaller width" in line, line
    # 64 inputs and 10 classes: 7.5e9 float32 weights and biases, about 4 copies of each.
    needed = float(re.search(r"needs about ([\d.]+) GiB", line).group(1))
    params = 64 * width + width + width * 10 + 10
    assert needed == pytest.approx(4 * 4 * params / 2**30, abs=0.1)
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    for output in ("models", "metrics", "runs", "plots"):
        assert not (project / output).exists(), output
    assert runs(uri) == []  # refused before an MLflow run was started


# =========================================================================== tracking

_HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
connection.rollback()
"""


@pytest.mark.timeout(120)
def test_a_locked_sqlite_store_names_the_uri_and_starts_no_run(tmp_path, tmp_path_factory):
    """Another process holds an exclusive lock on the store: sqlite's 5 s connect timeout, then
    a TrackingError. (A write lock only, BEGIN IMMEDIATE, takes MLflow's fixed 20 s
    busy_timeout before the same error; not tested here, to keep the suite quick.)"""
    from pipeline.infra.tracking import tracked_run

    uri = new_store(tmp_path_factory, tmp_path)
    cfg = settings("dataset=digits", f"tracking.uri={uri}")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "mlflow.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    entered = False
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with (
            pytest.raises(TrackingError) as raised,
            isolated_mlflow(tmp_path),
            tracked_run(cfg, "train", SHA),
        ):
            entered = True
        waited = time.monotonic() - started
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        stop(holder)
    message = str(raised.value)
    assert message.startswith(f"cannot open MLflow store {uri}: "), message
    assert "database is locked" in message
    assert not entered
    assert waited < 60
    assert runs(uri) == []  # nothing was started, so nothing is left RUNNING

    # Once the other process lets go, the same config works: the failure is not cached.
    with isolated_mlflow(tmp_path), tracked_run(cfg, "train", SHA) as run:
        pass
    assert [(r.info.run_id, r.info.status) for r in runs(uri)] == [(run.info.run_id, "FINISHED")]


def test_a_deleted_experiment_says_how_to_restore_it(tmp_path, tmp_path_factory):
    from mlflow.entities import ViewType

    from pipeline.infra.tracking import tracked_run

    uri = new_store(tmp_path_factory, tmp_path)
    store = client(uri)
    experiment_id = store.create_experiment(EXPERIMENT, artifact_location=tmp_path.as_uri())
    store.delete_experiment(experiment_id)
    cfg = settings("dataset=digits", f"tracking.uri={uri}")

    entered = False
    with (
        pytest.raises(TrackingError) as raised,
        isolated_mlflow(tmp_path),
        tracked_run(cfg, "train", SHA),
    ):
        entered = True
    message = str(raised.value)
    assert f"experiment '{EXPERIMENT}' is deleted in {uri}" in message
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in message
    assert "tracking.experiment=" in message
    assert not entered
    assert store.search_runs([experiment_id], run_view_type=ViewType.ALL) == []

    store.restore_experiment(experiment_id)  # what the message says to do
    with isolated_mlflow(tmp_path), tracked_run(cfg, "train", SHA) as run:
        pass
    assert run.info.experiment_id == experiment_id
    assert [r.info.status for r in runs(uri)] == ["FINISHED"]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return True
    except OSError:
        return False


def _running_run(db: Path, *, trained: bool = False) -> str | None:
    """The id of the RUNNING run in a store's sqlite file; with `trained`, only once it has
    logged its first epoch (so the client has its run and training is under way)."""
    query = "SELECT run_uuid FROM runs WHERE status = 'RUNNING'"
    if trained:
        query += " AND run_uuid IN (SELECT run_uuid FROM metrics WHERE key = 'train_loss')"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute(query).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tracking_server_dying_mid_run_keeps_the_results(tmp_path, tmp_path_factory):
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    if not mlflow_cli.exists():
        pytest.skip(f"no mlflow CLI beside {sys.executable}")
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    server_dir = tmp_path / "server"
    backend = new_store(tmp_path_factory, server_dir)  # migrated already: the server starts sooner
    url = f"http://127.0.0.1:{free_port()}"
    server_log = server_dir / "server.log"
    with open(server_log, "w", encoding="utf-8") as log:
        server = subprocess.Popen(
            [
                str(mlflow_cli),
                "server",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                (server_dir / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                url.rsplit(":", 1)[1],
                "--workers",
                "1",
            ],
            cwd=server_dir,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the test kills the whole server
        )
    trainer = None
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"mlflow server did not start:\n{server_log.read_text()[-2000:]}")
            time.sleep(0.5)
        env = cli_env()
        env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
        trainer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.train",
                "dataset=digits",
                "epochs=60",
                f"tracking.uri={url}",
            ],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Not as soon as the run is RUNNING: the server commits it before it answers, and a
        # kill in between fails start_run itself (also a clean error, but not this case).
        run_id = wait_for(
            lambda: _running_run(server_dir / "mlflow.db", trained=True), trainer, 180
        )
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait(timeout=30)
        stdout, stderr = trainer.communicate(timeout=180)
    finally:
        stop(trainer)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)

    assert trainer.returncode == 1, stdout + stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stdout + stderr
    line = errors[0]
    assert "the results are saved (models/model.keras, metrics/train.json)" in line, line
    assert f"logging them to MLflow at {url} failed" in line
    assert "Re-run the stage" in line
    assert "training continues" in stdout + stderr  # the per-epoch logging degraded first
    assert "Traceback" not in stderr
    assert (project / "models" / "model.keras").stat().st_size > 0
    assert 0 <= json.loads((project / "metrics" / "train.json").read_text())["test_accuracy"] <= 1
    # The outputs are one set with the record of the run that made them (still RUNNING below).
    assert json.loads((project / "runs" / "train.json").read_text())["run_id"] == run_id
    assert temp_files(project) == []
    # Nothing can end the run while its store is down: the server's backend keeps it RUNNING,
    # and the error above tells the user to re-run (the stage did not finish, so DVC re-runs it).
    assert _running_run(server_dir / "mlflow.db") == run_id


# =========================================================================== atomic outputs

# method or function name -> which argument is the path written ("self": the receiver)
_WRITES: dict[str, int | str] = {
    "write_text": "self",
    "write_bytes": "self",
    "touch": "self",
    "save": 0,  # Keras, NumPy, PIL
    "savez": 0,
    "savez_compressed": 0,
    "savetxt": 0,
    "tofile": 0,
    "savefig": 0,
    "imsave": 0,
    "to_csv": 0,
    "to_json": 0,
    "to_parquet": 0,
    "to_pickle": 0,
    "compose_and_dump": 0,  # DVC's params.yaml writer
    "rename": 0,  # Path.rename(target); Path.replace is left out: it cannot be told from str's
}
# functions of these modules that write their second argument
_MODULE_WRITES = {
    "shutil": ("copy", "copy2", "copyfile", "copytree", "move"),
    "os": ("replace", "rename", "link", "symlink"),
}
_OPENERS = {"io", "gzip", "bz2", "lzma", "codecs", "tarfile", "zipfile", "Image"}
_OS_WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def _receiver(call: ast.Call) -> str | None:
    value = getattr(call.func, "value", None)
    return value.id if isinstance(value, ast.Name) else None


def _arg(call: ast.Call, index: int, *keywords: str) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg in keywords:
            return keyword.value
    return call.args[index] if len(call.args) > index else None


def _writes_mode(mode: ast.expr | None) -> bool:
    if mode is None:
        return False  # open()'s default is "r"
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
        return any(c in mode.value for c in "wax+")
    return True  # computed: assume it may write


def write_target(call: ast.Call) -> tuple[str, ast.expr | None] | None:
    """(what, the path expression written) if `call` writes a file, else None."""
    name, receiver = _name(call), _receiver(call)
    if name == "open" and (isinstance(call.func, ast.Name) or receiver in _OPENERS):
        return (
            ("open", _arg(call, 0, "file", "filename", "fp"))
            if _writes_mode(_arg(call, 1, "mode"))
            else None
        )
    if name == "open" and receiver == "os":
        flags = _arg(call, 1, "flags")
        names = (
            {n.attr for n in ast.walk(flags) if isinstance(n, ast.Attribute)} if flags else set()
        )
        return ("os.open", _arg(call, 0, "path")) if names & _OS_WRITE_FLAGS else None
    if name == "open" and isinstance(call.func, ast.Attribute):  # pathlib's Path.open(mode)
        return ("open", call.func.value) if _writes_mode(_arg(call, 0, "mode")) else None
    for module, functions in _MODULE_WRITES.items():
        if receiver == module and name in functions:
            return f"{module}.{name}", _arg(call, 1, "dst")
    where = _WRITES.get(name or "")
    if where == "self" and isinstance(call.func, ast.Attribute):
        return name, call.func.value
    if isinstance(where, int):
        return name, _arg(call, where, "file", "fname", "filepath", "fp", "path", "path_or_buf")
    return None


class _Module:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.tree = ast.parse(source)
        self.parents = {c: p for p in ast.walk(self.tree) for c in ast.iter_child_nodes(p)}

    def function(self, node: ast.AST) -> ast.AST | None:
        while (node := self.parents.get(node)) is not None:
            if isinstance(node, _FUNCTIONS):
                return node
        return None

    def bound_by(self, node: ast.AST, makers: set[str]) -> set[str]:
        """Names bound as `with maker(...) as name` around `node` (in the same function),
        including earlier items of the same `with` statement."""
        names, child, parent = set(), node, self.parents.get(node)
        while parent is not None and not isinstance(parent, _FUNCTIONS):
            if isinstance(parent, ast.With | ast.AsyncWith):
                items = parent.items
                if isinstance(child, ast.withitem):
                    items = items[: items.index(child)]
                for item in items:
                    expr = item.context_expr
                    target = item.optional_vars
                    if isinstance(expr, ast.Call) and _name(expr) in makers:
                        names.update([target.id] if isinstance(target, ast.Name) else [])
            child, parent = parent, self.parents.get(parent)
        return names

    def derived_from(self, expr: ast.expr, names: set[str], depth: int = 3) -> bool:
        """`expr` is built from one of `names`, directly or through local assignments."""
        used = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
        if used & names:
            return True
        if depth == 0:
            return False
        function = self.function(expr) or self.tree
        for node in ast.walk(function):
            assigns = isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in used for t in node.targets
            )
            if assigns and self.derived_from(node.value, names, depth - 1):
                return True
        return False


def _parameters(function: ast.AST) -> list[str]:
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def _in_memory(function: ast.AST, target: ast.Name) -> bool:
    """`target` is an io.BytesIO that `function` makes: written in memory, not to a file."""
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == target.id for t in node.targets)
        and isinstance(node.value, ast.Call)
        and _name(node.value) == "BytesIO"
        for node in ast.walk(function)
    )


def atomic_write_violations(sources: dict[str, str]) -> tuple[set[str], list[str]]:
    """Check every file write in `sources` (module name -> code).

    A write is fine if the path it writes is the temporary path of an enclosing
    `with atomic_path(...) as tmp` (or `os.devnull`, or inside a TemporaryDirectory). If it is a
    parameter of the enclosing function, every call of that function is checked the same way
    for the argument it passes (download.py's _fetch_once(location, tmp, ...), idx.write_idx).
    Returns ({"module:what", ...} for every write found, [violations]).
    """
    modules = [_Module(name, source) for name, source in sources.items()]
    found: set[str] = set()
    violations: list[str] = []
    checked: set[tuple[str, str]] = set()

    def check(module: _Module, call: ast.Call, what: str, target: ast.expr | None) -> None:
        where = f"{module.name}:{call.lineno} {what}"
        if target is None:
            violations.append(f"{where}: cannot tell which path it writes")
            return
        if ast.unparse(target) == "os.devnull":
            return
        if isinstance(target, ast.Name) and target.id in module.bound_by(call, {"atomic_path"}):
            return
        scratch = module.bound_by(call, {"TemporaryDirectory"})
        if scratch and module.derived_from(target, scratch):
            return
        function = module.function(call)
        if isinstance(target, ast.Name) and function is not None and _in_memory(function, target):
            return
        if (
            isinstance(target, ast.Name)
            and function is not None
            and not isinstance(function, ast.Lambda)
        ):
            parameters = _parameters(function)
            if target.id in parameters:
                key = (module.name, function.name)
                if key in checked:
                    return
                checked.add(key)
                index = parameters.index(target.id)
                callers = [
                    (other, node)
                    for other in modules
                    for node in ast.walk(other.tree)
                    if isinstance(node, ast.Call) and _name(node) == function.name
                ]
                if not callers:
                    violations.append(
                        f"{where}: writes {function.name}()'s parameter {target.id!r}, and "
                        "nothing calls it, so the path cannot be checked"
                    )
                for other, node in callers:
                    check(
                        other,
                        node,
                        f"{function.name}(), which writes",
                        _arg(node, index, target.id),
                    )
                return
        violations.append(f"{where} writes {ast.unparse(target)} outside `with atomic_path(...)`")

    for module in modules:
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call) and (write := write_target(node)) is not None:
                found.add(f"{module.name}:{write[0]}")
                check(module, node, *write)
    return found, violations


_OK_SNIPPETS = {
    "atomic": "def f(p):\n    with atomic_path(p) as tmp:\n        tmp.write_text('x')\n",
    "same with": "def f(p):\n    with atomic_path(p) as tmp, open(tmp, 'w') as fh:\n        pass\n",
    "through a parameter": (
        "def w(dest):\n    open(dest, 'wb').close()\n"
        "def g(p):\n    with atomic_path(p) as tmp:\n        w(tmp)\n"
    ),
    "read": (
        "def f(p):\n    with open(p) as fh, gzip.open(p, 'rb') as gz:\n        return fh.read()\n"
    ),
    "scratch dir": (
        "def f():\n    with tempfile.TemporaryDirectory() as d:\n"
        "        out = Path(d) / 'x'\n        out.write_text('x')\n"
    ),
    "devnull": "fd = os.open(os.devnull, os.O_WRONLY)\n",
}
_BAD_SNIPPETS = {
    "plain write_text": "def f(p):\n    Path(p).write_text('x')\n",
    "after the with": (
        "def f(p, a):\n    with atomic_path(p) as tmp:\n        pass\n    np.save(p, a)\n"
    ),
    "final path, not tmp": (
        "def f(p):\n    with atomic_path(p) as tmp:\n        p.write_bytes(b'')\n"
    ),
    "uncalled writer": "def f(p):\n    with open(p, 'w') as fh:\n        pass\n",
    "caller passes a final path": (
        "def w(dest):\n    shutil.copyfile('a', dest)\ndef g(p):\n    w(p / 'x')\n"
    ),
    "rename": "def f(a):\n    os.replace(a, 'final')\n",
    "gzip write": "def f():\n    gzip.open(FINAL, 'wb')\n",
    "Path.open append": "def f():\n    FINAL.open(mode='a')\n",
    "savefig": "def f(fig):\n    fig.savefig('plot.png')\n",
}


@pytest.mark.parametrize("snippet", sorted(_OK_SNIPPETS))
def test_atomic_write_check_accepts(snippet):
    assert atomic_write_violations({"m.py": _OK_SNIPPETS[snippet]})[1] == []


@pytest.mark.parametrize("snippet", sorted(_BAD_SNIPPETS))
def test_atomic_write_check_rejects(snippet):
    found, violations = atomic_write_violations({"m.py": _BAD_SNIPPETS[snippet]})
    assert found and len(violations) == 1, violations


def test_every_file_the_pipeline_writes_goes_through_atomic_path():
    sources = {
        path.relative_to(PIPELINE_DIR).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(PIPELINE_DIR.rglob("*.py"))
        if path.name != "files.py"  # atomic_path and write_json themselves
    }
    found, violations = atomic_write_violations(sources)
    # The check sees the writes it is meant to check (it is not vacuously passing).
    assert {
        "infra/download.py:shutil.copyfile",
        "infra/download.py:open",
        "core/idx.py:open",
        "params.py:compose_and_dump",
        "core/data.py:savez",
        "core/plots.py:savefig",
        "train.py:save",
        "report.py:write_text",
        "params.py:write_text",
    } <= found, sorted(found)
    assert violations == [], "\n".join(violations)
