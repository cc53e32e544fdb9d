"""After a hard kill (`kill -9`, the OOM killer): no MLflow run stays RUNNING and no temporary
file stays beside the outputs. Every run records the process that runs it; the next stage start,
and `python -m pipeline.runs close-dead`, mark KILLED the RUNNING runs whose process is gone
(folds with their parent) and leave the runs of live processes, other hosts and other pid
namespaces alone. Real processes, real sqlite stores, real /proc."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from run_helpers import (
    EXPERIMENT,
    PROJECT_ROOT,
    client,
    history,
    isolated_mlflow,
    new_store,
    prepared_digits,
    project_copy,
    reaped,
    run_cli,
    run_module,
    runs,
    settings,
    start_cli,
    temp_files,
)

SHA = "0" * 64
LINUX = Path("/proc/self/stat").is_file()


@pytest.fixture
def store(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return new_store(tmp_path_factory, tmp_path)


@pytest.fixture(autouse=True)
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own record of unended runs (reconcile.end_active_run), not the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "digit-pipeline" / "unended-runs.json"


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def _status(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.status


# --------------------------------------------------------------------------- what a run records


@pytest.mark.skipif(not LINUX, reason="checks the start time against /proc")
def test_a_run_and_its_folds_record_the_process_that_runs_them(store: str, tmp_path: Path):
    from pipeline.infra.tracking import child_run, tracked_run

    cfg = settings("debug=fast", f"tracking.uri={store}")
    with (
        isolated_mlflow(tmp_path),
        tracked_run(cfg, "crossval", SHA) as parent,
        child_run("fold 1", {"fold": "1"}) as fold,
    ):
        pass
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    start = stat[stat.rfind(")") + 2 :].split()[19]  # field 22, proc(5)
    for run in (parent, fold):
        tags = client(store).get_run(run.info.run_id).data.tags
        assert tags["pipeline.host"] == socket.gethostname()
        assert tags["pipeline.pid"] == str(os.getpid())
        assert tags["pipeline.pid_start"] == start
        assert tags["pipeline.pid_space"].endswith(os.readlink("/proc/self/ns/pid"))


# --------------------------------------------------------------------------- judging runs


def _fake_runs(uri: str) -> dict[str, str]:
    """RUNNING runs that claim various processes, by what they stand for -> run id."""
    from pipeline.infra.reconcile import this_process

    mlflow_client = client(uri)
    experiment = mlflow_client.create_experiment(EXPERIMENT)
    me = this_process()
    dead = replace(me, pid=_dead_pid())
    machine, _, namespace = me.space.split("/", 2)
    processes = {
        "live": me,  # this test process: alive
        "pid reused": replace(me, start="1"),  # our pid, but a process that started earlier
        "exited": dead,
        "another host": replace(dead, host=f"not-{me.host}"),
        "a container": replace(dead, space=f"{machine}/{me.space.split('/')[1]}/pid:[1]"),
        "rebooted": replace(dead, space=f"{machine}/an-earlier-boot/{namespace}"),
    }
    made = {
        name: mlflow_client.create_run(experiment, tags={**p.tags(), "stage": "train"})
        for name, p in processes.items()
    }
    # A fold found before its parent and one found after it (runs come newest first).
    made["fold"] = mlflow_client.create_run(
        experiment, tags={**dead.tags(), "stage": "crossval-fold"}
    )
    parent = mlflow_client.create_run(experiment, tags={**dead.tags(), "stage": "crossval"})
    made["crossval"] = parent
    fold_tags = {"stage": "crossval-fold", "mlflow.parentRunId": parent.info.run_id}
    mlflow_client.set_tag(made["fold"].info.run_id, "mlflow.parentRunId", parent.info.run_id)
    made["fold without a process"] = mlflow_client.create_run(experiment, tags=fold_tags)
    made["finished"] = mlflow_client.create_run(experiment, tags=dead.tags())
    mlflow_client.set_terminated(made["finished"].info.run_id, "FINISHED")
    return {name: run.info.run_id for name, run in made.items()}


CLOSED = ("pid reused", "exited", "crossval", "fold", "fold without a process")
LEFT_RUNNING = ("live", "another host", "a container")


@pytest.mark.skipif(not LINUX, reason="pid namespaces and boot ids are Linux's")
def test_the_repair_command_closes_exactly_the_runs_whose_process_is_gone(store: str):
    made = _fake_runs(store)
    result = run_module("pipeline.runs", "close-dead", "--tracking-uri", store, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in (*CLOSED, "rebooted"):
        assert _status(store, made[name]) == "KILLED", name
    for name in LEFT_RUNNING:
        assert _status(store, made[name]) == "RUNNING", name
    assert _status(store, made["finished"]) == "FINISHED"
    reason = client(store).get_run(made["pid reused"]).data.tags["pipeline.killed_because"]
    assert reason == "its process is gone (pid reused by a later process)"
    # One line per run set: the parent names its folds.
    [crossval_line] = [line for line in out.splitlines() if made["crossval"] in line]
    assert crossval_line.startswith(f"marked run {made['crossval']} (crossval, pid ")
    assert ": exited) and its 2 fold runs (" in crossval_line
    assert made["fold"] in crossval_line and made["fold without a process"] in crossval_line
    assert "host rebooted" in out
    # What it cannot judge is listed, with how to close it; the live run is not.
    assert f"left RUNNING: run {made['another host']}" in out
    assert f"left RUNNING: run {made['a container']}" in out
    assert made["live"] not in out
    assert "--host NAME" in out
    assert out.splitlines()[-1] == f"closed 4 run set(s) whose process is gone; left 2 in {store}"


def test_the_repair_command_closes_a_host_named_as_gone_and_dry_run_changes_nothing(store: str):
    made = _fake_runs(store)
    host = f"not-{socket.gethostname()}"
    dry = run_module(
        "pipeline.runs",
        "close-dead",
        "--tracking-uri",
        store,
        "--host",
        host,
        "--dry-run",
        cwd=PROJECT_ROOT,
    )
    assert dry.returncode == 0, dry.stderr
    assert f"would mark run {made['another host']} (train, pid " in dry.stdout
    assert all(
        _status(store, run_id) == "RUNNING"
        for run_id in made.values()
        if run_id != made["finished"]
    )
    done = run_module(
        "pipeline.runs",
        "close-dead",
        "--tracking-uri",
        store,
        "--host",
        host,
        "--experiment",
        EXPERIMENT,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert f"{host} named as gone" in done.stdout
    assert _status(store, made["another host"]) == "KILLED"
    assert _status(store, made["live"]) == "RUNNING"


def test_a_stage_start_closes_the_dead_runs_of_its_experiment(store: str, caplog):
    import mlflow

    from pipeline.infra.reconcile import close_dead_runs

    made = _fake_runs(store)
    experiment = mlflow.MlflowClient(store).get_experiment_by_name(EXPERIMENT).experiment_id
    with caplog.at_level("INFO", logger="pipeline.infra.reconcile"):
        close_dead_runs(client(store), store, experiment)
    for name in CLOSED:
        assert _status(store, made[name]) == "KILLED", name
    for name in LEFT_RUNNING:
        assert _status(store, made[name]) == "RUNNING", name
    assert f"marked run {made['exited']} (train, pid " in caplog.text
    assert ": exited) KILLED" in caplog.text


def test_a_stage_start_never_fails_on_a_store_it_cannot_search(caplog):
    from pipeline.infra.reconcile import close_dead_runs

    class BrokenStore:
        def search_runs(self, *args, **kwargs):
            raise RuntimeError("database disk image is malformed\n[SQL: SELECT ...]")

    with caplog.at_level("WARNING", logger="pipeline.infra.reconcile"):
        close_dead_runs(BrokenStore(), "sqlite:///nowhere.db", "1")
    assert "could not close the runs of processes that are gone: database disk image is " in (
        caplog.text
    )
    assert "SQL" not in caplog.text


def test_a_status_the_store_refuses_is_retried_once_then_set_by_the_next_start(
    store: str, tmp_path: Path, own_state: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    import mlflow

    from pipeline.infra.reconcile import close_dead_runs
    from pipeline.infra.tracking import tracked_run

    tried = []

    def refuse(self, run_id, status=None, end_time=None):
        tried.append(status)
        raise RuntimeError("(sqlite3.OperationalError) database or disk is full\n[SQL: UPDATE]")

    cfg = settings("debug=fast", f"tracking.uri={store}")
    with monkeypatch.context() as patched, caplog.at_level("WARNING"):
        patched.setattr(mlflow.MlflowClient, "set_terminated", refuse)
        with (
            pytest.raises(KeyError),
            isolated_mlflow(tmp_path),
            tracked_run(cfg, "train", SHA) as run,
        ):
            raise KeyError("the stage's own error")
    run_id = run.info.run_id
    assert tried == ["FAILED", "FAILED"]  # once, then the one retry
    assert _status(store, run_id) == "RUNNING"
    assert (
        f"could not mark MLflow run {run_id} FAILED: (sqlite3.OperationalError) database or disk "
        "is full; the next stage start on this store will"
    ) in caplog.text
    assert "SQL" not in caplog.text

    # Our process is alive, so only the record can end the run, and with the status it meant.
    experiment = client(store).get_experiment_by_name(EXPERIMENT).experiment_id
    with caplog.at_level("INFO", logger="pipeline.infra.reconcile"):
        close_dead_runs(client(store), store, experiment)
    assert _status(store, run_id) == "FAILED"
    assert f"marked run {run_id} FAILED, as its own process could not" in caplog.text
    assert own_state.read_text().strip() == "[]"


def test_a_remembered_run_keeps_no_password_of_its_store(
    store: str, tmp_path: Path, own_state: Path, monkeypatch: pytest.MonkeyPatch
):
    """The record of a run the store refused to end names its store masked (issue #15)."""
    import mlflow

    from pipeline.infra.tracking import tracked_run

    def refuse(self, run_id, status=None, end_time=None):
        raise RuntimeError("the server is down")

    cfg = settings("debug=fast", f"tracking.uri={store}")
    with monkeypatch.context() as patched:
        patched.setattr(mlflow.MlflowClient, "set_terminated", refuse)
        with pytest.raises(KeyError), isolated_mlflow(tmp_path), tracked_run(cfg, "train", SHA):
            # As if the run were on a server reached with a password in its URI.
            patched.setattr(mlflow, "get_tracking_uri", lambda: "http://admin:S3NT1NEL@127.0.0.1:9")
            raise KeyError("the stage's own error")
    recorded = own_state.read_text()
    assert "http://admin:***@127.0.0.1:9" in recorded
    assert "S3NT1NEL" not in recorded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--tracking-uri", "sqlite:///{tmp}/nope.db"),
            "MLflow store sqlite:///{tmp}/nope.db does not exist",
        ),
        (("--tracking-uri", "{store}", "--experiment", "nope"), "no experiment 'nope' in {store}"),
    ],
    ids=["no-store", "no-experiment"],
)
def test_the_repair_command_fails_in_one_line(args, message, store: str, tmp_path: Path):
    fill = {"tmp": tmp_path, "store": store}
    result = run_module(
        "pipeline.runs", "close-dead", *(a.format(**fill) for a in args), cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: " + message.format(**fill))
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nope.db").exists()


# --------------------------------------------------------------------------- temporary files


def test_atomic_path_names_its_writer():
    from pipeline.infra.files import atomic_path, temp_writer

    with atomic_path(Path(os.environ.get("TMPDIR", "/tmp")) / "x.keras") as tmp:
        assert tmp.name.startswith(f".x.{os.getpid()}.") and tmp.name.endswith(".tmp.keras")
        assert temp_writer(tmp.name) == os.getpid()
    assert temp_writer(".x.abcd_123.tmp.keras") is None  # an earlier version's name: no pid
    assert temp_writer("x.keras") is None


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path):
    from pipeline.infra.reconcile import remove_stale_temp_files

    metrics = tmp_path / "metrics"
    nested = tmp_path / "plots" / "train"
    metrics.mkdir()
    nested.mkdir(parents=True)
    dead = metrics / f".train.{_dead_pid()}.k2j4_8ab.tmp.json"
    reused = nested / f".history.{os.getpid()}.k2j4_8ab.tmp.csv"  # written before we started
    live = metrics / f".crossval.{os.getpid()}.q9w8e7r6.tmp.json"
    unnamed = metrics / ".train.abcd_123.tmp.json"  # no writer in the name: not ours to judge
    final = metrics / "train.json"
    for path in (dead, reused, live, unnamed, final):
        path.write_text("{}")
    an_hour_before_us = time.time() - time.monotonic() - 3600
    os.utime(reused, (an_hour_before_us, an_hour_before_us))
    outside = tmp_path / "elsewhere" / dead.name  # not an output folder
    outside.parent.mkdir()
    outside.write_text("{}")

    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([dead, reused])
    assert temp_files(tmp_path) == sorted([outside, live, unnamed])
    assert final.exists()


def test_dvc_ignores_temporary_files_beside_outputs(tmp_path: Path):
    """A temporary file inside a directory output (data/prepared, plots/train, reports) would
    otherwise change that output's hash. Checked by DVC itself, with the project's .dvcignore."""
    dvc = str(Path(sys.executable).parent / "dvc")
    shutil.copy(PROJECT_ROOT / ".dvcignore", tmp_path / ".dvcignore")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    kept = "data/prepared/train.npz"
    for path in ("data/prepared/.train.123.abcd_123.tmp.npz", "plots/train/.history.9.x.tmp.csv"):
        result = subprocess.run(
            [dvc, "check-ignore", path, kept], cwd=tmp_path, capture_output=True, text=True
        )
        assert result.stdout.splitlines() == [path], f"{path}: {result.stdout}{result.stderr}"


# --------------------------------------------------------------------------- kill -9, for real


def _wait_for_epoch(uri: str, process, stage: str, deadline: float):
    """The first RUNNING run of `stage` once it has logged an epoch; fails if the process exits."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the process exited early with {process.returncode}")
        for run in runs(uri):
            if (
                run.info.status == "RUNNING"
                and run.data.tags.get("stage") == stage
                and history(uri, run.info.run_id, "train_loss")
            ):
                return run
        time.sleep(0.5)
    pytest.fail(f"no RUNNING {stage} run with a logged epoch appeared in time")


def _kill_9(process) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="kill -9 and /proc")
def test_kill_9_mid_train_then_the_next_start_closes_its_run(tmp_path, tmp_path_factory):
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    uri = new_store(tmp_path_factory, project)
    store = ("--tracking-uri", uri)
    process = start_cli(
        project, "pipeline.train", "debug=fast", "epochs=300", f"tracking.uri={uri}"
    )
    with reaped(process):
        killed = _wait_for_epoch(uri, process, "train", time.monotonic() + 120)
        # While it trains, the repair command leaves its run alone.
        alive = run_module("pipeline.runs", "close-dead", *store, cwd=project)
        assert alive.returncode == 0, alive.stderr
        assert _status(uri, killed.info.run_id) == "RUNNING"
        _kill_9(process)
    # What a write cut short leaves beside the model, and the run nothing ended.
    leftover = project / "models" / f".model.{process.pid}.k2j4_8ab.tmp.keras"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a model")
    assert _status(uri, killed.info.run_id) == "RUNNING"

    code, log = run_cli(project, "pipeline.train", "debug=fast", f"tracking.uri={uri}")
    assert code == 0, log
    assert (
        f"marked run {killed.info.run_id} (train, pid {process.pid} on {socket.gethostname()}: "
        "exited) KILLED"
    ) in log
    by_id = {run.info.run_id: run for run in runs(uri)}
    assert by_id.pop(killed.info.run_id).info.status == "KILLED"
    [new] = by_id.values()
    assert new.info.status == "FINISHED"
    assert temp_files(project / "models") == []
    assert (project / "models" / "model.keras").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="kill -9 and /proc")
def test_kill_9_mid_crossval_then_the_repair_command_closes_parent_and_fold(
    tmp_path, tmp_path_factory
):
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    uri = new_store(tmp_path_factory, project)
    process = start_cli(
        project, "pipeline.crossval", "debug=fast", "epochs=300", f"tracking.uri={uri}"
    )
    with reaped(process):
        fold = _wait_for_epoch(uri, process, "crossval-fold", time.monotonic() + 120)
        _kill_9(process)
    parent_id = fold.data.tags["mlflow.parentRunId"]
    assert {run.info.status for run in runs(uri)} == {"RUNNING"}

    result = run_module("pipeline.runs", "close-dead", "--tracking-uri", uri, cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"marked run {parent_id} (crossval, pid {process.pid} " in result.stdout
    assert f"and its 1 fold run ({fold.info.run_id}) KILLED" in result.stdout
    found = runs(uri)
    assert len(found) == 2
    assert {run.info.status for run in found} == {"KILLED"}
