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

from pipeline.core.renders import (
    PAPER,
    SHADE,
    canvas_export,
    digit_ink,
    ink_on,
    page,
    photo_noise,
    save_grey,
    tight_crop,
)
from pipeline.infra.errors import InputError, ModelError
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


# --------------------------------------------------------------------------- photos of paper

SHADOWED = 40  # test digits rendered per condition
SHADOW_SLACK = 3  # of SHADOWED: shadowed paper may cost at most this many right answers


def pen_seven(size: int, width: int = 5) -> np.ndarray:
    """A '7' drawn with a round pen (PIL.ImageDraw), ink in [0, 1], with a margin of 10%."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    m = size // 10
    draw.line([(m, m), (size - m, m), (size // 2 - m, size - m)], fill=255, width=width)
    return np.asarray(canvas, np.float32) / 255


def shaded_pages(height: int, width: int) -> dict[str, np.ndarray]:
    """Pages lit unevenly in the ways photos are: linear shadows from 245 down to 190 or 150
    across, along or corner to corner; a shadow's soft edge; a vignette (darker corners)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / (width - 1), ys / (height - 1)
    pages = {
        f"{shade:.0f}-{d}": page(height, width, shade, d)
        for shade in (SHADE, 150.0)
        for d in range(3)
    }
    pages["soft edge"] = PAPER - (PAPER - SHADE) / (1 + np.exp(-(u - 0.5) * 20))
    pages["vignette"] = PAPER - 70 * ((u - 0.5) ** 2 + (v - 0.5) ** 2) * 2
    return pages


def test_a_shadowed_page_is_cropped_to_the_digit_not_to_the_border(tmp_path: Path):
    """Dark ink on unevenly lit paper: the crop is the pen's '7' (as on even paper), not the
    page's shaded side; no border warning."""
    from pipeline.core.images import locate_digit, read_grey

    seven = pen_seven(60)
    inked = seven > 0.5
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    expected = (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    for name, paper in {"even": page(140, 200, PAPER), **shaded_pages(140, 200)}.items():
        path = save_grey(ink_on(paper, seven, 40, 70), tmp_path / f"{name}.png")
        located = locate_digit(read_grey(path), name)
        assert abs(located.crop.shape[0] - expected[0]) <= 2, (name, located.crop.shape)
        assert abs(located.crop.shape[1] - expected[1]) <= 2, (name, located.crop.shape)
        assert located.warning is None, (name, located.warning)


@pytest.mark.parametrize("sigma", [8.0, 20.0])
def test_a_noisy_photo_is_cropped_to_the_digit_not_to_the_page(sigma: float, tmp_path: Path):
    """Sensor noise of `sigma` grey levels on the page, saved as a JPEG (quality 75): the crop
    is the pen's '7', as without noise (a noisy pixel passing as ink used to stretch the box to
    the page's edges), and a blank noisy page is still no digit."""
    from pipeline.core.images import locate_digit, read_grey

    seven = pen_seven(60)
    inked = seven > 0.5
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    expected = np.array([rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1])
    rng = np.random.default_rng(0)
    for name, paper in {"even": page(140, 200, PAPER), "shadowed": page(140, 200, SHADE)}.items():
        pixels = photo_noise(ink_on(paper, seven, 40, 70), sigma, rng)
        path = save_grey(pixels, tmp_path / f"{name}.jpg", quality=75)
        located = locate_digit(read_grey(path), name)
        shape = located.crop.shape
        assert np.abs(np.array(shape) - expected).max() <= 3, (name, shape)
        assert located.warning is None, (name, located.warning)
    blank = save_grey(photo_noise(page(140, 200, PAPER), sigma, rng), tmp_path / "blank.jpg")
    with pytest.raises(InputError, match="no digit found"):
        locate_digit(read_grey(blank), "blank")


def shadow_accuracy(trained: TrainedDigits, model, folder: Path, shade: float) -> int:
    """How many of SHADOWED test digits, each on its own page (the shadow's direction and the
    digit's place varying), the model gets right through predict's preprocessing."""
    from pipeline.core.images import prepare_image

    folder.mkdir()
    files = []
    for i in range(SHADOWED):
        pixels = ink_on(
            page(120, 160, shade, i),
            digit_ink(trained.test_images[i], 56),
            20 + i % 40,
            20 + (i * 7) % 80,
        )
        files.append(save_grey(pixels, folder / f"{i:02d}.png"))
    found = model.predict(np.stack([prepare_image(f, model.side) for f in files])).argmax(axis=1)
    return int((found == trained.test_labels[:SHADOWED]).sum())


def test_digits_on_shadowed_paper_are_recognised_as_on_even_paper(
    trained_digits: TrainedDigits, tmp_path: Path
):
    model = load_model(trained_digits.model)
    even = shadow_accuracy(trained_digits, model, tmp_path / "even", PAPER)
    shadowed = shadow_accuracy(trained_digits, model, tmp_path / "shadowed", SHADE)
    assert even >= 0.85 * SHADOWED, even
    assert shadowed >= even - SHADOW_SLACK, (shadowed, even)


# --------------------------------------------------------------------------- transparency


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (200, 30, 30)], ids=str)
def test_a_canvas_export_is_read_from_its_alpha_whatever_the_stroke_colour(
    colour: tuple[int, int, int], trained_digits: TrainedDigits, tmp_path: Path
):
    """White (or black, or red) strokes on a transparent canvas give the same model input as
    the same digit drawn light on dark, and are recognised."""
    from pipeline.core.images import prepare_image

    model = load_model(trained_digits.model)
    rows, reference = [], []
    for i in range(20):
        ink = digit_ink(trained_digits.test_images[i], 64)
        rows.append(prepare_image(canvas_export(ink, tmp_path / f"{i}.png", colour), 8))
        reference.append(prepare_image(save_grey(ink * 255, tmp_path / f"{i}-grey.png"), 8))
    np.testing.assert_allclose(rows, reference, atol=0.02)
    found = model.predict(np.stack(rows)).argmax(axis=1)
    assert (found == trained_digits.test_labels[:20]).sum() >= 16, found


def test_a_pen_drawn_canvas_export_is_answered_by_the_cli(
    trained_digits: TrainedDigits, tmp_path: Path
):
    seven = canvas_export(pen_seven(120, 9), tmp_path / "canvas.png", (255, 255, 255))
    result = run_predict(str(seven), "--model", str(trained_digits.model), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{seven}: "), result.stdout
    assert "error" not in result.stdout and "no digit" not in result.stdout


# --------------------------------------------------------------------------- a digit at the edge


def test_a_digit_cut_by_one_edge_is_answered_with_a_warning(
    trained_digits: TrainedDigits, tmp_path: Path
):
    """A digit running off the page's right edge: answered, with a warning on its line (and in
    its JSON entry); a tight crop (the digit spanning the whole height) gets none."""
    ink = digit_ink(trained_digits.test_images[0], 56)
    cut = save_grey(ink_on(page(100, 130), ink, 20, 70)[:, :100], tmp_path / "cut.png")
    tight = save_grey(tight_crop(ink, paper=255), tmp_path / "tight.png")  # touching all edges
    result = run_predict(str(cut), str(tight), "--model", str(trained_digits.model), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cut_line, tight_line = result.stdout.splitlines()
    assert cut_line.startswith(f"{cut}: ") and "warning: " in cut_line, cut_line
    assert "right edge" in cut_line, cut_line
    assert "warning" not in tight_line, tight_line
    entries = parse_json(
        run_predict(
            str(cut), str(tight), "--model", str(trained_digits.model), "--json", cwd=tmp_path
        )
    )
    assert "right edge" in entries[0]["warning"] and "warning" not in entries[1], entries


# --------------------------------------------------------------------------- pixel modes


def _modes(image) -> dict[str, tuple[object, str]]:
    """One grey drawing (white paper, a black bar, a mid-grey square) in the pixel modes and
    value conventions the documented formats carry: (image, format) by name."""
    from PIL import Image

    grey = np.asarray(image, dtype=np.float32)
    rgba = image.convert("RGBA")
    transparent_p = image.convert("P")
    transparent_p.info["transparency"] = 255  # no pixel is exactly 255 in the palette's use
    return {
        "L png": (image, "PNG"),
        "LA png": (image.convert("LA"), "PNG"),
        "P gif": (image.convert("P"), "GIF"),
        "RGBA webp (lossless)": (rgba, "WEBP"),
        "I;16 png": (Image.fromarray((grey * 257).astype(np.uint16)), "PNG"),
        "I;16 tiff": (Image.fromarray((grey * 257).astype(np.uint16)), "TIFF"),
        "I tiff": (image.convert("I"), "TIFF"),
        "F tiff in [0, 1]": (Image.fromarray(grey / 255, mode="F"), "TIFF"),
        "F tiff in [0, 255]": (Image.fromarray(grey, mode="F"), "TIFF"),
        "CMYK tiff": (image.convert("CMYK"), "TIFF"),
        "LAB tiff": (image.convert("RGB").convert("LAB"), "TIFF"),
        "YCbCr tiff": (image.convert("RGB").convert("YCbCr"), "TIFF"),
        "RGB ppm": (image.convert("RGB"), "PPM"),
        "CMYK jpeg": (image.convert("CMYK"), "JPEG"),
    }


def test_every_pixel_mode_is_read_as_the_picture_it_shows(tmp_path: Path):
    """16-bit, 32-bit, float in [0, 1] or [0, 255], CMYK (JPEG's inverted Adobe convention
    too), CIELAB, YCbCr, palette, grey with alpha: all read as the same grey levels."""
    from PIL import Image

    from pipeline.core.images import read_grey

    drawing = Image.new("L", (60, 60), 255)
    drawing.paste(0, (10, 10, 20, 50))
    drawing.paste(128, (30, 20, 50, 40))
    reference = np.asarray(drawing, dtype=np.float32)
    for name, (image, fmt) in _modes(drawing).items():
        path = tmp_path / f"{name.split()[0]}-{fmt}.{fmt.lower()}"
        image.save(path, fmt, **{"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}.get(fmt, {}))
        grey = read_grey(path)
        tolerance = 6 if fmt == "JPEG" else 2  # JPEG: its ringing at the bar's edges
        assert np.abs(grey - reference).max() <= tolerance, (name, grey[::10, ::10])
