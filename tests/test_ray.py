"""Hydra sweeps on a Ray cluster: `hydra/launcher=ray_cluster` (conf/hydra/launcher/).

The test starts a real Ray head on 127.0.0.1 from a directory of its own, as a user runs
`ray start --head` somewhere else than the project, and sends a sweep to it through RAY_ADDRESS.
Ray starts its workers in the head's directory; the jobs must still read the project's data/,
log to the project's sqlite store and write into the project's multirun/ folder, and each job's
TensorFlow must use the one CPU Ray reserved for it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from run_helpers import (
    cli_env,
    finished_runs_by_job,
    free_port,
    new_store,
    project_copy,
    run_module,
    runs,
)

pytestmark = pytest.mark.slow  # a real Ray head and four TensorFlow jobs: about a minute

WIDTHS = (8, 16, 24, 32)
RAY = Path(sys.executable).with_name("ray")
TOKEN = secrets.token_hex(32)


def ray_env() -> dict[str, str]:
    """Token authentication on, with a token of the test's own, for the head and the sweep
    alike: Ray 2.59+ turns it on by default for some local clusters (using ~/.ray/auth_token,
    which any earlier local Ray created), and a client that disagrees is refused."""
    return {**cli_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}


@contextlib.contextmanager
def ray_head(cwd: Path) -> Iterator[str]:
    """A Ray head node on 127.0.0.1 with 2 CPUs; yields its address. `--block` keeps the head's
    processes in one process group, which teardown stops without touching other Ray clusters.
    A temp dir of its own: Ray notes the head's address in <temp dir>/ray_current_cluster and
    does not remove it when the head stops, and a later `ray.init()` on this machine (a user's
    `hydra/launcher=ray_cluster` without RAY_ADDRESS) would keep trying that dead address."""
    port = free_port()
    log = cwd / "ray-head.log"
    temp_dir = tempfile.mkdtemp(prefix="ray-test-")  # short: Ray's socket paths must fit 107 bytes
    with log.open("w") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats"],
            cwd=cwd, env=ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class RaySweep:
    project: Path
    head_dir: Path
    uri: str
    done: subprocess.CompletedProcess[str]
    runs: list[Any]


@pytest.fixture(scope="module")
def ray_sweep(digits_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> RaySweep:
    project = project_copy(digits_prepared, tmp_path_factory.mktemp("ray-project"))
    uri = new_store(tmp_path_factory, project)  # project/mlflow.db: tracking=local's default
    head_dir = tmp_path_factory.mktemp("ray-head")
    with ray_head(head_dir) as address:
        env = {**ray_env(), "RAY_ADDRESS": address}
        done = run_module(
            "pipeline.train", "-m", "hydra/launcher=ray_cluster",
            # threads=0 (not the preset's 1): TensorFlow follows the CPU Ray reserves (below)
            "debug=fast", "threads=0", f"width={','.join(map(str, WIDTHS))}",
            cwd=project, env=env, timeout=400,
        )  # fmt: skip
    return RaySweep(project, head_dir, uri, done, runs(uri))


def test_the_sweep_runs_on_the_existing_cluster(ray_sweep: RaySweep):
    output = ray_sweep.done.stdout + ray_sweep.done.stderr
    assert ray_sweep.done.returncode == 0, output
    assert f"Ray Launcher is launching {len(WIDTHS)} jobs" in output
    assert "Connected to Ray cluster" in output  # not a new local instance
    assert "Traceback" not in output, output


def test_every_job_has_a_finished_run_with_its_params(ray_sweep: RaySweep):
    by_job = finished_runs_by_job(ray_sweep.runs, len(WIDTHS), ray_sweep.done.stderr)
    for job, run in by_job.items():
        assert run.data.params["width"] == str(WIDTHS[job])
        assert run.data.params["epochs"] == "1"
        assert run.data.tags["stage"] == "train"
        assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    [sweep] = {r.data.tags["sweep"] for r in ray_sweep.runs}
    assert sweep.startswith("multirun/")


def test_jobs_run_in_the_project_not_where_ray_started(ray_sweep: RaySweep):
    [sweep] = {r.data.tags["sweep"] for r in ray_sweep.runs}
    for run in ray_sweep.runs:
        job_dir = ray_sweep.project / sweep / run.data.tags["sweep_job"]
        record = json.loads((job_dir / "runs" / "train.json").read_text())
        assert record["run_id"] == run.info.run_id
        assert record["tracking_uri"] == ray_sweep.uri
        assert (job_dir / "models" / "model.keras").is_file()
    assert not (ray_sweep.head_dir / "multirun").exists()
    assert not (ray_sweep.head_dir / "mlflow.db").exists()


def test_each_job_uses_the_cpu_ray_reserved_for_it(ray_sweep: RaySweep):
    """ray_cluster.yaml reserves num_cpus=1 per job; Ray exports OMP_NUM_THREADS=1 to the task
    and `threads: 0` follows it, so 2 jobs on 2 CPUs don't oversubscribe them."""
    [sweep] = {r.data.tags["sweep"] for r in ray_sweep.runs}
    for run in ray_sweep.runs:
        log = (ray_sweep.project / sweep / run.data.tags["sweep_job"] / "train.log").read_text()
        assert "TensorFlow threads: 1 (OMP_NUM_THREADS)" in log, log


def test_a_node_without_the_project_dir_says_what_to_do(tmp_path: Path, monkeypatch):
    from pipeline.infra.ray_worker import enter_project_dir

    missing = tmp_path / "not-mounted-here"
    monkeypatch.setenv("PIPELINE_PROJECT_DIR", str(missing))
    with pytest.raises(RuntimeError, match="mounts at the same path") as raised:
        enter_project_dir()
    assert str(missing) in str(raised.value)
