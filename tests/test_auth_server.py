"""The tracking server's login, for real: scripts/tracking-server started with MLflow's basic-auth
app (its default) on 127.0.0.1, an sqlite backend store, and real clients: urllib and
mlflow.MlflowClient without credentials (refused, 401), the pipeline's own CLI with
MLFLOW_TRACKING_USERNAME/PASSWORD (a small sweep), and a second user who may read but not write
what the admin logged (default_permission READ) until granted EDIT.

The script is started through a symlink in a temporary project, so its `.tracking/` (the auth
database, the artifacts) is the temporary project's, not the repository's. A non-loopback bind
without a login, and the opt-out, are checked without binding anything.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from run_helpers import (
    PROJECT_ROOT,
    cli_env,
    free_port,
    prepared_digits,
    project_copy,
    run_module,
    stop_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPT = PROJECT_ROOT / "scripts" / "tracking-server"
ADMIN = "admin"
# A sentinel: found in any log line, file or command line, it is a leak.
PASSWORD = "Sentinel-Admin-Pw-7f3a91"
COLLEAGUE, COLLEAGUE_PASSWORD = "colleague", "Colleague-Pw-55d0e2"
WIDTHS = (16, 32)
SWEEP_EXPERIMENT = "digits-auth-sweep"
API = "/api/2.0/mlflow/experiments/search?max_results=1"
DENIED = "error code 403 != 200. Response body: 'Permission denied'"  # how MlflowClient says it


def script_env(**extra: str) -> dict[str, str]:
    """This interpreter's mlflow first on PATH, none of the user's server settings or MLflow
    credentials, plus `extra`."""
    env = cli_env()
    for key in [k for k in env if k.startswith("MLFLOW_")]:
        env.pop(key, None)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    env.update(extra)
    return env


def tracking_server(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/tracking-server ARGS, as `project`'s own (an sqlite store in it), run to its end."""
    env.setdefault("MLFLOW_BACKEND_STORE_URI", f"sqlite:///{project}/mlflow.db")
    return subprocess.run(
        [str(project / "scripts" / "tracking-server"), *args],
        cwd=project,
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def project_with_script(root: Path) -> Path:
    """A directory whose scripts/tracking-server is the repository's (a symlink): the script's
    project root, and so its .tracking/, is `root`."""
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "tracking-server").symlink_to(SCRIPT)
    return root


def status_of(url: str, user: str | None = None, password: str | None = None) -> int:
    """HTTP status of GET url, with HTTP Basic credentials if given."""
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0  # nothing answers (yet)


@contextlib.contextmanager
def logged_in(monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None = None):
    """MLflow clients in this process as `user` (None: without credentials)."""
    with monkeypatch.context() as patch:
        for key, value in (("USERNAME", user), ("PASSWORD", password)):
            if value is None:
                patch.delenv(f"MLFLOW_TRACKING_{key}", raising=False)
            else:
                patch.setenv(f"MLFLOW_TRACKING_{key}", value)
        yield


def client_env(user: str | None = None, password: str | None = None) -> dict[str, str]:
    """The environment of a pipeline CLI logging in as `user` (None: without credentials)."""
    env = cli_env()
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    if user is not None:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=str(password))
    return env


def client(url: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=url, registry_uri=url)


# --------------------------------------------------------------------------- without a login


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "mlflow.lab.example"])
def test_a_non_loopback_bind_without_a_login_is_refused_in_one_line(tmp_path: Path, host: str):
    project = project_with_script(tmp_path)
    port = free_port()
    done = tracking_server(project, MLFLOW_HOST=host, MLFLOW_PORT=str(port))
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    shown = f"[{host}]" if ":" in host else host
    assert line.startswith(
        f"scripts/tracking-server: error: refusing to serve http://{shown}:{port} without a login:"
        " set MLFLOW_AUTH_ADMIN_PASSWORD"
    ), line
    assert "MLFLOW_INSECURE_NO_AUTH=1" in line and "docs/SECURITY.md" in line
    assert done.stdout == ""
    assert not (tmp_path / ".tracking").exists()  # refused before anything was made


def test_on_loopback_too_the_login_needs_an_admin_password(tmp_path: Path):
    """Every user and program on the machine can reach 127.0.0.1, so the login is on there too."""
    project = project_with_script(tmp_path)
    done = tracking_server(project)
    [line] = done.stderr.strip().splitlines()
    assert done.returncode == 1
    assert "the server's login needs an admin password: set MLFLOW_AUTH_ADMIN_PASSWORD" in line
    short = tracking_server(project, MLFLOW_AUTH_ADMIN_PASSWORD="x" * 11)
    assert short.returncode == 1
    assert short.stderr.strip() == (
        "scripts/tracking-server: error: MLFLOW_AUTH_ADMIN_PASSWORD is 11 characters long; "
        "MLflow needs 12 or more"
    )
    assert "x" * 11 not in short.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"MLFLOW_INSECURE_NO_AUTH": "yes"}, "MLFLOW_INSECURE_NO_AUTH must be 1 (no login) or 0"),
        ({"MLFLOW_AUTH_DEFAULT_PERMISSION": "ALL"}, "MLFLOW_AUTH_DEFAULT_PERMISSION must be READ,"),
    ],
)
def test_a_bad_auth_setting_is_named(tmp_path: Path, setting: dict[str, str], message: str):
    done = tracking_server(
        project_with_script(tmp_path), MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD, **setting
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert message in line


@pytest.mark.parametrize(
    ("host", "warning"),
    [
        ("0.0.0.0", "WARNING: MLFLOW_INSECURE_NO_AUTH=1: NO LOGIN on http://0.0.0.0:"),
        ("127.0.0.1", "warning: MLFLOW_INSECURE_NO_AUTH=1: no login; every user and program"),
    ],
)
def test_the_explicit_opt_out_passes_with_a_warning(tmp_path: Path, host: str, warning: str):
    """MLFLOW_INSECURE_NO_AUTH=1 gets past the check, loudly. `mlflow server` is handed an option
    it does not know, so it stops at once instead of listening on every interface."""
    project = project_with_script(tmp_path)
    done = tracking_server(
        project,
        "--no-such-option",
        MLFLOW_HOST=host,
        MLFLOW_PORT=str(free_port()),
        MLFLOW_INSECURE_NO_AUTH="1",
    )
    assert done.returncode == 2, done.stderr  # click's usage error: mlflow server was reached
    assert "No such option '--no-such-option'" in done.stderr
    lines = [line for line in done.stderr.splitlines() if "MLFLOW_INSECURE_NO_AUTH" in line]
    assert len(lines) == 1 and warning in lines[0], done.stderr
    assert lines[0].endswith("(docs/SECURITY.md)")
    assert [line for line in done.stderr.splitlines() if line.endswith(", no login")]
    assert not (project / ".tracking" / "auth").exists()


# --------------------------------------------------------------------------- a server with a login


@dataclass
class Server:
    url: str
    project: Path  # the script's project root: .tracking/ is here
    workdir: Path  # the server's working directory, where MLflow's default would put its db
    log: Path
    pid: int


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = project_with_script(tmp_path_factory.mktemp("auth-project"))
    workdir = tmp_path_factory.mktemp("auth-server-cwd")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = project / "server.log"
    env = script_env(
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{project}/mlflow.db",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="2",
        MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD,
    )
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [str(project / "scripts" / "tracking-server")],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so teardown gets every worker
        )
    try:
        begun = time.monotonic()
        while status_of(url + "/health") != 200:  # /health needs no login
            if process.poll() is not None or time.monotonic() - begun > 180:
                pytest.fail(f"the tracking server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(url, project, workdir, log, process.pid)
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def sweep(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README's client set-up: the admin's credentials in the environment, the pipeline's
    own CLI, a two-job sweep (Hydra's basic launcher) logging to the server."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("client"))
    sweep_dir = project / "multirun"
    done = run_module(
        "pipeline.train",
        "-m",
        "debug=fast",
        f"width={','.join(map(str, WIDTHS))}",
        "tracking=server",
        f"tracking.uri={server.url}",
        f"tracking.experiment={SWEEP_EXPERIMENT}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=project,
        env=client_env(ADMIN, PASSWORD),
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"project": project, "dir": sweep_dir, "log": done.stdout + done.stderr}


def test_a_client_without_credentials_is_refused(server: Server, monkeypatch):
    from mlflow.exceptions import MlflowException

    assert status_of(server.url + API) == 401
    assert status_of(server.url + API, ADMIN, PASSWORD + "x") == 401
    assert status_of(server.url + API, "nobody", PASSWORD) == 401
    assert status_of(server.url + API, ADMIN, PASSWORD) == 200
    with logged_in(monkeypatch, None), pytest.raises(MlflowException, match="401"):
        client(server.url).search_experiments()


def test_the_pipeline_without_credentials_stops_before_training(
    server: Server, tmp_path_factory: pytest.TempPathFactory
):
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("anon"))
    done = run_module(
        "pipeline.train",
        "debug=fast",
        "tracking=server",
        f"tracking.uri={server.url}",
        cwd=project,
        env=client_env(),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "401" in done.stderr, done.stderr
    assert not (project / "models").exists()  # stopped before training


def test_an_authenticated_sweep_logs_its_runs(server: Server, sweep, monkeypatch):
    with logged_in(monkeypatch, ADMIN, PASSWORD):
        mlflow_client = client(server.url)
        experiment = mlflow_client.get_experiment_by_name(SWEEP_EXPERIMENT)
        found = mlflow_client.search_runs([experiment.experiment_id])
        artifacts = {
            r.info.run_id: {a.path for a in mlflow_client.list_artifacts(r.info.run_id, "plots")}
            for r in found
        }
    assert sorted(r.data.params["width"] for r in found) == sorted(map(str, WIDTHS))
    assert all(r.info.status == "FINISHED" for r in found)
    assert {r.data.tags["sweep"] for r in found} == {str(sweep["dir"])}
    # MLflow's client names the run's user after the login (its mlflow.user tag; not an audit).
    assert all(r.info.user_id == ADMIN for r in found)
    assert all("plots/history.png" in paths for paths in artifacts.values()), artifacts


def test_the_auth_database_is_owner_only_under_dot_tracking(server: Server, sweep):
    auth_dir = server.project / ".tracking" / "auth"
    database = auth_dir / "basic_auth.db"
    assert stat.S_IMODE(auth_dir.stat().st_mode) == 0o700
    for path in auth_dir.iterdir():  # the database (and any journal), the ini, the CSRF key
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with contextlib.closing(sqlite3.connect(database)) as connection:
        users = dict(connection.execute("SELECT username, is_admin FROM users").fetchall())
    assert users[ADMIN] == 1
    # MLflow's default, basic_auth.db in the working directory, is not used.
    assert not list(server.workdir.iterdir()), list(server.workdir.iterdir())
    ini = (auth_dir / "basic_auth.ini").read_text()
    assert f"database_uri = sqlite:///{database}" in ini
    assert "default_permission = READ" in ini
    # .tracking/ is ignored by git (.gitignore's /.tracking/ is the repository root's).
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".tracking/auth/basic_auth.db"],
        cwd=PROJECT_ROOT,
        check=False,
    )
    assert ignored.returncode == 0


def test_the_admin_password_is_written_nowhere(server: Server, sweep):
    """Not in the server's log, the client's output, any file of either project (the auth
    database holds a salted hash), nor any server process's command line (ps)."""
    secret = PASSWORD.encode()
    assert secret not in server.log.read_bytes()
    assert PASSWORD not in sweep["log"]
    for root in (server.project, server.workdir, sweep["project"]):
        leaks = [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]
        assert not leaks, leaks
    group = os.getpgid(server.pid)
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == group:
                assert secret not in (proc / "cmdline").read_bytes(), proc


def test_another_user_reads_but_cannot_write_until_granted(
    server: Server, sweep, monkeypatch, tmp_path: Path
):
    """default_permission READ: a colleague sees the admin's runs and models, but can neither log
    into the admin's experiment nor move the admin's @champion alias, until granted EDIT."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    with logged_in(monkeypatch, ADMIN, PASSWORD):
        admin = client(server.url)
        experiment_id = admin.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id
        run_id = admin.search_runs([experiment_id], max_results=1)[0].info.run_id
        auth = get_app_client("basic-auth", tracking_uri=server.url)
        auth.create_user(COLLEAGUE, COLLEAGUE_PASSWORD)
    # The project's own registry command, as the admin: version 1 of digit-classifier@champion.
    registered = run_module(
        "pipeline.registry",
        f"runs:/{run_id}/model",
        "--tracking-uri",
        server.url,
        cwd=tmp_path,
        env=client_env(ADMIN, PASSWORD),
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr

    with logged_in(monkeypatch, COLLEAGUE, COLLEAGUE_PASSWORD):
        colleague = client(server.url)
        assert colleague.get_run(run_id).info.status == "FINISHED"
        champion = colleague.get_model_version_by_alias("digit-classifier", "champion")
        with pytest.raises(MlflowException, match=DENIED):
            colleague.create_run(experiment_id)
        with pytest.raises(MlflowException, match=DENIED):
            colleague.set_registered_model_alias("digit-classifier", "champion", "1")
        with pytest.raises(MlflowException, match=DENIED):
            colleague.delete_experiment(experiment_id)
    assert champion.version == "1"

    with logged_in(monkeypatch, ADMIN, PASSWORD):
        auth.grant_user_permission(COLLEAGUE, "experiment", experiment_id, "EDIT")
    with logged_in(monkeypatch, COLLEAGUE, COLLEAGUE_PASSWORD):
        run = colleague.create_run(experiment_id)
        colleague.set_terminated(run.info.run_id)
        with pytest.raises(MlflowException, match=DENIED):
            colleague.delete_experiment(experiment_id)  # EDIT does not include deleting
