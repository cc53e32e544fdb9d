"""No secret is ever written down (issue #15): a password in a URI, the tracking store's
(tracking.uri or MLFLOW_TRACKING_URI) or a dataset mirror's, is masked as *** in everything the
project writes or prints, and a URI with credentials works, or fails saying why.

Everything is real. The store is scripts/tracking-server with its login on, on 127.0.0.1, whose
admin password is the sentinel, so the URI `http://admin:<sentinel>@127.0.0.1:PORT` both logs in
and must leak nowhere; the pipeline's own CLIs run against it (train, crossval, report, a sweep,
compare, registry), then the store (through MlflowClient and the server's files), every file of
the project (runs/, reports/, outputs/, multirun/ with Hydra's .hydra/), the artifacts and the
console are searched for it. Mirrors are a real HTTP server on 127.0.0.1 that checks the login.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

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

SENTINEL = "S3NT1NEL-pw-7c2e"  # also the server's admin password (MLflow: 12+ characters)
EXPERIMENT = "digits-secrets"


def without(text: str, *, where: str) -> None:
    assert SENTINEL not in text, f"the password leaks in {where}:\n{text[-3000:]}"


def files_holding_the_sentinel(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]


# --------------------------------------------------------------------------- redact


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "postgresql+psycopg://mlflow:PW@db:5432/mlflow",
            "postgresql+psycopg://mlflow:***@db:5432/mlflow",
        ),
        ("http://alice:PW@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
        ("https://reader:PW@mirror.lab/mnist/", "https://reader:***@mirror.lab/mnist/"),
        ("redis://:PW@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql://u:p@ss/w?rd#x@db/mlflow", "postgresql://u:***@db/mlflow"),  # unencoded
        ("x://u:p%40ss@h", "x://u:***@h"),
        # Hydra escapes ":" (and ",", "=") in the overrides it saves and logs.
        (r"tracking.uri=http\://admin\:p\,w@h\:5000", r"tracking.uri=http\://admin\:***@h\:5000"),
        (
            "dataset.mirrors=[https://a:PW@h1/,https://b:PW@h2/]",
            "dataset.mirrors=[https://a:***@h1/,https://b:***@h2/]",
        ),
        ("['https://a:PW@h1', 'https://b:PW@h2']", "['https://a:***@h1', 'https://b:***@h2']"),
        ("<td>http://a:PW@h</td>", "<td>http://a:***@h</td>"),
        ("s3://b/k?X-Amz-Signature=PW&x=1", "s3://b/k?X-Amz-Signature=***&x=1"),
        ("https://h/f?user=u&password=PW", "https://h/f?user=u&password=***"),
        ("https://h/f?a=1&amp;token=PW", "https://h/f?a=1&amp;token=***"),  # HTML-escaped
        ("http://alice:***@h", "http://alice:***@h"),  # idempotent
    ],
)
def test_redact_masks_the_password_and_keeps_the_rest(text: str, masked: str):
    from pipeline.infra.credentials import is_masked, redact

    assert redact(text) == masked
    assert is_masked(masked)


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////home/u/project/mlflow.db",
        "http://127.0.0.1:5000",
        "http://host:5000/path/x@y and more",  # a port, then a path
        "file:///data/mirror/",
        "models:/digit-classifier@champion",
        "runs:/0123/model",
        "alice@example.org",
        '{"uri":"http://h:5000","mail":"a@b"}',
        "https://h/f?page_token_count=3",
        "no URI at all: a:b@c",
    ],
)
def test_redact_leaves_text_without_a_password_alone(text: str):
    from pipeline.infra.credentials import is_masked, redact

    assert redact(text) == text
    assert not is_masked(text)


def test_redacted_masks_every_string_of_a_record():
    from pipeline.infra.credentials import redacted

    record = {"uri": "http://a:PW@h", "mirrors": ["https://b:PW@m/"], "epochs": 5, "x": None}
    assert redacted(record) == {
        "uri": "http://a:***@h",
        "mirrors": ["https://b:***@m/"],
        "epochs": 5,
        "x": None,
    }


def test_every_log_record_is_masked_whatever_its_handler():
    """A record factory, so it holds for handlers configured later (Hydra's, per job) too, and
    for the formatted traceback of an exception."""
    from pipeline.infra.credentials import redact_log_records

    redact_log_records()
    redact_log_records()  # idempotent: one factory
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_secrets")
    logger.addHandler(handler)
    try:
        logger.warning("store %s is unreachable", f"http://admin:{SENTINEL}@h:1")
        try:
            raise RuntimeError(f"API request to http://admin:{SENTINEL}@h:1/api failed")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    without(output, where="the log")
    assert "store http://admin:***@h:1 is unreachable" in output
    assert "API request to http://admin:***@h:1/api failed" in output


# --------------------------------------------------------------------------- a login in a URI


def _login_checking(user: str, password: str, seen: list[str | None]):
    """A route that records the Authorization header and answers 401 without the right one."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def route(handler: SimpleHTTPRequestHandler) -> bool:
        seen.append(handler.headers.get("Authorization"))
        if seen[-1] == expected:
            return False  # serve the file
        handler.send_response(401, "Unauthorized")
        handler.send_header("WWW-Authenticate", 'Basic realm="mirror"')
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return True

    return route


def test_a_server_in_a_uri_with_credentials_is_reached_with_them(http_server, tmp_path: Path):
    """urllib would look up "admin:<password>@127.0.0.1" in DNS: the server, though up, was
    reported unreachable. Now the login goes as HTTP Basic authentication."""
    from pipeline.infra.tracking import check_server

    (tmp_path / "health").write_text("OK")
    seen: list[str | None] = []
    served = http_server(tmp_path, routes={"/health": _login_checking("admin", SENTINEL, seen)})
    check_server(served.url.replace("http://", f"http://admin:{SENTINEL}@"))
    assert len(seen) == 1 and seen[0] is not None


def test_a_mirror_with_credentials_is_fetched_with_them_and_logged_masked(
    http_server, idx_files: dict[str, str], mirror_dir: Path, tmp_path: Path, caplog
):
    from pipeline.infra.credentials import redact_log_records
    from pipeline.infra.download import fetch_file

    redact_log_records()
    name, sha = next(iter(idx_files.items()))
    seen: list[str | None] = []
    served = http_server(mirror_dir, routes={f"/{name}": _login_checking("reader", SENTINEL, seen)})
    mirror = served.url.replace("http://", f"http://reader:{SENTINEL}@")
    with caplog.at_level(logging.INFO, logger="pipeline.infra.download"):
        path = fetch_file(name, sha, [mirror], tmp_path)
    assert path.is_file() and seen and seen[-1] is not None
    without(caplog.text, where="the fetch log")
    assert (
        f"fetched from {served.url.replace('http://', 'http://reader:***@')}{name}" in caplog.text
    )


def test_a_mirror_refusing_the_login_says_401_with_the_password_masked(
    cli, http_server, idx_files: dict[str, str], mirror_dir: Path, tmp_path: Path
):
    """The fetch stage's CLI: its error, its log and Hydra's saved configs, all masked."""
    routes = {f"/{name}": _login_checking("reader", "another-password", []) for name in idx_files}
    served = http_server(mirror_dir, routes=routes)
    mirror = served.url.replace("http://", f"http://reader:{SENTINEL}@")
    done = cli(tmp_path, "pipeline.fetch", f"dataset.mirrors=[{mirror}]", "dataset.retries=0")
    assert done.returncode == 1, done.stdout + done.stderr
    without(done.stdout + done.stderr, where="the console")
    masked = served.url.replace("http://", "http://reader:***@")
    assert f"{masked}train-images-idx3-ubyte.gz: HTTP 401 Unauthorized" in done.stderr
    assert not files_holding_the_sentinel(tmp_path)
    assert list(tmp_path.glob("outputs/*/*/.hydra/overrides.yaml"))


# --------------------------------------------------------------------------- failures, masked


def test_an_unreachable_store_with_credentials_is_named_masked(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    """The stage says why (connection refused), with the password masked, in its one line; its
    .hydra/ configs and log hold the URI masked too."""
    port = free_port()  # nothing listens there
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    done = run_module(
        "pipeline.train",
        "debug=fast",
        f"tracking.uri=http://admin:{SENTINEL}@127.0.0.1:{port}",
        cwd=project,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    without(done.stdout + done.stderr, where="the console")
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: MLflow tracking server http://admin:***@127.0.0.1:{port} is unreachable ("
    ), line
    assert "Connection refused" in line
    assert not files_holding_the_sentinel(project)
    [saved] = project.glob("outputs/*/*/.hydra/overrides.yaml")
    assert f"tracking.uri=http://admin:***@127.0.0.1:{port}" in saved.read_text()


def test_a_store_host_that_does_not_resolve_is_named_masked(tmp_path: Path):
    """A command (compare): the DNS failure is the reason given, the password masked."""
    uri = f"http://admin:{SENTINEL}@no-such-host.invalid:5000"
    done = run_module("pipeline.compare", "--sweep", "latest", "--tracking-uri", uri, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    without(done.stdout + done.stderr, where="the console")
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        "error: MLflow tracking server http://admin:***@no-such-host.invalid:5000 is unreachable"
    ), line
    assert "Name or service not known" in line or "name resolution" in line, line


# --------------------------------------------------------------------------- the whole pipeline


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """scripts/tracking-server with its login on, on 127.0.0.1, an sqlite store, the sentinel as
    the admin password -> (its URL, its project: .tracking/, the store, its log)."""
    project = tmp_path_factory.mktemp("secrets-server")
    (project / "scripts").mkdir()
    (project / "scripts" / "tracking-server").symlink_to(
        PROJECT_ROOT / "scripts" / "tracking-server"
    )
    port = free_port()
    env = {k: v for k, v in cli_env().items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{project}/mlflow.db",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_AUTH_ADMIN_PASSWORD=SENTINEL,
    )
    with open(project / "server.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [str(project / "scripts" / "tracking-server")],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown ends every worker
        )
    url = f"http://127.0.0.1:{port}"
    try:
        begun = time.monotonic()
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=5):
                break
            if process.poll() is not None or time.monotonic() - begun > 180:
                pytest.fail(f"no tracking server:\n{(project / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, project
    finally:
        stop_server(process)


def with_password(url: str, password: str = SENTINEL) -> str:
    return url.replace("http://", f"http://admin:{password}@")


def masked(url: str) -> str:
    return url.replace("http://", "http://admin:***@")


MIRROR = f"https://reader:{SENTINEL}@mirror.lab.example/mnist/"


@pytest.fixture(scope="module")
def pipeline_run(server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stages and commands, with the password in tracking.uri or only in
    MLFLOW_TRACKING_URI, and in a (recorded, unused) mirror: train, crossval, report, a two-job
    crossval sweep, compare and registry. -> the project and every command's console output."""
    url, _ = server
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("client"))
    in_env = {**cli_env(), "MLFLOW_TRACKING_URI": with_password(url)}
    stage = ("debug=fast", f"tracking.experiment={EXPERIMENT}", f"dataset.mirrors=[{MIRROR}]")
    commands = [
        ("pipeline.train", (*stage, f"tracking.uri={with_password(url)}"), None),
        ("pipeline.crossval", stage, in_env),
        ("pipeline.report", ("debug=fast",), in_env),
        (
            "pipeline.crossval",
            ("-m", *stage, f"tracking.uri={with_password(url)}", "width=16,32"),
            None,
        ),
        ("pipeline.compare", ("--sweep", "latest", "--tracking-uri", with_password(url)), None),
        ("pipeline.registry", (), in_env),
    ]
    consoles = {}
    for module, args, env in commands:
        done = run_module(module, *args, cwd=project, env=env, timeout=400)
        consoles[f"{module} {' '.join(args[:1])}"] = done.stdout + done.stderr
        assert done.returncode == 0, f"{module} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return {"project": project, "consoles": consoles}


@pytest.mark.slow
def test_the_console_shows_the_store_masked(server, pipeline_run):
    url, _ = server
    for command, console in pipeline_run["consoles"].items():
        without(console, where=f"the console of {command}")
    assert f"Store: `{masked(url)}`" in pipeline_run["consoles"]["pipeline.compare --sweep"]
    # Hydra's launcher logs each job's overrides: masked (Hydra escapes ":").
    assert masked(url).replace(":", "\\:") in pipeline_run["consoles"]["pipeline.crossval -m"]
    # registry's success line names the store it registered in.
    assert f" in {masked(url)}; models:/" in pipeline_run["consoles"]["pipeline.registry "]


@pytest.mark.slow
def test_no_param_tag_or_run_name_in_the_store_holds_the_password(
    server, pipeline_run, monkeypatch
):
    import mlflow

    url, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SENTINEL)
    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    ids = [client.get_experiment_by_name(name).experiment_id
           for name in (EXPERIMENT, f"{EXPERIMENT}-comparisons")]  # fmt: skip
    found = client.search_runs(ids, max_results=1000)
    stages = sorted(r.data.tags.get("stage", "") for r in found)
    assert stages.count("train") == 1 and stages.count("compare") == 1, stages
    assert stages.count("crossval") == 3 and stages.count("crossval-fold") == 6, stages
    for run in found:
        for where, values in (
            ("params", run.data.params),
            ("tags", run.data.tags),
            ("run name", {"name": run.info.run_name}),
        ):
            without(repr(values), where=f"the {where} of run {run.info.run_id}")
    parents = [r for r in found if r.data.tags.get("stage") in ("train", "crossval")]
    # Where a run is logged and where its data comes from are not params at all.
    assert not [r for r in parents if {"tracking.uri", "dataset.mirrors"} & set(r.data.params)]
    [version] = client.search_model_versions("name = 'digit-classifier'")
    without(repr(version), where="the registered model version")


@pytest.mark.slow
def test_no_file_of_the_project_nor_of_the_store_holds_the_password(server, pipeline_run):
    """runs/*.json, reports/, compare/, outputs/ and multirun/ (Hydra's .hydra/*.yaml,
    multirun.yaml, the job logs), and on the server's side the store's database and the
    artifacts (the reports, models, plots)."""
    url, server_project = server
    project = pipeline_run["project"]
    assert list(project.glob("outputs/*/*/.hydra/config.yaml"))
    assert list(project.glob("multirun/*/*/multirun.yaml"))
    assert list(server_project.glob(".tracking/artifacts/**/report.html"))
    assert not files_holding_the_sentinel(project)
    assert not files_holding_the_sentinel(server_project)
    record = json.loads((project / "runs" / "train.json").read_text())
    assert record["tracking_uri"] == masked(url)
    assert record["config"]["dataset"]["mirrors"] == [MIRROR.replace(SENTINEL, "***")]
    assert masked(url) in (project / "reports" / "report.md").read_text()


@pytest.mark.slow
def test_a_reader_without_the_password_says_where_to_give_it(server, pipeline_run):
    """registry reads runs/train.json, whose store has its password masked: without the same
    store in MLFLOW_TRACKING_URI or --tracking-uri it stops in one line naming the fix."""
    url, _ = server
    done = run_module("pipeline.registry", cwd=pipeline_run["project"])
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: the run was logged to {masked(url)}, whose password"), line
    assert "--tracking-uri" in line and "MLFLOW_TRACKING_URI" in line


@pytest.mark.slow
def test_a_wrong_password_says_401_masked(server, tmp_path: Path):
    url, _ = server
    uri = with_password(url, f"wrong-{SENTINEL}")
    done = run_module("pipeline.compare", "--sweep", "latest", "--tracking-uri", uri, cwd=tmp_path)
    assert done.returncode == 1
    without(done.stdout + done.stderr, where="the console")
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot open MLflow store {masked(url)}: "), line
    assert "401" in line
