"""The shared tracking server, for real: a PostgreSQL cluster made by scripts/local-postgres, an
`mlflow server` started by scripts/tracking-server on it with a local artifacts destination, and
real stage processes (`python -m pipeline.train`, a parallel `python -m pipeline.crossval -m`
sweep) logging to it with tracking=server. Everything is read back through the server with
mlflow.MlflowClient, and then from the places the server keeps it: the `runs` table in
PostgreSQL (psycopg) and the files under the artifacts destination.

Skips only when the PostgreSQL binaries are missing. An unreachable server URI is covered by
tests/test_tracking.py (test_an_unreachable_tracking_server_fails_before_a_run_starts).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from run_helpers import (
    EXPERIMENT,
    PROJECT_ROOT,
    assert_png,
    cli_env,
    client,
    download,
    finished_runs_by_job,
    free_port,
    history,
    isolated_mlflow,
    prepared_digits,
    project_copy,
    run_cli,
    runs,
    stop_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPTS = PROJECT_ROOT / "scripts"
ALLOWED_NAME = "tracking.test.example"  # a DNS name the server is told to accept
WIDTHS = (8, 16)
# The sweep's own experiment, new on the server: its two jobs race to create it.
SWEEP_EXPERIMENT = "digits-server-sweep"


def postgres_bindir() -> Path | None:
    """Where initdb is, looked up here independently of the script (which must find it too)."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb") + glob.glob(
        "/usr/pgsql-*/bin/initdb"
    )
    return Path(candidates[0]).parent if candidates else None


def script_env(**extra: str) -> dict[str, str]:
    """The test's environment for the scripts: this interpreter's mlflow first on PATH, and none
    of the user's own server or cluster settings."""
    env = cli_env()
    for key in [k for k in env if k.startswith(("MLFLOW_", "LOCAL_PG_"))] + ["PG_BIN"]:
        env.pop(key, None)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    # The store, not the login, is tested here: the login is tests/test_auth_server.py's.
    env["MLFLOW_INSECURE_NO_AUTH"] = "1"
    env.update(extra)
    return env


def script(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / args[0]), *args[1:]],
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def status_of(url: str, path: str, host: str | None = None) -> int:
    """HTTP status of GET url+path, optionally with another Host header than the URL's."""
    request = urllib.request.Request(url + path, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0  # nothing answers (yet)


def libpq(uri: str) -> str:
    """SQLAlchemy's postgresql+psycopg://... as the postgresql://... URI that libpq reads."""
    return "postgresql://" + uri.split("://", 1)[1]


# --------------------------------------------------------------------------- the server


@dataclass
class Stack:
    url: str  # the tracking server, what clients use
    backend: str  # MLFLOW_BACKEND_STORE_URI, PostgreSQL
    artifacts: Path  # the server's artifacts destination
    pg_dir: Path
    server_pid: int
    seconds_to_health: float


def _stop_postgres(pg_dir: Path) -> None:
    done = script("local-postgres", "stop", str(pg_dir))
    pid_file = pg_dir / "postmaster.pid"
    if done.returncode != 0 and pid_file.exists():  # the script failed: fast shutdown by hand
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL not installed: apt-get install postgresql")
    root = tmp_path_factory.mktemp("tracking-server")
    # Run as root, PostgreSQL runs as 'postgres', which cannot pass pytest's 0700 basetemp: its
    # data directory goes into a directory of its own that others may traverse (not list).
    pg_parent = Path(tempfile.mkdtemp(prefix="mlflow-pg-"))
    pg_parent.chmod(0o711)
    pg_dir = pg_parent / "postgres"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, pg_parent, ignore_errors=True)
        cleanup.callback(_stop_postgres, pg_dir)
        started = script("local-postgres", "start", str(pg_dir), LOCAL_PG_PORT=str(free_port()))
        assert started.returncode == 0, started.stderr
        backend = started.stdout.strip()
        env = script_env(
            MLFLOW_BACKEND_STORE_URI=backend,
            MLFLOW_ARTIFACTS_DESTINATION=str(root / "artifacts"),
            MLFLOW_PORT=str(port),
            MLFLOW_WORKERS="2",
            MLFLOW_SERVER_ALLOWED_HOSTS=f"{ALLOWED_NAME}:*,127.0.0.1:*,localhost:*",
        )
        with open(log, "w", encoding="utf-8") as out:
            server = subprocess.Popen(
                [str(SCRIPTS / "tracking-server")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own process group, so teardown gets every worker
            )
        cleanup.callback(stop_server, server)
        begun = time.monotonic()
        while status_of(url, "/health") != 200:
            if server.poll() is not None or time.monotonic() - begun > 120:
                pytest.fail(f"the tracking server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Stack(url, backend, root / "artifacts", pg_dir, server.pid, time.monotonic() - begun)


@pytest.fixture(scope="module")
def trained(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("train"))
    returncode, log = run_cli(
        project,
        "pipeline.train",
        "debug=fast",
        "epochs=2",
        "width=16",
        "tracking=server",
        f"tracking.uri={stack.url}",
    )
    assert returncode == 0, log
    record = json.loads((project / "runs" / "train.json").read_text())
    return {
        "project": project,
        "record": record,
        "run": client(stack.url).get_run(record["run_id"]),
    }


@pytest.fixture(scope="module")
def sweep(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two crossval jobs at once (joblib), 2 folds each: concurrent clients of one server, both
    opening an experiment that does not exist yet."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("sweep"))
    sweep_dir = project / "multirun"
    returncode, log = run_cli(
        project,
        "pipeline.crossval",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "debug=fast",
        f"width={','.join(map(str, WIDTHS))}",
        "tracking=server",
        f"tracking.uri={stack.url}",
        f"tracking.experiment={SWEEP_EXPERIMENT}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert returncode == 0, log
    everything = runs(stack.url, SWEEP_EXPERIMENT)
    found = [r for r in everything if r.data.tags.get("sweep") == str(sweep_dir)]
    return {"dir": sweep_dir, "runs": found, "all": everything, "log": log}


# --------------------------------------------------------------------------- the server itself


def test_the_server_runs_as_the_scripts_process_on_postgres(stack: Stack):
    # exec: the pid the script was started as is mlflow itself, so a supervisor's SIGTERM reaches
    # it (and mlflow forwards it to its workers).
    cmdline = Path(f"/proc/{stack.server_pid}/cmdline").read_bytes().split(b"\0")
    assert b"server" in cmdline and any(part.endswith(b"mlflow") for part in cmdline), cmdline
    # The database password is passed in the environment, never on the command line (ps).
    password = stack.backend.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert password and password.encode() not in b" ".join(cmdline)
    assert stack.backend.startswith("postgresql+psycopg://mlflow:")
    assert status_of(stack.url, "/health") == 200
    print(f"tracking server answered /health {stack.seconds_to_health:.1f} s after start")


def test_postgres_listens_on_loopback_with_its_socket_in_the_data_dir(stack: Stack):
    import psycopg

    sockets = [p for p in stack.pg_dir.glob(".s.PGSQL.*") if p.is_socket()]
    port = stack.backend.rsplit(":", 1)[1].split("/")[0]
    assert [p.name for p in sockets] == [f".s.PGSQL.{port}"]
    with psycopg.connect(libpq(stack.backend), connect_timeout=5) as connection:
        [(listen,)] = connection.execute("SHOW listen_addresses").fetchall()
    assert listen == "127.0.0.1"
    wrong = libpq(stack.backend).replace("mlflow:", "mlflow:not-", 1)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


def test_local_postgres_start_again_and_status_give_the_same_uri(stack: Stack):
    again = script("local-postgres", "start", str(stack.pg_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == stack.backend
    assert "already running" in again.stderr
    status = script("local-postgres", "status", str(stack.pg_dir))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1] == stack.backend


def test_a_dns_name_needs_mlflow_server_allowed_hosts(stack: Stack):
    """MLflow 3 answers /health for any Host header but rejects API calls from names it does not
    know (DNS-rebinding protection): what a team server reached as mlflow.lab.example meets."""
    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    port = stack.url.rsplit(":", 1)[1]
    assert status_of(stack.url, api) == 200
    assert status_of(stack.url, api, host=f"{ALLOWED_NAME}:{port}") == 200
    assert status_of(stack.url, "/health", host=f"mlflow.other.example:{port}") == 200
    assert status_of(stack.url, api, host=f"mlflow.other.example:{port}") == 403


# --------------------------------------------------------------------------- a train run


def test_the_train_run_is_finished_with_its_params_and_metrics(stack: Stack, trained):
    run = trained["run"]
    assert run.info.status == "FINISHED"
    assert trained["record"]["tracking_uri"] == stack.url
    assert run.data.tags["stage"] == "train"
    assert client(stack.url).get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.params["epochs"] == "2"
    assert run.data.params["width"] == "16"
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
    metrics = json.loads((trained["project"] / "metrics" / "train.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert [step for step, _ in history(stack.url, run.info.run_id, "train_loss")] == [1, 2]


def test_the_model_is_stored_by_the_server_and_downloaded_through_it(
    stack: Stack, trained, tmp_path: Path
):
    run_id = trained["run"].info.run_id
    # mlflow-artifacts: clients send and fetch artifacts over HTTP; only the server touches the
    # artifact store.
    assert trained["run"].info.artifact_uri.startswith("mlflow-artifacts:/")
    # runs:/<id>/model resolves to MLflow 3's logged model through the *global* store (3.17
    # ignores the client's own tracking_uri there), so set it, as users do with
    # MLFLOW_TRACKING_URI.
    with isolated_mlflow(tmp_path, uri=stack.url):
        mlflow_client = client(stack.url)
        experiment_id = trained["run"].info.experiment_id
        [model] = [
            m
            for m in mlflow_client.search_logged_models([experiment_id])
            if m.source_run_id == run_id and m.name == "model"  # not the served one
        ]
        listed = {a.path for a in mlflow_client.list_artifacts(run_id, "model")}
        downloaded = download(stack.url, run_id, "model", tmp_path / "download")
        figure = download(stack.url, run_id, "plots/history.png", tmp_path / "plots")
    assert "model/MLmodel" in listed, listed
    assert model.artifact_location.startswith("mlflow-artifacts:/"), model.artifact_location
    stored = stack.artifacts / model.artifact_location.removeprefix("mlflow-artifacts:/")
    files = sorted(p.relative_to(stored) for p in stored.rglob("*") if p.is_file())
    assert Path("MLmodel") in files and any(p.suffix == ".keras" for p in files), files
    for name in files:  # the download adds a registered_model_meta file of its own
        assert (downloaded / name).read_bytes() == (stored / name).read_bytes(), name
    assert f"run_id: {run_id}" in (downloaded / "MLmodel").read_text()
    assert_png(figure)


# --------------------------------------------------------------------------- a crossval sweep


def test_the_sweep_jobs_are_finished_and_share_their_sweep_tag(stack: Stack, sweep):
    parents = [r for r in sweep["runs"] if r.data.tags["stage"] == "crossval"]
    by_job = finished_runs_by_job(parents, len(WIDTHS), sweep["log"])
    for job, run in by_job.items():
        assert run.data.params["width"] == str(WIDTHS[job])
        assert run.data.params["folds"] == "2"
        assert 0 <= run.data.metrics["accuracy_mean"] <= 1
    assert {r.data.tags["sweep"] for r in parents} == {str(sweep["dir"])}


def test_each_crossval_run_has_its_nested_fold_runs(stack: Stack, sweep):
    everything = sweep["all"]
    for parent in (r for r in sweep["runs"] if r.data.tags["stage"] == "crossval"):
        children = [
            r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        ]
        assert sorted(r.data.tags["fold"] for r in children) == ["1", "2"]
        assert all(r.info.status == "FINISHED" for r in children)
        assert all(r.data.tags["stage"] == "crossval-fold" for r in children)
        accuracies = [r.data.metrics["fold_accuracy"] for r in children]
        assert parent.data.metrics["accuracy_mean"] == pytest.approx(sum(accuracies) / 2)


def test_a_job_that_loses_the_race_to_create_the_experiment_uses_the_winners(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
):
    """What the sweep above may or may not hit, made certain: this job looked the experiment up
    just before another job created it, so its own create_experiment is refused."""
    import mlflow

    from pipeline.infra.tracking import _open_store

    name = f"race-{time.time_ns()}"
    winner = _open_store(stack.url, name)
    lookup = mlflow.MlflowClient.get_experiment_by_name
    lookups: list[str] = []

    def too_early(self, experiment: str):
        lookups.append(experiment)
        return None if len(lookups) == 1 else lookup(self, experiment)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", too_early)
    assert _open_store(stack.url, name) == winner
    assert lookups == [name, name]  # missed it, was refused, looked again
    assert [e.name for e in client(stack.url).search_experiments()].count(name) == 1


# --------------------------------------------------------------------------- where it is kept


def test_the_runs_are_rows_in_postgresql(stack: Stack, trained, sweep):
    import psycopg

    seen = {r.info.run_id: r for r in runs(stack.url) + sweep["all"]}
    assert len(seen) == 1 + len(WIDTHS) * 3  # the train run, 2 crossval runs with 2 folds each
    with psycopg.connect(libpq(stack.backend), connect_timeout=5) as connection:
        rows = dict(connection.execute("SELECT run_uuid, status FROM runs").fetchall())
        parent_links = dict(
            connection.execute(
                "SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId'"
            ).fetchall()
        )
        epochs = connection.execute(
            "SELECT value FROM params WHERE run_uuid = %s AND key = 'epochs'",
            (trained["run"].info.run_id,),
        ).fetchone()
    assert rows == {run_id: "FINISHED" for run_id in seen}
    assert parent_links == {
        run_id: run.data.tags["mlflow.parentRunId"]
        for run_id, run in seen.items()
        if "mlflow.parentRunId" in run.data.tags
    }
    assert len(parent_links) == len(WIDTHS) * 2
    assert epochs == ("2",)


def test_the_artifacts_are_files_under_the_artifacts_destination(stack: Stack, trained, sweep):
    crossvals = [r for r in sweep["runs"] if r.data.tags["stage"] == "crossval"]
    for run, figure in [(trained["run"], "history.png"), *((r, "boxplot.png") for r in crossvals)]:
        folder = stack.artifacts / run.info.experiment_id / run.info.run_id / "artifacts"
        assert_png(folder / "plots" / figure)
        assert (folder / "plots" / "history.csv").stat().st_size > 0


# --------------------------------------------------------------------------- clear errors


def test_tracking_server_without_a_backend_uri_says_what_to_set():
    done = script("tracking-server")
    assert done.returncode == 1
    assert "set MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://" in done.stderr
    assert "scripts/local-postgres start" in done.stderr


def test_tracking_server_with_postgres_down_fails_fast_without_the_password():
    port = free_port()  # nothing listens there
    began = time.monotonic()
    done = script(
        "tracking-server",
        MLFLOW_BACKEND_STORE_URI=f"postgresql://mlflow:s3cret@127.0.0.1:{port}/mlflow",
        MLFLOW_PORT=str(free_port()),
    )
    assert done.returncode == 1
    assert time.monotonic() - began < 30
    [line] = done.stderr.strip().splitlines()
    assert (
        f"cannot connect to PostgreSQL at postgresql+psycopg://mlflow:***@127.0.0.1:{port}" in line
    )
    assert "Connection refused" in line
    assert "s3cret" not in done.stdout + done.stderr


def test_local_postgres_refuses_a_port_in_use(stack: Stack, tmp_path: Path):
    busy = stack.url.rsplit(":", 1)[1]  # the tracking server's port
    done = script("local-postgres", "start", str(tmp_path / "pg"), LOCAL_PG_PORT=busy)
    assert done.returncode == 1
    assert f"port {busy} on 127.0.0.1 is in use" in done.stderr
    assert not (tmp_path / "pg").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to 'postgres'")
def test_local_postgres_as_root_names_a_directory_postgres_cannot_reach(tmp_path: Path):
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL not installed: apt-get install postgresql")
    private = Path(tempfile.mkdtemp(prefix="mlflow-pg-private-"))  # 0700, root's
    try:
        done = script(
            "local-postgres", "start", str(private / "pg"), LOCAL_PG_PORT=str(free_port())
        )
        assert done.returncode == 1
        assert f"the 'postgres' user cannot reach {private}/pg: {private} is drwx------" in (
            done.stderr
        )
        assert not (private / "pg").exists()
    finally:
        shutil.rmtree(private)
