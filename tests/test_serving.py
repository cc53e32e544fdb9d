"""The trained model through the MLflow Model Registry: `python -m pipeline.registry` registers a
train run's models and points the `champion` alias at them; `python -m pipeline.predict` loads the
network as models:/digit-classifier@champion; and `mlflow models serve` serves the served model
(images in, issue #17) as models:/digit-classifier-images@champion over HTTP on 127.0.0.1.

Everything is real: the model is trained by the pipeline (conftest's `trained_digits`, shared
with test_predict.py), the registry is the run's sqlite store, and the server is MLflow's own
scoring server in a subprocess, stopped when the module's tests are done.
"""

from __future__ import annotations

import base64
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
    assert_one_line_error,
    free_port,
    parse_json,
    render,
    run_module,
    run_predict,
    stop_server,
)

from pipeline.core.images import prepare_image
from pipeline.infra.model_loading import load_model
from pipeline.registry import DEFAULT_ALIAS, DEFAULT_NAME, SERVED_SUFFIX

pytestmark = pytest.mark.slow

SERVER_START_DEADLINE = 120  # seconds; it takes ~15 s here (TensorFlow import, model load)
SERVED_NAME = DEFAULT_NAME + SERVED_SUFFIX  # digit-classifier-images


def run_registry(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_module("pipeline.registry", *args, cwd=cwd)


def champion_version(uri: str, name: str = DEFAULT_NAME) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.get_model_version_by_alias(name, DEFAULT_ALIAS).version)


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
    # What a reviewer asks of a version: which data, which model, what input, how good.
    run = client.get_run(trained_digits.run_id)
    assert version.tags["dataset"] == "digits"
    assert version.tags["dataset_sha256"] == run.data.tags["dataset_sha256"]
    assert version.tags["model"] == "mlp"
    assert version.tags["test_accuracy"] == f"{run.data.metrics['test_accuracy']:.4f}"
    assert version.tags["input"] == "pixels float32[-1, 64]"  # 8x8 digits, flattened
    assert version.description.startswith(
        f"mlp on digits: test accuracy {version.tags['test_accuracy']}"
    )
    assert trained_digits.run_id in version.description


def test_register_without_arguments_uses_the_recorded_run_and_moves_the_alias(
    trained_digits: TrainedDigits, registered: str, registered_images: str
):
    """In the project (runs/train.json present) a plain `python -m pipeline.registry` registers
    that run's two models in the store the run was logged to: the network as digit-classifier,
    the served model as digit-classifier-images, each a new version the alias moves to."""
    before = [champion_version(trained_digits.tracking_uri, n) for n in (DEFAULT_NAME, SERVED_NAME)]
    result = run_registry(cwd=trained_digits.root)
    assert result.returncode == 0, result.stderr
    after = [champion_version(trained_digits.tracking_uri, n) for n in (DEFAULT_NAME, SERVED_NAME)]
    assert [int(a) for a in after] == [int(b) + 1 for b in before]
    network, served = result.stdout.splitlines()
    assert network.startswith(f"registered {trained_digits.run_model_uri} as {DEFAULT_NAME} ")
    assert served.startswith(f"registered {trained_digits.served_model_uri} as {SERVED_NAME} ")
    for line, version in zip((network, served), after, strict=True):
        assert f"version {version} in {trained_digits.tracking_uri};" in line


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
def registered_images(
    trained_digits: TrainedDigits, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Register the run's served model as digit-classifier-images; returns the version the
    alias points at."""
    result = run_registry(
        trained_digits.served_model_uri,
        "--name",
        SERVED_NAME,
        "--tracking-uri",
        trained_digits.tracking_uri,
        cwd=tmp_path_factory.mktemp("register-images"),
    )
    assert result.returncode == 0, result.stderr
    return champion_version(trained_digits.tracking_uri, SERVED_NAME)


@pytest.fixture(scope="module")
def server(
    trained_digits: TrainedDigits, registered_images: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`mlflow models serve -m models:/digit-classifier-images@champion --env-manager local` on a
    free 127.0.0.1 port; yields its base URL once GET /ping answers 200."""
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
        f"models:/{SERVED_NAME}@{DEFAULT_ALIAS}",
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


def invoke(base: str, request: dict) -> tuple[int, dict]:
    """POST a JSON request to /invocations -> (status, the JSON answer)."""
    post = urllib.request.Request(
        f"{base}/invocations",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(post, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def client_images(
    trained_digits: TrainedDigits, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Test digits as a client sends them: PNG and JPEG files in the five STYLES."""
    folder = tmp_path_factory.mktemp("client-images")
    return [
        render(trained_digits.test_images[i], STYLES[i % 5], folder / f"{i:02d}-{STYLES[i % 5]}", i)
        for i in range(12)
    ]


def test_the_served_model_answers_images_as_predict_does(
    server: str, trained_digits: TrainedDigits, client_images: list[Path]
):
    """Many images in one request (dataframe_records, as in the README's curl): one answer per
    image, in order, the same digits and probabilities as `python -m pipeline.predict --json` on
    the same files (the same code prepares them), and the right digits."""
    status, body = invoke(server, {"dataframe_records": [{"image": b64(f)} for f in client_images]})
    assert status == 200, body
    served = body["predictions"]
    local = parse_json(
        run_predict(
            *(str(f) for f in client_images),
            "--model",
            str(trained_digits.model),
            "--json",
            cwd=trained_digits.root,
        )
    )
    assert len(served) == len(local) == 12
    for answer, expected in zip(served, local, strict=True):
        assert set(answer) <= {"digit", "probability", "probabilities", "warning"}, answer
        assert answer["digit"] == expected["digit"]
        assert answer.get("warning") == expected.get("warning")
        np.testing.assert_allclose(answer["probabilities"], expected["probabilities"], atol=1e-5)
        assert answer["probability"] == max(answer["probabilities"])
    found = np.array([a["digit"] for a in served])
    assert (found == trained_digits.test_labels[:12]).sum() >= 9, found


def test_one_image_in_each_request_format(server: str, client_images: list[Path]):
    """One image, in each of MLflow's request formats for a column: the same answer."""
    image = b64(client_images[0])
    requests = [
        {"dataframe_records": [{"image": image}]},
        {"dataframe_split": {"columns": ["image"], "data": [[image]]}},
        {"inputs": {"image": [image]}},
    ]
    answers = []
    for request in requests:
        status, body = invoke(server, request)
        assert status == 200, (request, body)
        [answer] = body["predictions"]
        answers.append(answer)
    assert all(a == answers[0] for a in answers), answers


def test_a_bad_image_is_an_error_entry_and_the_others_are_answered(
    server: str, client_images: list[Path]
):
    """A batch with a text file, a word that is not base64, an empty image and a blank page
    between good images: 200, an `error` entry for each bad one (what predict says of such a
    file), the good ones answered."""
    from PIL import Image

    blank = client_images[0].parent / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    good = b64(client_images[1])
    bad = {
        "text": base64.b64encode(b"digit: 7\n").decode(),
        "not base64": "seven!",
        "empty": "",
        "blank": b64(blank),
    }
    status, body = invoke(server, {"inputs": {"image": [good, *bad.values(), good]}})
    assert status == 200, body
    first, *errors, last = body["predictions"]
    assert "digit" in first and first == last, body
    assert [set(e) for e in errors] == [{"error"}] * len(bad), errors
    messages = dict(zip(bad, (e["error"] for e in errors), strict=True))
    assert "not an image in a format predict reads" in messages["text"]
    assert "not base64" in messages["not base64"]
    assert "empty" in messages["empty"]
    assert "no digit found" in messages["blank"]


def test_a_request_without_images_is_refused(server: str):
    status, body = invoke(server, {"dataframe_records": [{"pixels": [0.0] * 64}]})
    assert status == 400, body
    assert "image" in json.dumps(body), body


def test_the_served_model_is_logged_from_code_with_a_signature_and_example(
    trained_digits: TrainedDigits, tmp_path: Path
):
    """runs:/<id>/served: a pyfunc model from code (no pickle anywhere in it), its network the
    run's .keras file, the pipeline's code beside it, a signature and an input example of PNGs."""
    import mlflow
    import yaml

    from pipeline.infra.tracking import using_store

    # runs:/<id>/served names a logged model, which MLflow looks up in its global store.
    with using_store(trained_digits.tracking_uri):
        uri = trained_digits.served_model_uri
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    assert list(meta["flavors"]) == ["python_function"]
    pyfunc = meta["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in pyfunc  # the pickled class of a model that is not from code
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert (folder / pyfunc["artifacts"]["network"]["path"]).suffix == ".keras"
    assert "code/pipeline/infra/inference.py" in files
    assert json.loads(meta["signature"]["inputs"]) == [
        {"type": "string", "name": "image", "required": True}
    ]
    example_file = folder / meta["saved_input_example_info"]["serving_input_path"]
    example = json.loads(example_file.read_text())
    [[first], *_] = example["dataframe_split"]["data"]
    assert base64.b64decode(first).startswith(b"\x89PNG")


def test_predict_refuses_the_served_model_without_trust_model(
    trained_digits: TrainedDigits, registered_images: str, tmp_path: Path
):
    """Loading the served model runs its code: predict refuses it, by run or by alias, in one
    line naming python_function and --trust-model (docs/SECURITY.md)."""
    image = render(trained_digits.test_images[0], STYLES[0], tmp_path / "digit.png")
    for model in (trained_digits.served_model_uri, f"models:/{SERVED_NAME}@{DEFAULT_ALIAS}"):
        uri = trained_digits.tracking_uri
        result = run_predict(str(image), "--model", model, "--tracking-uri", uri, cwd=tmp_path)
        assert_one_line_error(result, model, "python_function", "--trust-model")


def test_the_champion_network_scores_pixel_rows_in_batch(
    trained_digits: TrainedDigits, registered: str, client_images: list[Path]
):
    """models:/digit-classifier@champion stays the pixel-level network for batch scoring:
    MLflow's pyfunc of its Keras flavour gives the local model's probabilities."""
    import mlflow

    from pipeline.infra.tracking import using_store

    model = load_model(trained_digits.model)
    rows = np.stack([prepare_image(path, model.side) for path in client_images])
    assert rows.shape == (12, 64)
    with using_store(trained_digits.tracking_uri):
        network = mlflow.pyfunc.load_model(f"models:/{DEFAULT_NAME}@{DEFAULT_ALIAS}")
    served = np.asarray(network.predict(rows), dtype=np.float64)
    np.testing.assert_allclose(served, model.predict(rows), atol=1e-5)
