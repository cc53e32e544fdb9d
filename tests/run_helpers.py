"""The one home of the tests' shared helpers: plain functions and constants (the fixtures that
wrap them are in conftest.py). No test module imports another (tests/test_architecture.py).

Everything is real: the digits dataset is fetched and preprocessed with the pipeline's own code,
configs are composed from conf/ with Hydra's compose API and validated, and every MLflow store
is a real sqlite database read back through mlflow.MlflowClient.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Found here, not taken from pipeline.infra.paths: test_params checks the pipeline's against it.
CONF_DIR = PROJECT_ROOT / "conf"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "digits-digits"  # experiment_name() for dataset=digits with tracking.experiment=null
STAGES = ("fetch", "preprocess", "train", "crossval", "report")  # in dvc.yaml's order
# Every stage of dvc.yaml: first `params` (params.yaml against the schema), then the pipeline's.
DVC_STAGES = ("params", *STAGES)
# The sections every report has (its <h2> headings start with these).
REPORT_SECTIONS = (
    "Test result",
    "Dataset",
    "Training curves",
    "Confusion matrix",
    "Misclassified",
    "Cross-validation",
    "Provenance",
)

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


def fill(disk: Path, leave: int) -> Path:
    """Fill the file system of `disk` with one file until about `leave` bytes are free (rounded
    to its blocks); delete the returned file to free the space again."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
    return filler


def files_under(root: Path, *outputs: str) -> dict[str, bytes]:
    """Every file of `outputs` (files or folders, relative to root) -> its bytes."""
    found = {}
    for output in outputs:
        path = root / output
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.is_file():
                found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


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


def compose(
    *overrides: str,
    config_dir: Path = CONF_DIR,
    config_name: str = "config",
    return_hydra_config: bool = False,
):
    """conf/config.yaml (or `config_name` in `config_dir`) composed by Hydra's compose API, the
    way a stage's @hydra.main does (version_base 1.3) -> a DictConfig, not yet validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(
            config_name=config_name,
            overrides=list(overrides),
            return_hydra_config=return_hydra_config,
        )


def settings(*overrides: str):
    """conf/ composed with `overrides` and validated -> the pipeline Config a stage runs with."""
    from pipeline.infra.config import validate

    return validate(compose(*overrides))


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


# --------------------------------------------------------------------------- a DVC project copy


@dataclass
class DvcProject:
    """A throw-away copy of the project (see dvc_project) and the commands run in it."""

    root: Path
    env: dict[str, str]
    first_repro: str = ""  # stdout of the first `dvc repro`, for the tests that run one

    def _call(
        self, args: tuple[str, ...], timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=self.root,
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run(
        self, *args: str, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the copy (with `env`, default the copy's); fail the test with its
        output if it fails."""
        done = self._call(args, timeout, env)
        assert done.returncode == 0, (
            f"{' '.join(args)} exited {done.returncode}\n"
            f"--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}"
        )
        return done

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, *args)

    def fails(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run a command in the copy that must fail; fail the test if it succeeds."""
        done = self._call(args, timeout)
        assert done.returncode != 0, f"{' '.join(args)} succeeded\n{done.stdout[-6000:]}"
        return done

    def dvc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("dvc", *args)

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(
            "git", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null", *args
        )

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text(encoding="utf-8"))

    def set_conf(self, pattern: str, replacement: str, name: str = "config.yaml") -> None:
        """Edit conf/<name>; the pattern must match exactly one line."""
        path = self.root / "conf" / name
        text, count = re.subn(pattern, replacement, path.read_text(encoding="utf-8"), flags=re.M)
        assert count == 1, f"{pattern!r} should match one line of conf/{name}"
        path.write_text(text, encoding="utf-8")

    def mlflow_runs(self) -> list:
        """Every run in the copy's store for the digits experiment, newest first."""
        mlflow_client = client(sqlite_uri(self.root / "mlflow.db"))
        experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, "the stages log to experiment digits-<dataset.name>"
        return mlflow_client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000
        )


def dvc_project(root: Path) -> DvcProject:
    """Copy the files git would carry (tracked, and untracked but not ignored) into `root` and
    turn the test-size preset (conf/debug/fast.yaml) on in the copy's conf/ defaults list."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if name.startswith(("tests/", "mlflow.db")) or name == "dvc.lock":
            continue  # the tests, and what running the pipeline in this checkout leaves
        src = PROJECT_ROOT / name
        if src.is_file():  # listed but deleted in the working tree: skip
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    project = DvcProject(root=root, env=_dvc_environment())
    project.set_conf(r"^  - debug: null$", "  - debug: fast")
    return project


def _dvc_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    bin_dir = str(Path(sys.executable).parent)  # this venv: `python` in dvc.yaml, dvc
    env.update(
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        GIT_AUTHOR_NAME="Pipeline Test",
        GIT_AUTHOR_EMAIL="pipeline-test@example.invalid",
        GIT_COMMITTER_NAME="Pipeline Test",
        GIT_COMMITTER_EMAIL="pipeline-test@example.invalid",
        no_proxy="127.0.0.1,localhost",
        NO_PROXY="127.0.0.1,localhost",
        # DVC runs each stage through $SHELL (or /bin/sh). bash execs a lone command, so DVC
        # reports the stage's own exit code; dash stays in between and dies of a Ctrl-C itself,
        # which DVC reports as "exited with -2" whatever the stage did (CI has no $SHELL).
        SHELL=shutil.which("bash") or "/bin/bash",
    )
    return env


# --------------------------------------------------------------------------- digit images


@dataclass(frozen=True)
class TrainedDigits:
    """The digits model conftest's `trained_digits` trains once per session, and what it knows."""

    root: Path
    model: Path  # the .keras file the train stage saved
    run_id: str
    tracking_uri: str
    test_images: np.ndarray  # (N, 8, 8) float32 in [0, 1]
    test_labels: np.ndarray  # (N,)
    test_accuracy: float

    @property
    def run_model_uri(self) -> str:
        return f"runs:/{self.run_id}/model"

    @property
    def served_model_uri(self) -> str:
        """The run's served model (images in: pipeline.infra.serving)."""
        return f"runs:/{self.run_id}/served"


# The ways people store a digit, as render() writes them.
STYLES = (
    "dark-on-light.png",
    "light-on-dark.png",
    "colour.jpg",
    "transparent.png",
    "off-centre.png",
)


def _grey(digit: np.ndarray, size: int, resample: int = Image.Resampling.NEAREST) -> Image.Image:
    """An 8x8 digit in [0, 1] (light on dark) as a size x size grey image, light on dark."""
    image = Image.fromarray(np.round(digit * 255).astype(np.uint8), mode="L")
    return image.resize((size, size), resample)


def _inverted(image: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image))


def render(digit: np.ndarray, style: str, path: Path, index: int = 0) -> Path:
    """Save an 8x8 test digit as an ordinary image file in one of the STYLES; returns the path."""
    if style == "dark-on-light.png":
        _inverted(_grey(digit, 80)).save(path)
    elif style == "light-on-dark.png":
        _grey(digit, 80).save(path)
    elif style == "colour.jpg":  # dark blue ink on cream paper, smooth edges, lossy
        ink = np.asarray(_grey(digit, 96, Image.Resampling.BICUBIC), dtype=np.float32)[..., None]
        ink = ink / 255
        paper, pen = np.array([250, 244, 228]), np.array([25, 35, 140])
        rgb = np.round(paper * (1 - ink) + pen * ink).astype(np.uint8)
        Image.fromarray(rgb, mode="RGB").save(path, quality=85)
    elif style == "transparent.png":  # black ink, the digit in the alpha channel
        rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
        rgba.putalpha(_grey(digit, 80))
        rgba.save(path)
    elif style == "off-centre.png":  # a large page, grey paper, the digit somewhere off-centre
        ink = np.asarray(_grey(digit, 80), dtype=np.float32) / 255
        page = np.full((180, 260), 225, dtype=np.float32)
        top, left = 10 + (index * 37) % 80, 15 + (index * 53) % 150
        page[top : top + 80, left : left + 80] = 225 - 190 * ink
        Image.fromarray(np.round(page).astype(np.uint8), mode="L").save(path)
    else:
        raise ValueError(style)
    return path


def run_predict(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline.predict ARGS` in `cwd`; env: cli_env(), without MLFLOW_TRACKING_URI."""
    return run_module("pipeline.predict", *args, cwd=cwd, env=env)


def parse_json(result: subprocess.CompletedProcess[str]) -> list[dict]:
    """The --json answer of a predict run that must have succeeded."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stop_server(process: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True (MLflow's tracking server, `mlflow
    models serve`): SIGTERM, which mlflow forwards to its uvicorn workers; then SIGKILL whatever
    is left of its process group."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The whole command failed (exit 1) with exactly one `error:` line on stderr, nothing on
    stdout and no traceback; that line holds every needle."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------ read-only and full disks


def _mount(*args: str) -> None:
    """`mount ARGS` as root; skips the test, with the reason, where this process cannot mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a read-only or full file system is a mount (chmod stops no root)")
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")


def _unmount(path: Path) -> None:
    # Lazy: a process of the test that still has a file open there must not make it fail.
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (a directory) read-only for the block, to root too: a read-only bind mount of it
    onto itself (EROFS for every write below it), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _unmount(path)


@contextlib.contextmanager
def full_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    """A small tmpfs mounted on `path` (created if missing) for the block; fill it with
    fill_up. Unmounted afterwards, with what was written there."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _unmount(path)


def fill_up(folder: Path) -> Path:
    """Write folder/filler until its file system is full (ENOSPC); returns the file (remove it
    to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    return filler


# --------------------------------------------------------------------------- processes


def descendants(pid: int) -> list:
    """The live child processes of `pid`, their children and so on (psutil.Process objects,
    which tell a later process reusing a pid from the one seen here)."""
    import psutil  # installed with DVC

    return psutil.Process(pid).children(recursive=True)


def still_alive(processes: list, seconds: float) -> list:
    """Those of `processes` still running (zombies count as gone) after waiting up to
    `seconds` for them to end."""
    import psutil

    def running(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + seconds
    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive
