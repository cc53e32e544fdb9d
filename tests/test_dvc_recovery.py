"""Ctrl-C in the middle of a real `dvc repro`, then the next `dvc repro` recovers.

On a throw-away copy of the project (its own git repository, the test-size preset with enough
epochs to be caught mid-training): start `dvc repro`, wait until the train stage's MLflow
run is RUNNING, then send SIGINT to the whole process group, as a terminal's Ctrl-C does. DVC
and the stage both get it: the stage ends its run KILLED and keeps no partial output, DVC exits
non-zero without recording train in dvc.lock. SIGTERM to the group (a second copy) ends the
same way, except that DVC does not handle SIGTERM and dies of it at once. The next
`dvc repro` skips fetch and preprocess (complete and locked), re-runs train, crossval and
report, and leaves everything up to date.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from run_helpers import STAGES, DvcProject, dvc_project, temp_files

pytestmark = pytest.mark.slow

# 30 epochs so the train stage runs long enough to be interrupted; 1 for the recovery run.
INTERRUPTED_EPOCHS = 30
OUTPUT_DIRS = ("models", "metrics", "plots", "runs")
START_DEADLINE_S = 240  # fetch + preprocess + TensorFlow's import on busy cores
EXIT_DEADLINE_S = 60
DONE = "no partial outputs were kept"  # the stage's last line on an interrupt


def _running_train_run(db: Path) -> str | None:
    """The id of a RUNNING run tagged stage=train, read-only: an MlflowClient would create (and
    migrate) the store itself if the stages had not yet created it."""
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute(
                "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE r.status = 'RUNNING' AND t.key = 'stage' AND t.value = 'train'"
            ).fetchone()
    except sqlite3.Error:  # tables not created yet, or the store is locked for a write
        return None
    return row[0] if row else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _ran(out: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in out}


def _temp_files(root: Path) -> list[Path]:
    """Temporary files left in the stage outputs (DVC keeps its own under .dvc/tmp)."""
    return [p for d in OUTPUT_DIRS for p in temp_files(root / d)]


@pytest.fixture(scope="module", params=[signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def sig(request: pytest.FixtureRequest) -> signal.Signals:
    return request.param


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, sig: signal.Signals) -> DvcProject:
    proj = dvc_project(tmp_path_factory.mktemp(f"dvc-recovery-{sig.name}"))
    proj.set_conf(r"^epochs: \d+$", f"epochs: {INTERRUPTED_EPOCHS}", "debug/fast.yaml")
    proj.python("-m", "pipeline.params")
    proj.git("init", "-q")
    proj.git("add", "-A")
    proj.git("commit", "-q", "-m", "digits, 30 epochs")
    return proj


def _interrupt_repro(proj: DvcProject, sig: signal.Signals) -> tuple[int, str, str]:
    """Start `dvc repro`, signal its process group once train's run is RUNNING; return dvc's
    exit code, its output and the interrupted run's id."""
    log = proj.root.parent / f"repro-{sig.name}.log"
    with open(log, "w", encoding="utf-8") as out:
        dvc = subprocess.Popen(
            ["dvc", "repro"],
            cwd=proj.root,
            env=proj.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # under a background job (CI) SIGINT arrives ignored; a terminal's Ctrl-C would not be
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        run_id = None
        while run_id is None:
            assert dvc.poll() is None, (
                f"dvc repro ended ({dvc.returncode}) before train started:\n{log.read_text()}"
            )
            assert time.monotonic() < deadline, f"train never started:\n{log.read_text()}"
            time.sleep(0.2)
            run_id = _running_train_run(proj.root / "mlflow.db")
        time.sleep(1.0)  # well into training, past the run's start
        os.killpg(dvc.pid, sig)
        code = dvc.wait(timeout=EXIT_DEADLINE_S)
        # DVC dies of SIGTERM at once (it handles only SIGINT), so the stage may still be
        # cleaning up: it prints its last line once the run is ended and temp files are gone.
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while DONE not in log.read_text(encoding="utf-8") and _group_alive(dvc.pid):
            assert time.monotonic() < deadline, f"the stage never finished:\n{log.read_text()}"
            time.sleep(0.2)
    finally:
        if dvc.poll() is None or _group_alive(dvc.pid):  # never leave a stray pipeline behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(dvc.pid, signal.SIGKILL)
            dvc.wait()
    return code, log.read_text(encoding="utf-8"), run_id


@pytest.fixture(scope="module")
def interrupted(project: DvcProject, sig: signal.Signals) -> tuple[int, str, str]:
    return _interrupt_repro(project, sig)


@pytest.fixture(scope="module")
def recovered(project: DvcProject, interrupted: tuple[int, str, str]) -> str:
    """Back to 1 epoch (fast), committed, then a normal `dvc repro` to completion."""
    project.set_conf(r"^epochs: \d+$", "epochs: 1", "debug/fast.yaml")
    project.python("-m", "pipeline.params")
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "epochs 1")
    return project.dvc("repro").stdout


def test_interrupt_stops_dvc_repro_and_keeps_nothing_partial(
    project: DvcProject, sig: signal.Signals, interrupted: tuple[int, str, str]
) -> None:
    code, out, run_id = interrupted
    # the stage handled the interrupt itself: its one line, no traceback
    assert re.search(rf"^interrupted \(.*\); {DONE}$", out, re.M), out
    assert "Traceback" not in out, out
    if sig == signal.SIGINT:
        # DVC waits for the stage, reports its exit code and fails
        assert f"interrupted (Ctrl-C); {DONE}" in out, out
        assert "exited with 130" in out, out
        assert "ERROR: failed to reproduce 'train'" in out, out
        assert code == 255, out
    else:
        # DVC does not handle SIGTERM: it dies of it at once, the stage cleans up on its own
        assert "interrupted (received signal 15)" in out, out
        assert code == -signal.SIGTERM, out
    assert _ran(out) == {"fetch", "preprocess", "train"}, out
    root = project.root
    for name in ("models/model.keras", "metrics/train.json", "runs/train.json"):
        assert not (root / name).exists(), name
    assert _temp_files(root) == []
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    assert set(lock["stages"]) == {"params", "fetch", "preprocess"}  # train recorded nothing
    runs = {r.info.run_id: r for r in project.mlflow_runs()}
    assert runs[run_id].info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in runs.values()}


def test_next_repro_reruns_only_the_interrupted_stages(
    project: DvcProject, interrupted: tuple[int, str, str], recovered: str
) -> None:
    assert _ran(recovered) == {"train", "crossval", "report"}, recovered
    assert "Stage 'fetch' didn't change, skipping" in recovered
    assert "Stage 'preprocess' didn't change, skipping" in recovered
    root = project.root
    for name in (
        "models/model.keras",
        "metrics/train.json",
        "metrics/crossval.json",
        "runs/train.json",
        "runs/crossval.json",
        "plots/train/history.csv",
        "reports/report.html",
    ):
        assert (root / name).is_file() and (root / name).stat().st_size > 0, name
    assert _temp_files(root) == []
    assert "up to date" in project.dvc("status").stdout
    runs = project.mlflow_runs()
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert statuses[interrupted[2]] == "KILLED"  # the interrupted run is not overwritten
    assert "RUNNING" not in statuses.values()
    trains = [r for r in runs if r.data.tags.get("stage") == "train"]
    assert [(r.data.params["epochs"], r.info.status) for r in trains] == [
        ("1", "FINISHED"),
        (str(INTERRUPTED_EPOCHS), "KILLED"),
    ]
