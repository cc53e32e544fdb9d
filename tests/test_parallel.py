"""Hydra sweeps run by the joblib launcher (parallel processes), logging to one local sqlite store.

Four train jobs start on a FRESH store: each is the first to open it as far as it knows, so they
race to create MLflow's schema ("table ... already exists", "duplicate column", "database is
locked"; daizutabi/hydraflow#245). pipeline.infra.tracking opens the store under a file lock,
so none fails. And a sweep with one invalid job: the other jobs must still finish, their runs
FINISHED."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from run_helpers import cli_env, descendants, finished_runs_by_job, run_module, still_alive

WIDTHS = (8, 16, 32, 64)
RACE_ERRORS = ("database is locked", "duplicate column", "already exists", "Traceback")


@dataclass
class ParallelSweep:
    project: Path
    uri: str
    dir: Path
    runs: list[Any]
    done: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def parallel(digits_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> ParallelSweep:
    project = tmp_path_factory.mktemp("parallel")
    shutil.copytree(digits_prepared, project / "data" / "prepared")
    db = project / "fresh.db"
    uri = f"sqlite:///{db}"
    sweep_dir = project / "multirun"
    assert not db.exists()
    done = _sweep(
        project,
        "pipeline.train",
        f"hydra.launcher.n_jobs={len(WIDTHS)}",
        f"width={','.join(map(str, WIDTHS))}",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return ParallelSweep(project, uri, sweep_dir, _runs(uri), done)


def _sweep(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m <stage> -m hydra/launcher=joblib debug=fast <args>` in project. The test-size
    preset's threads=1: one TensorFlow thread per job (docs/SCALING.md), as jobs outnumber the
    cores."""
    stage, *rest = args
    fixed = ["-m", "hydra/launcher=joblib", "debug=fast"]
    return run_module(stage, *fixed, *rest, cwd=project, timeout=400)


def _runs(uri: str) -> list[Any]:
    import mlflow

    if not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=100)


def test_sweep_exits_cleanly(parallel: ParallelSweep):
    assert parallel.done.returncode == 0, parallel.done.stdout + parallel.done.stderr
    assert "Joblib.Parallel(n_jobs=4" in parallel.done.stdout + parallel.done.stderr
    for error in RACE_ERRORS:
        assert error not in parallel.done.stderr, parallel.done.stderr


def test_one_finished_run_per_job_with_its_width(parallel: ParallelSweep):
    by_job = finished_runs_by_job(parallel.runs, len(WIDTHS), parallel.done.stderr)
    for job, run in by_job.items():
        assert run.data.params["width"] == str(WIDTHS[job])
        assert run.data.tags["stage"] == "train"
    assert {r.data.tags["sweep"] for r in parallel.runs} == {str(parallel.dir)}
    assert len({r.info.experiment_id for r in parallel.runs}) == 1


def test_jobs_really_ran_in_parallel(parallel: ParallelSweep):
    spans = sorted((r.info.start_time, r.info.end_time) for r in parallel.runs)
    assert any(end > start for (_, end), (start, _) in itertools.pairwise(spans)), spans


def test_each_job_writes_its_outputs_into_its_own_folder(parallel: ParallelSweep):
    for run in parallel.runs:
        job_dir = parallel.dir / run.data.tags["sweep_job"]
        record = json.loads((job_dir / "runs" / "train.json").read_text())
        assert record["run_id"] == run.info.run_id
        assert record["tracking_uri"] == parallel.uri
        assert (job_dir / "metrics" / "train.json").is_file()
        assert (job_dir / "models" / "model.keras").is_file()
    for name in ("metrics", "models", "runs", "plots"):
        assert not (parallel.project / name).exists(), f"a job wrote into the project's {name}/"


def test_a_failing_job_fails_alone(digits_prepared: Path, tmp_path: Path):
    """folds=1 is invalid. Its job must fail without taking the running one down with it (a
    SystemExit in a joblib worker makes loky SIGKILL the others, leaving runs RUNNING)."""
    shutil.copytree(digits_prepared, tmp_path / "data" / "prepared")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = _sweep(
        tmp_path,
        "pipeline.crossval",
        "hydra.launcher.n_jobs=2",
        "width=8",
        "folds=2,1",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )
    assert done.returncode == 1, done.stderr
    assert "error: folds=1 is invalid" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    parents = [r for r in _runs(uri) if r.data.tags.get("stage") == "crossval"]
    assert [(r.data.params["folds"], r.info.status) for r in parents] == [("2", "FINISHED")]
    assert all(r.info.status == "FINISHED" for r in _runs(uri))


def _running_runs(db: Path) -> int:
    """RUNNING runs in the store, read with sqlite3 (read-only, no MLflow client in the way)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        try:
            return con.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
        except sqlite3.OperationalError:  # schema not created yet
            return 0


# A terminal's Ctrl-C reaches the whole foreground process group; `kill PID` (a scheduler, a
# supervisor, `timeout`) only the sweep's own process.
SIGNALS = {
    "ctrl-c": lambda pid: os.killpg(pid, signal.SIGINT),
    "sigterm": lambda pid: os.kill(pid, signal.SIGTERM),
}


@pytest.mark.parametrize("send", SIGNALS.values(), ids=SIGNALS.keys())
def test_a_signal_to_a_parallel_sweep_ends_its_runs_and_workers(
    send, digits_prepared: Path, tmp_path: Path
):
    """joblib SIGKILLs its workers on Ctrl-C before their jobs can end their runs; the sweep's
    own process (pipeline.infra.callbacks.CloseInterruptedRuns) marks them, and their folds,
    KILLED. SIGTERM is turned into the same interrupt there: before, it ended the sweep's
    process alone, its loky workers (~930 MB each) lived on for minutes, their runs RUNNING."""
    shutil.copytree(digits_prepared, tmp_path / "data" / "prepared")
    db = tmp_path / "mlflow.db"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "pipeline.crossval", "-m", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", "debug=fast", "folds=5", "epochs=500",
         "width=8,16", f"tracking.uri=sqlite:///{db}"],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        # A terminal's Ctrl-C: SIGINT at its default even when pytest runs as a background job.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    started = []
    try:
        deadline = time.monotonic() + 240
        while _running_runs(db) < 4:  # both jobs and a fold run of each
            assert sweep.poll() is None, sweep.communicate()[0]
            assert time.monotonic() < deadline, "the sweep's runs never started"
            time.sleep(0.5)
        started = descendants(sweep.pid)
        send(sweep.pid)
        output = sweep.communicate(timeout=120)[0]
        left = still_alive(started, seconds=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
        for process in still_alive(started, seconds=0):
            process.kill()
    assert sweep.returncode in (130, 143), output
    assert left == [], (left, output)
    found = _runs(f"sqlite:///{db}")
    statuses = {r.info.status for r in found}
    assert "RUNNING" not in statuses, output
    killed = [r for r in found if r.info.status == "KILLED"]
    assert {r.data.tags["stage"] for r in killed} == {"crossval", "crossval-fold"}, output
