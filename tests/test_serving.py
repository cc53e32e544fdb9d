"""The trained model through the MLflow Model Registry: `python -m pipeline.registry` registers a
train run's model and points the `champion` alias at it; `python -m pipeline.predict` loads it as
models:/digit-classifier@champion; and `mlflow models serve` serves it over HTTP on 127.0.0.1.

Everything is real: the model is trained by the pipeline (conftest's `trained_digits`, shared
with test_predict.py), the registry is the run's sqlite store, and the server is MLflow's own
scoring server in a subprocess, stopped when the module's tests are done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from run_helpers import (
    STYLES,
    TrainedDigits,
    free_port,
    parse_json,
    render,
    run_module,
    run_predict,
    stop_server,
)

from pipeline.core.images import prepare_image
from pipeline.infra.model_loading import load_model
from pipeline.registry import DEFAULT_ALIAS, DEFAULT_NAME

pytestmark = pytest.mark.slow

SERVER_START_DEADLINE = 120  # seconds; it takes ~15 s here (TensorFlow import, model load)


def run_registry(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_module("pipeline.registry", *args, cwd=cwd)


def champion_version(uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.get_model_version_by_alias(DEFAULT_NAME, DEFAULT_ALIAS).version)


@pytest.fixture(scope="module")
def registered(trained_digits: TrainedDigits, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register the run's model by URI; returns the version the alias points at."""
    result = run_registry(
        trained_digits.run_model_uri,
        "--tracking-uri",
        trained_digits.tracking_uri,
        cwd=tmp_path_factory.mktemp("register"),
    )
    assert result.returncode == 0, result.stderr
    version = champion_version(trained_digits.tracking_uri)
    # the success line names the store it registered in
    assert result.stdout.strip() == (
        f"registered {trained_digits.run_model_uri} as {DEFAULT_NAME} version {version} in "
        f"{trained_digits.tracking_uri}; models:/{DEFAULT_NAME}@{DEFAULT_ALIAS} points at it"
    )
    return version


def test_register_sets_the_champion_alias_on_the_runs_model(
    trained_digits: TrainedDigits, registered
):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=trained_digits.tracking_uri)
    version = client.get_model_version_by_alias(DEFAULT_NAME, DEFAULT_ALIAS)
    assert str(version.version) == registered
    assert version.run_id == trained_digits.run_id


def test_register_without_arguments_uses_the_recorded_run_and_moves_the_alias(
    trained_digits: TrainedDigits, registered: str
):
    """In the project (runs/train.json present) a plain `python -m pipeline.registry` registers
    that run's model in the store the run was logged to, as a new version the alias moves to."""
    before = champion_version(trained_digits.tracking_uri)
    result = run_registry(cwd=trained_digits.root)
    assert result.returncode == 0, result.stderr
    after = champion_version(trained_digits.tracking_uri)
    assert int(after) == int(before) + 1
    assert f"version {after} in {trained_digits.tracking_uri};" in result.stdout


def test_register_errors_are_one_line(trained_digits: TrainedDigits, tmp_path: Path):
    result = run_registry(cwd=tmp_path)  # no runs/train.json here
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "runs/train.json is missing" in result.stderr
    result = run_registry(
        "runs:/0123456789abcdef0123456789abcdef/model",
        "--tracking-uri",
        trained_digits.tracking_uri,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot register runs:/0123456789abcdef0123456789abcdef/model" in result.stderr


def test_predict_loads_the_champion_by_alias(
    trained_digits: TrainedDigits, registered, tmp_path: Path
):
    files = [
        render(trained_digits.test_images[i], STYLES[i], tmp_path / f"{i}-{STYLES[i]}", i)
        for i in range(len(STYLES))
    ]
    by_alias = parse_json(
        run_predict(
            *(str(f) for f in files),
            "--model",
            f"models:/{DEFAULT_NAME}@{DEFAULT_ALIAS}",
            "--tracking-uri",
            trained_digits.tracking_uri,
            "--json",
            cwd=tmp_path,
        )
    )
    model = load_model(trained_digits.model)
    local = model.predict(np.stack([prepare_image(f, model.side) for f in files]))
    assert [e["file"] for e in by_alias] == [str(f) for f in files]
    np.testing.assert_allclose([e["probabilities"] for e in by_alias], local, atol=1e-5)


# --------------------------------------------------------------------------- serving


def get(url: str, timeout: float = 5) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


@pytest.fixture(scope="module")
def server(
    trained_digits: TrainedDigits, registered: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`mlflow models serve -m models:/digit-classifier@champion --env-manager local` on a free
    127.0.0.1 port; yields its base URL once GET /ping answers 200."""
    cwd = tmp_path_factory.mktemp("serve")
    log_path = cwd / "server.log"
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = trained_digits.tracking_uri
    # The server execs `uvicorn` by name: this venv's bin must be on PATH (as after `source
    # .venv/bin/activate`, or under make).
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{DEFAULT_NAME}@{DEFAULT_ALIAS}",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_DEADLINE
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if get(f"{base}/ping", timeout=2) == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no answer on {base}/ping within {SERVER_START_DEADLINE} s:\n"
                    f"{log_path.read_text()}"
                )
            time.sleep(0.5)
        yield base
    finally:
        stop_server(process)


def invoke(base: str, rows: np.ndarray) -> np.ndarray:
    request = urllib.request.Request(
        f"{base}/invocations",
        data=json.dumps({"inputs": rows.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        body = json.loads(response.read())
    return np.asarray(body["predictions"], dtype=np.float64)


def test_served_champion_returns_the_local_models_probabilities(
    server: str, trained_digits: TrainedDigits, tmp_path: Path
):
    model = load_model(trained_digits.model)
    # Images as a client would send them: rendered test digits, prepared like the CLI does.
    files = [
        render(
            trained_digits.test_images[i],
            STYLES[i % len(STYLES)],
            tmp_path / f"{i}-{STYLES[i % 5]}",
        )
        for i in range(12)
    ]
    rows = np.stack([prepare_image(path, model.side) for path in files])
    assert rows.shape == (12, 64)
    served = invoke(server, rows)
    assert served.shape == (12, 10)
    assert np.all(served >= 0)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-4)
    local = model.predict(rows)
    assert served.argmax(axis=1).tolist() == local.argmax(axis=1).tolist()
    np.testing.assert_allclose(served, local, atol=1e-5)
    # And it is the model that recognises them.
    correct = int((served.argmax(axis=1) == trained_digits.test_labels[:12]).sum())
    assert correct >= 9, (served.argmax(axis=1), trained_digits.test_labels[:12])


def test_server_rejects_a_wrong_input_size(server: str):
    with pytest.raises(urllib.error.HTTPError) as raised:
        invoke(server, np.zeros((1, 10), dtype=np.float32))
    assert raised.value.code == 400
