"""`predict` on what its users really send (issue #17): Keras models in the usual MNIST input
layouts, models that are not 10-class classifiers.

Everything is real: the models are small Keras models built here, saved as .keras files (or an
MLflow model folder with MLflow's own saver) and loaded back in Keras' safe mode by the
pipeline's loader; the CLI runs as a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from run_helpers import STYLES, TrainedDigits, parse_json, render, run_predict

from pipeline.infra.errors import ModelError
from pipeline.infra.model_loading import load_model

# --------------------------------------------------------------------------- input layouts

# The per-image input shapes of the usual MNIST models (a Dense network on flattened pixels, a
# Flatten first, a CNN's one channel), and the same for scikit-learn's 8x8 digits.
LAYOUTS = [(784,), (28, 28), (28, 28, 1), (64,), (8, 8), (8, 8, 1)]


def keras():
    from pipeline.core.training import keras as loaded  # TensorFlow, its start-up noise silenced

    return loaded


def linear_model(layout: tuple[int, ...], kernel: np.ndarray, activation: str | None = "softmax"):
    """Input(layout) -> Flatten -> Dense(kernel.shape[1]) with the given kernel and no bias."""
    k = keras()
    inputs = k.Input(layout)
    dense = k.layers.Dense(kernel.shape[1], activation=activation, use_bias=False)
    network = k.Model(inputs, dense(k.layers.Flatten()(inputs)))
    dense.set_weights([kernel])
    return network


def saved(network, path: Path) -> Path:
    network.save(path)
    return path


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_each_usual_input_layout_gets_the_canvas_in_its_shape(
    layout: tuple[int, ...], tmp_path: Path
):
    """The same weights in every layout give the same probabilities for the same canvases: the
    prepared canvas is reshaped row by row (a transposed or shifted canvas would not match)."""
    size = int(np.prod(layout))
    rng = np.random.default_rng(size)
    kernel = rng.normal(0, 0.3, size=(size, 10)).astype(np.float32)
    model = load_model(saved(linear_model(layout, kernel), tmp_path / "layout.keras"))
    assert model.input_size == size and model.side == round(size**0.5)
    canvases = rng.random((5, size), dtype=np.float32)
    np.testing.assert_allclose(model.predict(canvases), softmax(canvases @ kernel), atol=1e-5)


@pytest.fixture(scope="module")
def classic_digits_json(
    trained_digits: TrainedDigits, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict]]:
    """(a folder of rendered test digits, the trained flat model's --json answer for it)."""
    folder = tmp_path_factory.mktemp("classic")
    for i in range(10):
        render(trained_digits.test_images[i], STYLES[i % 5], folder / f"{i}-{STYLES[i % 5]}", i)
    flat = run_predict(
        str(folder), "--model", str(trained_digits.model), "--json", cwd=trained_digits.root
    )
    return folder, parse_json(flat)


@pytest.mark.parametrize("layout", [(8, 8), (8, 8, 1)], ids=str)
def test_the_trained_model_in_a_classic_layout_gives_the_same_answers(
    layout: tuple[int, ...], trained_digits: TrainedDigits, classic_digits_json, tmp_path: Path
):
    """The trained network behind a (8, 8) or (8, 8, 1) input, through the CLI: the same digits
    and probabilities as the flat model it wraps."""
    k = keras()
    trained = k.models.load_model(trained_digits.model, compile=False, safe_mode=True)
    inputs = k.Input(layout)
    wrapped = k.Model(inputs, trained(k.layers.Reshape((64,))(inputs)))
    path = saved(wrapped, tmp_path / "classic.keras")
    folder, flat = classic_digits_json
    answer = parse_json(run_predict(str(folder), "--model", str(path), "--json", cwd=tmp_path))
    assert [e["file"] for e in answer] == [e["file"] for e in flat]
    assert [e["digit"] for e in answer] == [e["digit"] for e in flat]
    np.testing.assert_allclose(
        [e["probabilities"] for e in answer], [e["probabilities"] for e in flat], atol=1e-5
    )


def test_an_mlflow_model_in_a_cnn_layout_loads_from_its_keras_flavour(tmp_path: Path):
    import mlflow

    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.3, size=(784, 10)).astype(np.float32)
    folder = tmp_path / "mlflow-model"
    mlflow.tensorflow.save_model(
        linear_model((28, 28, 1), kernel), str(folder), pip_requirements=["tensorflow"]
    )
    model = load_model(folder)
    canvases = rng.random((4, 784), dtype=np.float32)
    assert model.side == 28
    np.testing.assert_allclose(model.predict(canvases), softmax(canvases @ kernel), atol=1e-5)


def test_a_model_ending_in_logits_reports_probabilities(tmp_path: Path):
    """Dense(10) without softmax (TensorFlow's beginner quickstart): its scores are turned into
    probabilities (softmax), the digit unchanged."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(0, 1, size=(784, 10)).astype(np.float32)
    network = linear_model((28, 28), kernel, activation=None)
    model = load_model(saved(network, tmp_path / "logits.keras"))
    canvases = rng.random((6, 784), dtype=np.float32)
    probabilities = model.predict(canvases)
    np.testing.assert_allclose(probabilities, softmax(canvases @ kernel), atol=1e-5)


# --------------------------------------------------------------------------- models refused


def test_a_model_without_10_classes_is_refused_in_one_line(
    trained_digits: TrainedDigits, tmp_path: Path
):
    kernel = np.zeros((784, 5), dtype=np.float32)
    path = saved(linear_model((28, 28, 1), kernel), tmp_path / "five.keras")
    with pytest.raises(ModelError, match=r"gives 5 outputs per image, not 10 class probabilities"):
        load_model(path)
    good = render(trained_digits.test_images[0], "dark-on-light.png", tmp_path / "good.png")
    result = run_predict(str(good), "--model", str(path), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == "", result
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"model {path} gives 5 outputs per image" in errors[0], errors


def _network(kind: str):
    k = keras()
    if kind == "colour image":
        inputs = k.Input((32, 32, 3))
        return k.Model(inputs, k.layers.Dense(10)(k.layers.Flatten()(inputs)))
    if kind == "any size":
        inputs = k.Input((None, None, 1))
        return k.Model(inputs, k.layers.Dense(10)(k.layers.GlobalAveragePooling2D()(inputs)))
    if kind == "not square":
        inputs = k.Input((90,))
        return k.Model(inputs, k.layers.Dense(10)(inputs))
    if kind == "two inputs":
        a, b = k.Input((64,)), k.Input((64,))
        return k.Model([a, b], k.layers.Dense(10)(k.layers.Add()([a, b])))
    if kind == "image out":
        inputs = k.Input((28, 28))
        return k.Model(inputs, k.layers.Dense(28)(inputs))
    raise ValueError(kind)


REFUSED = {
    "colour image": r"takes inputs of shape \(32, 32, 3\) per image",
    "any size": r"takes inputs of shape \(any, any, 1\) per image",
    "not square": r"takes inputs of shape \(90,\) per image",
    "two inputs": r"takes 2 inputs",
    "image out": r"gives outputs of shape \(28, 28\) per image, not 10 class probabilities",
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_model_that_does_not_take_one_square_image_is_named_without_none(
    kind: str, tmp_path: Path
):
    path = saved(_network(kind), tmp_path / "other.keras")
    with pytest.raises(ModelError, match=REFUSED[kind]) as raised:
        load_model(path)
    message = str(raised.value)
    assert "None" not in message and "\n" not in message, message
    assert message.startswith(f"model {path} ")
    if kind != "image out":  # says what it takes
        assert "(28, 28, 1)" in message and "(784,)" in message, message
