"""The shared fixtures (and only fixtures: plain helpers live in run_helpers.py): tiny real IDX
files, a real local HTTP server, the prepared digits dataset, a digits model trained once per
session and a runner for the stage CLIs.

Everything here is real: files are written with pipeline.core.idx, served over 127.0.0.1 by
http.server, and stages are run as `python -m pipeline.<stage>` subprocesses. Nothing touches
the network beyond 127.0.0.1.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

# Before anything imports pipeline, mlflow or tensorflow; subprocesses inherit os.environ.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
# Never let a proxy variable route the local test server's traffic off this machine.
_no_proxy = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
_no_proxy = ",".join(p for p in (_no_proxy, "127.0.0.1", "localhost") if p)
os.environ["no_proxy"] = os.environ["NO_PROXY"] = _no_proxy
# Runs whose final status a store refused are remembered under XDG_STATE_HOME
# (pipeline.infra.reconcile): keep the tests' out of the user's home.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="digit-pipeline-state-")

from run_helpers import (  # noqa: E402
    TrainedDigits,
    free_port,
    isolated_mlflow,
    new_store,
    prepared_digits,
    run_module,
    settings,
)

from pipeline.core.idx import raw_sha256, write_idx  # noqa: E402
from pipeline.infra.config import DatasetConfig  # noqa: E402

OFFLINE_HINT_KEY = "dataset=digits"


# --------------------------------------------------------------------------- tiny IDX files


# The tiny files carry MNIST's names, the schema's default dataset.train/test.
TINY = DatasetConfig()


def tiny_arrays() -> dict[str, np.ndarray]:
    """The four IDX arrays: 12 train and 6 test 28x28 uint8 images with labels 0..9."""
    rng = np.random.default_rng(1234)
    return {
        TINY.train.images: rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8),
        TINY.train.labels: (np.arange(12) % 10).astype(np.uint8),
        TINY.test.images: rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        TINY.test.labels: np.array([9, 8, 7, 0, 1, 2], dtype=np.uint8),
    }


@pytest.fixture
def idx_names() -> dict[str, tuple[str, str]]:
    """{"train": (images, labels), "test": (images, labels)}: the file names `idx_files` writes,
    as preprocess takes them (`preprocess(raw, out, name, **idx_names)`)."""
    return {
        split: (pair.images, pair.labels)
        for split, pair in (("train", TINY.train), ("test", TINY.test))
    }


@pytest.fixture
def idx_arrays() -> dict[str, np.ndarray]:
    """File name -> the array that `idx_files` writes under that name."""
    return tiny_arrays()


@pytest.fixture
def mirror_dir(tmp_path: Path) -> Path:
    """The directory `idx_files` writes into (serve it over HTTP, file:// or as a plain dir)."""
    path = tmp_path / "mirror"
    path.mkdir()
    return path


@pytest.fixture
def idx_files(mirror_dir: Path, idx_arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write the four tiny IDX .gz files into `mirror_dir`; return file name -> raw SHA-256."""
    sha = {}
    for name, array in idx_arrays.items():
        write_idx(mirror_dir / name, array)
        sha[name] = raw_sha256(mirror_dir / name)
    return sha


# --------------------------------------------------------------------------- local HTTP server


class Served(NamedTuple):
    """A running local server: its base URL (ending in '/') and the paths requested so far."""

    url: str
    requests: list[str]


# A route takes the request handler and returns True if it answered the request itself
# (False: serve the file from the directory as usual).
Route = Callable[[SimpleHTTPRequestHandler], bool]


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        route = self.server.routes.get(self.path)
        if route is not None and route(self):
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest's output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[str]
    routes: dict[str, Route]
    stop: threading.Event


@pytest.fixture
def http_server() -> Iterator[Callable[..., Served]]:
    """Factory: `http_server(directory, routes={"/name": route})` serves `directory` on
    127.0.0.1 (a free port) in a thread and returns Served(url, requests).

    `routes` overrides single paths (hang, 503, ...); a route may block on
    `handler.server.stop`, which is set when the test ends so no thread outlives it.
    """
    started: list[tuple[_Server, threading.Thread]] = []

    def start(directory: Path, routes: dict[str, Route] | None = None) -> Served:
        handler = functools.partial(_Handler, directory=str(directory))
        server = _Server(("127.0.0.1", 0), handler)
        server.requests = []
        server.routes = dict(routes or {})
        server.stop = threading.Event()
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((server, thread))
        host, port = server.server_address[:2]
        return Served(f"http://{host}:{port}/", server.requests)

    yield start
    for server, thread in started:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (connection refused)."""
    return free_port()


# --------------------------------------------------------------------------- digits dataset


def _fetch_digits(raw_dir: Path, split_seed: int = 0) -> Path:
    """Write the digits dataset's IDX files under raw_dir/digits/ (no network); return that dir."""
    from pipeline.fetch import fetch

    fetch(DatasetConfig(name="digits", split_seed=split_seed), raw_dir)
    return raw_dir / "digits"


@pytest.fixture
def fetch_digits() -> Callable[..., Path]:
    """fetch_digits(raw_dir, split_seed=0) -> raw_dir/digits holding the four IDX files."""
    return _fetch_digits


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared digits, fetched and preprocessed once per session (the same copy the
    run_helpers users get); do not modify."""
    return prepared_digits(tmp_path_factory)


# 30 epochs reach ~0.96 test accuracy on digits (width 64); 60 reach ~0.98, enough for
# test_predict.py's rendered digits (see its MIN_CORRECT).
TRAINED_EPOCHS = 60
TRAINED_WIDTH = 64


@pytest.fixture(scope="session")
def trained_digits(
    digits_prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedDigits:
    """A digits model trained once per session exactly as the pipeline does (the test-size
    preset, longer and wider; train() into a sqlite store of its own), for test_predict.py and
    test_serving.py; do not modify."""
    from pipeline.core.data import load_split
    from pipeline.infra.files import read_json
    from pipeline.train import train

    root = tmp_path_factory.mktemp("predict")
    uri = new_store(tmp_path_factory, root)
    cfg = settings(
        "debug=fast", f"epochs={TRAINED_EPOCHS}", f"width={TRAINED_WIDTH}", f"tracking.uri={uri}"
    )
    # train() makes `uri` MLflow's global store; isolated_mlflow puts the previous one back, so
    # it does not leak into later tests (or their subprocesses, through MLFLOW_TRACKING_URI).
    with isolated_mlflow(root, uri):
        metrics = train(cfg, digits_prepared, out_root=root)
    test = load_split(digits_prepared / "test.npz")
    return TrainedDigits(
        root=root,
        model=root / "models" / "model.keras",
        run_id=read_json(root / "runs" / "train.json")["run_id"],
        tracking_uri=uri,
        test_images=test.images,
        test_labels=test.labels,
        test_accuracy=metrics["test_accuracy"],
    )


# --------------------------------------------------------------------------- the stage CLIs


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """cli(cwd, "pipeline.fetch", "dataset=digits", ...) -> CompletedProcess (text)."""

    def _cli(cwd: Path, module: str, *args: str, timeout: float = 120):
        return run_module(module, *args, cwd=cwd, timeout=timeout)

    return _cli
