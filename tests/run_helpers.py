"""Helpers shared by the train, crossval, tracking and sweep tests (not fixtures: plain functions,
so each test module can wrap them in its own fixtures without depending on conftest.py).

Everything is real: the digits dataset is fetched and preprocessed with the pipeline's own code,
configs are composed from conf/ with Hydra's compose API and validated, and every MLflow store
is a real sqlite database read back through mlflow.MlflowClient.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "digits-digits"  # experiment_name() for dataset=digits with tracking.experiment=null

_cache: dict[str, Path] = {}


def prepared_digits(factory: pytest.TempPathFactory) -> Path:
    """The digits dataset fetched and preprocessed once per session; do not modify it."""
    if "prepared" not in _cache:
        from pipeline.fetch import fetch
        from pipeline.infra.config import DatasetConfig
        from pipeline.preprocess import preprocess

        root = factory.mktemp("digits-data")
        digits = DatasetConfig(name="digits")
        fetch(digits, root / "raw")
        train, test = digits.train, digits.test
        preprocess(
            root / "raw" / "digits",
            root / "prepared",
            "digits",
            train=(train.images, train.labels),
            test=(test.images, test.labels),
        )
        _cache["prepared"] = root / "prepared"
    return _cache["prepared"]


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on once this returns (for a server the test starts, or
    a connection the test wants refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def temp_files(root: Path) -> list[Path]:
    """Every temporary file atomic_path may have left anywhere under `root`."""
    return sorted(root.rglob(".*.tmp*"))


def names_key(message: str, key: str) -> bool:
    """True if `message` contains the full dotted `key` as a token (not just its last part)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message) is not None


def sqlite_uri(db: Path) -> str:
    return f"sqlite:///{db}"


def new_store(factory: pytest.TempPathFactory, dest_dir: Path) -> str:
    """A store of its own in dest_dir/mlflow.db: a copy of an empty, fully migrated MLflow
    database made once per session (creating one costs ~5 s of schema migrations)."""
    if "store" not in _cache:
        root = factory.mktemp("mlflow-template")
        template = root / "mlflow.db"
        with isolated_mlflow(root):
            import mlflow

            mlflow.MlflowClient(sqlite_uri(template)).search_experiments()
        _cache["store"] = template
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_cache["store"], dest_dir / "mlflow.db")
    return sqlite_uri(dest_dir / "mlflow.db")


def compose(*overrides: str):
    """Compose conf/config.yaml with Hydra's compose API and validate it -> pipeline Config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.infra.config import validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(hydra_compose(config_name="config", overrides=list(overrides)))


@contextlib.contextmanager
def isolated_mlflow(cwd: Path, uri: str | None = None) -> Iterator[None]:
    """Run pipeline code in `cwd` (MLflow puts a new experiment's artifacts under ./mlruns) with
    `uri` as MLflow's global store if given, then restore the working directory and the global
    tracking URI. mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would otherwise
    leak into later tests' subprocesses."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_cwd = Path.cwd()
    previous_uri = tracking_utils._tracking_uri
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(cwd)
    if uri is not None:
        tracking_utils.set_tracking_uri(uri)
    try:
        yield
        import mlflow

        assert mlflow.active_run() is None, "pipeline code left an MLflow run active"
    finally:
        os.chdir(previous_cwd)
        tracking_utils.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def runs(uri: str, experiment: str = EXPERIMENT) -> list:
    """All runs of `experiment` in the store (oldest first); [] if it does not exist yet."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return mlflow_client.search_runs(
        [found.experiment_id], order_by=["attribute.start_time ASC"], max_results=1000
    )


def finished_runs_by_job(found: list, jobs: int, log: str = "") -> dict:
    """A sweep's runs keyed by their Hydra job number, after checking that each of the `jobs`
    jobs left exactly one run and that it FINISHED."""
    assert len(found) == jobs, log
    assert all(r.info.status == "FINISHED" for r in found), [r.info.status for r in found]
    by_job = {int(r.data.tags["sweep_job"]): r for r in found}
    assert sorted(by_job) == list(range(jobs)), sorted(by_job)
    return by_job


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric's history, ordered by step."""
    points = client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def download(uri: str, run_id: str, artifact: str, dst: Path) -> Path:
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=uri
        )
    )


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 1000, f"{path} is suspiciously small ({len(data)} bytes)"


def project_copy(prepared: Path, root: Path) -> Path:
    """A project directory for a stage CLI: root/data/prepared holding the prepared digits."""
    shutil.copytree(prepared, root / "data" / "prepared")
    return root


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the command line names the store
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_cli(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """Start `python -m <args>` with this interpreter in `cwd`; output goes to cwd/cli.log."""
    log = open(cwd / "cli.log", "w", encoding="utf-8")  # noqa: SIM115  # closed with the process
    try:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        log.close()  # the child holds its own copy of the descriptor


@contextlib.contextmanager
def reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Yield `process`; kill it on the way out if it still runs (a failed or timed-out test)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_cli(cwd: Path, *args: str, timeout: float = 300) -> tuple[int, str]:
    """Run `python -m <args>` in `cwd` to the end; returns its exit code and cwd/cli.log."""
    with reaped(start_cli(cwd, *args)) as process:
        returncode = process.wait(timeout=timeout)
    return returncode, (cwd / "cli.log").read_text()


def run_module(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> ARGS` in `cwd` with its output captured; `env` defaults to cli_env()."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
