"""Inputs from elsewhere stay inside their lane (issue #15): `predict` never runs code from a
model artifact unless told to (--trust-model), opens only the image formats it documents, and
`fetch` downloads and decompresses at most a cap of bytes per file.

Everything is real: the models are saved with MLflow's own savers (a pyfunc model whose pickle
writes a marker file when it is read or loaded), logged and registered in a real sqlite store,
and the CLI runs as a subprocess; the trusted model is the one the train stage logged. The
Ghostscript that an EPS file would be handed to is a real executable first on PATH that leaves
a marker when it runs. Mirrors are a real HTTP server on 127.0.0.1 and local directories; the
gzip bomb is a real gzip file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import (
    TrainedDigits,
    assert_one_line_error,
    cli_env,
    isolated_mlflow,
    new_store,
    run_predict,
    settings,
    temp_files,
)

from pipeline.core.idx import raw_sha256
from pipeline.core.images import IMAGE_SUFFIXES, read_grey
from pipeline.infra.config import DatasetConfig
from pipeline.infra.download import fetch_file
from pipeline.infra.errors import ConfigError, DataError, ModelError
from pipeline.infra.model_loading import load_model


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
    assert_one_line_error(result, str(folder), "python_function", "--trust-model")
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("kind", ["runs", "models"])
def test_a_code_running_model_in_the_store_is_refused_by_uri(payload_store, kind, tmp_path):
    uri, run_id, marker = payload_store
    model = f"runs:/{run_id}/model" if kind == "runs" else "models:/evil@champion"
    image = digit_image(tmp_path / "digit.png")
    result = run_predict(str(image), "--model", model, "--tracking-uri", uri, cwd=tmp_path)
    assert_one_line_error(result, model, "python_function", "--trust-model")
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
    assert_one_line_error(result, str(model), ".pkl", "--trust-model")
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
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stdout.splitlines()  # the file's own error line (the batch goes on)
    assert line.startswith(f"{eps}: error: not an image"), line
    assert "PNG" in line and "JPEG" in line, line
    assert "cannot load model" not in result.stderr
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_every_documented_image_format_is_read(suffix: str, tmp_path: Path):
    path = digit_image(tmp_path / f"digit{suffix}")
    grey = read_grey(path)
    assert grey.shape == (80, 80)
    assert grey[40, 40] < 60 and grey[5, 5] > 200  # the stroke dark, the paper light


# --------------------------------------------------------------------------- download caps

CAP = 1_000_000  # bytes: far above a tiny IDX file (conftest.py), far below what is thrown at it
NAME = DatasetConfig().train.images
MNIST_TRAIN_IMAGES_BYTES = 16 + 60_000 * 28 * 28  # the largest IDX file, decompressed


def streaming(sent: list[int], limit: int = 64 * CAP):
    """A route that answers 200 without a length and streams zeros until the client hangs up
    (or, so a client without a cap cannot fill the disk, `limit` bytes); `sent` counts them."""

    def route(handler) -> bool:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/gzip")
        handler.end_headers()
        chunk = bytes(1 << 16)
        try:
            while sum(sent) < limit and not handler.server.stop.is_set():
                handler.wfile.write(chunk)
                sent.append(len(chunk))
        except OSError:  # the client hung up
            pass
        return True

    return route


def announcing(size: int):
    """A route whose Content-Length announces `size` bytes, then sends a few and hangs up."""

    def route(handler) -> bool:
        handler.send_response(200)
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        with contextlib.suppress(OSError):
            handler.wfile.write(b"\x1f\x8b" + bytes(100))
        return True

    return route


def gzip_bomb(path: Path, decompressed: int) -> Path:
    """A valid gzip file of `decompressed` zero bytes (about 1,000 times smaller on disk)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    zeros = bytes(1 << 20)
    with open(path, "wb") as out:
        for _ in range(decompressed // len(zeros)):
            out.write(compressor.compress(zeros))
        out.write(compressor.flush())
    return path


def cap_line(err: DataError, location: str, *needles: str) -> str:
    """The line of the error that lists `location`: it names the cap and the key that raises it."""
    line = next((ln for ln in str(err).splitlines() if location in ln), None)
    assert line is not None, f"{location} not listed in:\n{err}"
    for needle in (f"{CAP:,} bytes", "dataset.max_file_mb", *needles):
        assert needle in line, line
    return line


def assert_nothing_left(dest: Path) -> None:
    assert not (dest / NAME).exists()
    assert temp_files(dest) == []


@pytest.mark.timeout(60)
def test_a_mirror_that_streams_forever_is_cut_off_at_the_cap(
    idx_files, mirror_dir, tmp_path, http_server
):
    sent: list[int] = []
    endless = http_server(mirror_dir, routes={f"/{NAME}": streaming(sent)})
    good = http_server(mirror_dir)
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as raised:
        fetch_file(NAME, idx_files[NAME], [endless.url], dest, timeout=5, retries=2, max_bytes=CAP)
    cap_line(raised.value, endless.url + NAME, "cut off")
    assert endless.requests == [f"/{NAME}"]  # a file over the cap: not asked for again
    # The client stopped reading at the cap; the rest is what the sockets' buffers took.
    assert sum(sent) < 16 * CAP, sum(sent)
    assert_nothing_left(dest)

    # The next mirror is tried, and its (small) file is fetched.
    fetch_file(NAME, idx_files[NAME], [endless.url, good.url], dest, retries=0, max_bytes=CAP)
    assert raw_sha256(dest / NAME) == idx_files[NAME]
    assert temp_files(dest) == []


def test_a_length_over_the_cap_is_refused_before_the_body(
    idx_files, mirror_dir, tmp_path, http_server
):
    served = http_server(mirror_dir, routes={f"/{NAME}": announcing(10**12)})
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as raised:
        fetch_file(NAME, idx_files[NAME], [served.url], dest, timeout=5, retries=2, max_bytes=CAP)
    cap_line(raised.value, served.url + NAME, "1,000,000,000,000 bytes")
    assert served.requests == [f"/{NAME}"]
    assert_nothing_left(dest)


@pytest.mark.parametrize("kind", ["http", "dir"])
def test_a_gzip_bomb_stops_at_the_decompressed_cap(kind, idx_files, tmp_path, http_server):
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    gzip_bomb(bombs / NAME, 64 * CAP)
    assert (
        bombs / NAME
    ).stat().st_size < CAP  # under the download cap: only decompressing it is not
    mirror = http_server(bombs).url if kind == "http" else f"{bombs}/"
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as raised:
        fetch_file(NAME, idx_files[NAME], [mirror], dest, timeout=5, retries=2, max_bytes=CAP)
    cap_line(raised.value, mirror, "decompresses to more than")
    assert_nothing_left(dest)


def test_a_local_file_over_the_cap_is_not_copied(idx_files, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / NAME).write_bytes(bytes(2 * CAP))
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as raised:
        fetch_file(NAME, idx_files[NAME], [f"{big}/"], dest, retries=0, max_bytes=CAP)
    cap_line(raised.value, str(big), f"{2 * CAP:,} bytes")
    assert_nothing_left(dest)


def test_a_gzip_bomb_already_in_place_is_replaced(idx_files, mirror_dir, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    gzip_bomb(dest / NAME, 64 * CAP)
    fetch_file(NAME, idx_files[NAME], [str(mirror_dir)], dest, retries=0, max_bytes=CAP)
    assert raw_sha256(dest / NAME) == idx_files[NAME]


@pytest.mark.timeout(120)
def test_fetch_cli_stops_an_endless_mirror_with_the_cap_and_how_to_raise_it(
    cli, mirror_dir, tmp_path, http_server
):
    """The real stage on MNIST's file list, each file served endlessly: exit 1, the error names
    the cap and its key, and nothing is left under data/raw/mnist."""
    sent: list[int] = []
    names = DatasetConfig(name="mnist").train, DatasetConfig(name="mnist").test
    routes = {f"/{pair.images}": streaming(sent) for pair in names}
    routes |= {f"/{pair.labels}": streaming(sent) for pair in names}
    served = http_server(mirror_dir, routes=routes)
    result = cli(
        tmp_path,
        "pipeline.fetch",
        f"dataset.mirrors=[{served.url}]",
        "dataset.retries=0",
        f"dataset.max_file_mb={CAP / 1e6:g}",
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "could not fetch a valid" in errors[0]
    cap = [ln for ln in result.stderr.splitlines() if served.url in ln]
    assert len(cap) == 1 and "dataset.max_file_mb" in cap[0] and f"{CAP:,} bytes" in cap[0], cap
    assert sum(sent) < 16 * CAP
    raw = tmp_path / "data" / "raw" / "mnist"
    assert not raw.exists() or list(raw.iterdir()) == []


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_each_downloaded_datasets_cap_fits_its_largest_file(dataset: str):
    cap = settings(f"dataset={dataset}").dataset.max_file_mb * 1e6
    assert cap >= 1.2 * MNIST_TRAIN_IMAGES_BYTES  # both: 60,000 images of 28x28 bytes


@pytest.mark.parametrize("value", [0, -1])
def test_a_cap_out_of_range_is_named(value: float):
    with pytest.raises(ConfigError, match=rf"dataset\.max_file_mb={value}"):
        DatasetConfig(max_file_mb=value)
