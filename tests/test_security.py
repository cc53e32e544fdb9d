"""Inputs from elsewhere stay inside their lane (issue #15): `predict` never runs code from a
model artifact unless told to (--trust-model), and opens only the image formats it documents.

Everything is real: the models are saved with MLflow's own savers (a pyfunc model whose pickle
writes a marker file when it is read or loaded), logged and registered in a real sqlite store,
and the CLI runs as a subprocess; the trusted model is the one the train stage logged. The
Ghostscript that an EPS file would be handed to is a real executable first on PATH that leaves
a marker when it runs.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import TrainedDigits, cli_env, isolated_mlflow, new_store, run_predict

from pipeline.core.images import IMAGE_SUFFIXES, read_grey
from pipeline.infra.errors import ModelError
from pipeline.infra.model_loading import load_model


def one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The command failed (exit 1) with exactly one `error:` line, no traceback and nothing on
    stdout; that line holds every needle."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def digit_image(path: Path) -> Path:
    """A dark vertical stroke on white paper (a '1'), as an ordinary PNG."""
    page = Image.new("L", (80, 80), 255)
    page.paste(0, (36, 10, 44, 70))
    page.save(path)
    return path


# --------------------------------------------------------------------------- trusted models


def _payload_model(marker: Path):
    """An MLflow PythonModel that writes `marker` when its pickle is read and when MLflow loads
    it, and always answers 7. Defined in a function so cloudpickle stores the class's code in the
    artifact (by value), as an attacker's model would."""
    import mlflow

    class Payload(mlflow.pyfunc.PythonModel):
        def __init__(self, marker: str) -> None:
            self.marker = marker

        def __setstate__(self, state: dict) -> None:  # runs while the pickle is read
            self.__dict__.update(state)
            with open(self.marker, "a") as f:
                f.write("unpickled\n")

        def load_context(self, context) -> None:
            with open(self.marker, "a") as f:
                f.write("load_context\n")

        def predict(self, context, model_input, params=None):
            out = np.zeros((len(model_input), 10), dtype=np.float32)
            out[:, 7] = 1
            return out

    return Payload(str(marker))


def _payload_kwargs(marker: Path) -> dict:
    from mlflow.models import infer_signature

    return {
        "python_model": _payload_model(marker),
        "signature": infer_signature(
            np.zeros((1, 64), dtype=np.float32), np.zeros((1, 10), dtype=np.float32)
        ),
        # Given, so MLflow does not load the model (running the payload) to infer them.
        "pip_requirements": ["mlflow"],
    }


@pytest.fixture
def payload_folder(tmp_path: Path) -> tuple[Path, Path]:
    """(an MLflow pyfunc model folder whose pickle runs code, the marker file that code writes)."""
    import mlflow

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "evil-model"
    mlflow.pyfunc.save_model(str(folder), **_payload_kwargs(marker))
    assert (folder / "MLmodel").is_file() and not marker.exists()
    return folder, marker


@pytest.fixture(scope="module")
def payload_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """(tracking URI, run id, marker): the payload model logged in a run of a real sqlite store
    and registered as `evil` version 1 with the alias `champion`."""
    import mlflow

    root = tmp_path_factory.mktemp("evil-store")
    uri = new_store(tmp_path_factory, root)
    marker = root / "payload-ran"
    with isolated_mlflow(root, uri):
        with mlflow.start_run() as run:
            mlflow.pyfunc.log_model(name="model", **_payload_kwargs(marker))
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "evil")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias("evil", "champion", version.version)
    assert not marker.exists()
    return uri, run.info.run_id, marker


def test_a_pyfunc_model_that_runs_code_is_refused_and_never_run(payload_folder, tmp_path):
    folder, marker = payload_folder
    image = digit_image(tmp_path / "digit.png")
    result = run_predict(str(image), "--model", str(folder), cwd=tmp_path)
    one_error_line(result, str(folder), "python_function", "--trust-model")
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("kind", ["runs", "models"])
def test_a_code_running_model_in_the_store_is_refused_by_uri(payload_store, kind, tmp_path):
    uri, run_id, marker = payload_store
    model = f"runs:/{run_id}/model" if kind == "runs" else "models:/evil@champion"
    image = digit_image(tmp_path / "digit.png")
    result = run_predict(str(image), "--model", model, "--tracking-uri", uri, cwd=tmp_path)
    one_error_line(result, model, "python_function", "--trust-model")
    assert not marker.exists(), marker.read_text()


def test_trust_model_loads_it_through_pyfunc_and_warns(payload_folder, tmp_path):
    folder, marker = payload_folder
    image = digit_image(tmp_path / "digit.png")
    result = run_predict(str(image), "--model", str(folder), "--trust-model", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{image}: 7 (p=1.00)"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert "--trust-model" in warnings[0] and str(folder) in warnings[0]
    assert "runs code" in warnings[0]
    assert marker.read_text().splitlines() == ["unpickled", "load_context"]


def test_help_states_the_risk_of_trust_model(tmp_path):
    result = run_predict("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--trust-model" in text
    assert "runs code from the model artifact as you" in text


def test_a_pickle_file_is_refused_without_being_read(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model = tmp_path / "model.pkl"
    model.write_bytes(pickle.dumps(Payload()))
    image = digit_image(tmp_path / "digit.png")
    result = run_predict(str(image), "--model", str(model), cwd=tmp_path)
    one_error_line(result, str(model), ".pkl", "--trust-model")
    assert not marker.exists()


def downloaded_model(trained: TrainedDigits, dest: Path) -> Path:
    """The train run's logged model as a local MLflow model folder (what `runs:/` fetches)."""
    import mlflow

    dest.mkdir()
    with isolated_mlflow(dest, trained.tracking_uri):
        return Path(mlflow.artifacts.download_artifacts(trained.run_model_uri, dst_path=str(dest)))


def _never(*args, **kwargs):
    raise AssertionError("a code-running loader was called")


def test_the_trained_model_loads_by_uri_and_folder_without_pyfunc(
    trained_digits: TrainedDigits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The model the train stage logged (mlflow.tensorflow, a Keras 3 model) is read from its
    saved .keras file: the same predictions as models/model.keras, and neither mlflow.pyfunc nor
    cloudpickle is ever asked to load anything."""
    import cloudpickle
    import mlflow

    monkeypatch.setattr(mlflow.pyfunc, "load_model", _never)
    monkeypatch.setattr(cloudpickle, "load", _never)
    monkeypatch.setattr(cloudpickle, "loads", _never)
    reference = load_model(trained_digits.model)
    x = trained_digits.test_images[:50].reshape(50, -1)
    by_uri = load_model(trained_digits.run_model_uri, trained_digits.tracking_uri)
    np.testing.assert_allclose(by_uri.predict(x), reference.predict(x), atol=1e-6)

    folder = downloaded_model(trained_digits, tmp_path / "download")
    by_folder = load_model(folder)
    assert by_folder.input_size == 64
    np.testing.assert_allclose(by_folder.predict(x), reference.predict(x), atol=1e-6)


def _lambda_keras_file(path: Path) -> Path:
    from pipeline.core.training import keras

    inputs = keras.Input((64,))
    doubled = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(doubled)).save(path)
    return path


def test_a_lambda_layer_is_refused_in_a_keras_file_and_in_an_mlflow_model(
    trained_digits: TrainedDigits, tmp_path: Path
):
    """Keras' safe mode stays on for both routes: a Lambda layer (Python bytecode) is refused."""
    keras_file = _lambda_keras_file(tmp_path / "lambda.keras")
    with pytest.raises(ModelError, match=r"cannot load model .*lambda\.keras.*[Ll]ambda"):
        load_model(keras_file)

    folder = downloaded_model(trained_digits, tmp_path / "download")
    shutil.copyfile(keras_file, folder / "data" / "model.keras")
    with pytest.raises(ModelError, match=r"cannot load model .*[Ll]ambda"):
        load_model(folder)


# --------------------------------------------------------------------------- image formats

# A one-stroke Encapsulated PostScript drawing: Pillow identifies it as EPS and, to decode it,
# runs Ghostscript on it (a full PostScript interpreter).
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 28 28
newpath 14 4 moveto 14 24 lineto 3 setlinewidth stroke
showpage
%%EOF
"""


@pytest.fixture
def fake_ghostscript(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(an environment whose PATH starts with a `gs` that records each call in a marker file,
    that marker file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-ran"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\n')
    gs.chmod(0o755)
    env = cli_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env, marker


def test_an_eps_file_named_png_is_refused_without_running_ghostscript(fake_ghostscript, tmp_path):
    env, marker = fake_ghostscript
    eps = tmp_path / "digit.png"
    eps.write_bytes(EPS)
    # The fake Ghostscript is real: Pillow left to itself runs it on this file.
    opened = f"from PIL import Image; Image.open({str(eps)!r}).load()"
    subprocess.run([sys.executable, "-c", opened], env=env, capture_output=True, check=False)
    assert marker.exists(), "the fake gs was not found on PATH; the test below would prove nothing"
    marker.unlink()

    model = tmp_path / "model.keras"  # the images fail before any model is loaded
    model.write_bytes(b"never read")
    result = run_predict(str(eps), "--model", str(model), cwd=tmp_path, env=env)
    one_error_line(result, f"error: {eps}: not an image", "PNG", "JPEG")
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_every_documented_image_format_is_read(suffix: str, tmp_path: Path):
    path = digit_image(tmp_path / f"digit{suffix}")
    grey = read_grey(path)
    assert grey.shape == (80, 80)
    assert grey[40, 40] < 60 and grey[5, 5] > 200  # the stroke dark, the paper light
