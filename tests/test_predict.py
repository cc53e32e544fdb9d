"""`python -m pipeline.predict` on ordinary image files, against a model the pipeline trains.

Everything is real: the digits dataset is fetched, preprocessed and trained on with the
pipeline's own code into a real sqlite MLflow store; the test images are the held-out test
digits themselves, rendered the way people store digits (dark ink on light paper, colour JPEG,
transparent PNG, a large page with the digit off-centre); bad inputs are real files, and the CLI
runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import (
    STYLES,
    TrainedDigits,
    assert_one_line_error,
    parse_json,
    render,
    run_predict,
)

from pipeline.core.images import digit_box, prepare_image
from pipeline.infra.inference import classify
from pipeline.infra.model_loading import Model, load_model

# conftest's `trained_digits` (60 epochs, width 64) recognises the rendered test digits ~95% of
# the time (measured per style: 0.91-0.96 over all 450).
SAMPLES = 20  # test digits rendered per style
MIN_CORRECT = 16  # of SAMPLES: 80%, well under the ~95% measured, far above chance (10%)


# --------------------------------------------------------------------------- the trained model


@pytest.fixture(scope="module")
def model(trained_digits: TrainedDigits) -> Model:
    return load_model(trained_digits.model)


def test_trained_model_recognises_the_test_set(trained_digits: TrainedDigits, model: Model):
    # The bar for the rendered images below only means something if the model is this good.
    assert trained_digits.test_accuracy > 0.93
    assert model.input_size == 64 and model.side == 8


# --------------------------------------------------------------------------- rendering


def render_samples(trained: TrainedDigits, folder: Path, style: str, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        render(trained.test_images[i], style, folder / f"{i:03d}-{style}", index=i)
        for i in range(count)
    ]


def test_rendering_keeps_the_digit(trained_digits: TrainedDigits, tmp_path: Path):
    """The rendered files really are the test digits, in the intended form (so the recognition
    test below tests the preprocessing, not the renderer)."""
    digit = trained_digits.test_images[0]
    for style in STYLES:
        with Image.open(render(digit, style, tmp_path / f"x-{style}")) as image:
            assert image.mode == {
                "colour.jpg": "RGB",
                "transparent.png": "RGBA",
            }.get(style, "L")
    back = np.asarray(Image.open(tmp_path / "x-light-on-dark.png"))[::10, ::10] / 255
    np.testing.assert_allclose(back, digit, atol=1 / 255)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("style", STYLES)
def test_rendered_test_digits_are_recognised(
    style: str, trained_digits: TrainedDigits, model: Model, tmp_path: Path
):
    files = render_samples(trained_digits, tmp_path, style, SAMPLES)
    pixels = np.stack([prepare_image(path, model.side) for path in files])
    assert pixels.shape == (SAMPLES, 64)
    assert pixels.dtype == np.float32 and pixels.min() >= 0 and pixels.max() == 1
    found = [p.digit for p in classify(model, pixels, [str(f) for f in files])]
    truth = trained_digits.test_labels[:SAMPLES].tolist()
    correct = sum(f == t for f, t in zip(found, truth, strict=True))
    assert correct >= MIN_CORRECT, f"{style}: {correct}/{SAMPLES} right: {found} vs {truth}"


def test_same_digit_in_any_form_gives_nearly_the_same_input(
    trained_digits: TrainedDigits, tmp_path
):
    """Inverted, transparent and padded-off-centre versions of one digit are all normalised to
    the light-on-dark one (the JPEG is smooth and lossy: close, not equal)."""
    digit = trained_digits.test_images[3]
    inputs = {
        style: prepare_image(render(digit, style, tmp_path / f"d-{style}", 3), 8)
        for style in STYLES
    }
    reference = inputs["light-on-dark.png"]
    for style in ("dark-on-light.png", "transparent.png", "off-centre.png"):
        np.testing.assert_allclose(inputs[style], reference, atol=0.02, err_msg=style)
    assert np.abs(inputs["colour.jpg"] - reference).mean() < 0.1


def test_mnist_canvas_fits_the_digit_in_20x20_centred_by_mass(tmp_path: Path):
    """For a 28x28 model: a tall stroke on a large page becomes a 20-pixel-tall digit whose
    centre of mass is at the canvas centre, aspect ratio kept."""
    page = Image.new("L", (600, 400), 255)
    page.paste(0, (400, 50, 460, 350))  # a 60x300 black bar, far right of centre
    page.save(tmp_path / "bar.png")
    canvas = prepare_image(tmp_path / "bar.png", 28).reshape(28, 28)
    rows = np.flatnonzero(canvas.max(axis=1) > 0.5)
    cols = np.flatnonzero(canvas.max(axis=0) > 0.5)
    assert rows[-1] - rows[0] + 1 == 20
    assert cols[-1] - cols[0] + 1 == 4  # 60/300 of 20
    ys, xs = np.indices(canvas.shape) + 0.5
    assert (ys * canvas).sum() / canvas.sum() == pytest.approx(14, abs=0.5)
    assert (xs * canvas).sum() / canvas.sum() == pytest.approx(14, abs=0.5)


def test_digit_box_follows_each_datasets_convention():
    assert digit_box(28) == 20  # MNIST
    assert digit_box(8) == 8  # scikit-learn digits fill their full height
    assert digit_box(56) == 40  # others: MNIST's proportion


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def sample_folder(trained_digits: TrainedDigits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten test digits, two per style, plus a file the folder scan must skip."""
    folder = tmp_path_factory.mktemp("samples")
    for i in range(10):
        render(
            trained_digits.test_images[i],
            STYLES[i % len(STYLES)],
            folder / f"{i}-{STYLES[i % 5]}",
            i,
        )
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder\n")
    return folder


@pytest.fixture(scope="module")
def keras_json(trained_digits: TrainedDigits, sample_folder: Path) -> list[dict]:
    """The CLI's --json answer for the sample folder with the saved .keras model."""
    return parse_json(
        run_predict(
            str(sample_folder),
            "--model",
            str(trained_digits.model),
            "--json",
            cwd=trained_digits.root,
        )
    )


def test_json_lists_every_image_of_a_folder(keras_json: list[dict], trained_digits, sample_folder):
    expected_files = sorted(str(p) for p in sample_folder.iterdir() if p.suffix != ".txt")
    assert [entry["file"] for entry in keras_json] == expected_files
    for entry in keras_json:
        assert set(entry) == {"file", "digit", "probability", "probabilities"}
        probabilities = entry["probabilities"]
        assert len(probabilities) == 10 and sum(probabilities) == pytest.approx(1, abs=1e-4)
        assert entry["digit"] == int(np.argmax(probabilities))
        assert entry["probability"] == pytest.approx(max(probabilities), abs=1e-6)
    labels = {f"{i}-{STYLES[i % 5]}": int(trained_digits.test_labels[i]) for i in range(10)}
    correct = sum(entry["digit"] == labels[Path(entry["file"]).name] for entry in keras_json)
    assert correct >= 8, keras_json


def test_default_model_and_one_line_per_file(trained_digits: TrainedDigits, sample_folder: Path):
    """Run in the trained project (models/model.keras is the default): `<path>: <digit> (p=..)`."""
    files = sorted(p for p in sample_folder.iterdir() if p.suffix != ".txt")[:3]
    result = run_predict(*(str(f) for f in files), cwd=trained_digits.root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for path, line in zip(files, lines, strict=True):
        assert re.fullmatch(rf"{re.escape(str(path))}: \d \(p=[01]\.\d\d\)", line), line
    assert "Traceback" not in result.stderr


def test_runs_uri_gives_the_same_predictions_as_the_keras_file(
    trained_digits: TrainedDigits, sample_folder: Path, keras_json: list[dict], tmp_path: Path
):
    """--model runs:/<id>/model, the store taken from MLFLOW_TRACKING_URI (any working dir)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained_digits.tracking_uri}
    via_mlflow = parse_json(
        run_predict(
            str(sample_folder),
            "--model",
            trained_digits.run_model_uri,
            "--json",
            cwd=tmp_path,
            env=env,
        )
    )
    assert [e["file"] for e in via_mlflow] == [e["file"] for e in keras_json]
    assert [e["digit"] for e in via_mlflow] == [e["digit"] for e in keras_json]
    np.testing.assert_allclose(
        [e["probabilities"] for e in via_mlflow],
        [e["probabilities"] for e in keras_json],
        atol=1e-5,
    )


def test_runs_uri_in_process_with_tracking_uri(trained_digits: TrainedDigits, model: Model):
    """load_model(runs:/..., tracking_uri) == the .keras file, and MLflow's global store and
    MLFLOW_TRACKING_URI are left as they were."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    loaded = load_model(trained_digits.run_model_uri, trained_digits.tracking_uri)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    assert loaded.input_size == 64
    x = trained_digits.test_images[:50].reshape(50, -1)
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), atol=1e-6)


# --------------------------------------------------------------------------- bad inputs


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that only declares its size (1-bit grey), with no real pixel data: what a
    decompression bomb looks like until it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def _text(path: Path) -> Path:
    path.write_text("digits: 1 2 3\n")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _blank(path: Path) -> Path:
    Image.new("RGB", (120, 90), (235, 235, 228)).save(path)
    return path


def _blank_transparent(path: Path) -> Path:
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(path)
    return path


def _huge(path: Path) -> Path:
    Image.new("1", (10_000, 6_000)).save(path)  # 60 megapixels, a few kB on disk
    return path


def _bomb(path: Path) -> Path:
    return png_header(path, 20_000, 10_000)  # 200 megapixels: over Pillow's own bomb limit


def _truncated(path: Path) -> Path:
    full = path.with_name("full.png")
    Image.new("L", (64, 64), 255).save(full)
    path.write_bytes(full.read_bytes()[:60])
    return path


BAD_INPUTS: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "text file": ("notes.png", _text, "not an image"),
    "empty file": ("empty.png", _empty, "empty file"),
    "blank image": ("blank.jpg", _blank, "no digit found"),
    "blank transparent image": ("clear.png", _blank_transparent, "no digit found"),
    "huge image": ("huge.png", _huge, "image too large (10000x6000 = 60.0 megapixels"),
    "decompression bomb": ("bomb.png", _bomb, "image too large"),
    "truncated image": ("cut.png", _truncated, "cannot read the image"),
}


ANSWER = r"\d \(p=[01]\.\d\d\)"  # what a file's line says after "<file>: "


def assert_batch(result: subprocess.CompletedProcess[str], expected: list[tuple[Path, str]]):
    """A batch that ran to its end: one stdout line per input, in order, `<file>: <answer>` for
    each input whose expected text is "" and `<file>: error: <...text...>` for the others; exit
    1 and one stderr `error:` line counting the failures when any failed, else exit 0."""
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(expected), result.stdout
    for line, (path, problem) in zip(lines, expected, strict=True):
        if problem:
            assert line.startswith(f"{path}: error: ") and problem in line, line
        else:
            assert re.fullmatch(rf"{re.escape(str(path))}: {ANSWER}", line), line
    failed = sum(bool(problem) for _, problem in expected)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if failed:
        assert result.returncode == 1, result.stderr
        assert len(errors) == 1, result.stderr
        assert f"{failed} of {len(expected)} inputs" in errors[0], errors[0]
    else:
        assert result.returncode == 0 and errors == [], result.stderr


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_file_gets_its_error_line_and_the_others_their_answers(
    case: str, trained_digits: TrainedDigits, tmp_path: Path
):
    name, make, problem = BAD_INPUTS[case]
    bad = make(tmp_path / name)
    good = render(trained_digits.test_images[0], "dark-on-light.png", tmp_path / "good.png")
    later = render(trained_digits.test_images[1], "colour.jpg", tmp_path / "later.jpg")
    result = run_predict(
        str(good), str(bad), str(later), "--model", str(trained_digits.model), cwd=tmp_path
    )
    assert_batch(result, [(good, ""), (bad, problem), (later, "")])


def test_missing_file_and_imageless_folder(trained_digits: TrainedDigits, tmp_path: Path):
    good = render(trained_digits.test_images[0], "dark-on-light.png", tmp_path / "good.png")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    missing, docs = tmp_path / "nope.png", tmp_path / "docs"
    result = run_predict(
        str(missing), str(docs), str(good), "--model", str(trained_digits.model), cwd=tmp_path
    )
    assert_batch(
        result,
        [(missing, "no such file or folder"), (docs, "folder holds no image files"), (good, "")],
    )


def test_missing_model_says_how_to_train_one(trained_digits: TrainedDigits, tmp_path: Path):
    good = render(trained_digits.test_images[0], "dark-on-light.png", tmp_path / "good.png")
    result = run_predict(str(good), cwd=tmp_path)  # no models/model.keras here
    assert_one_line_error(result, "models/model.keras not found", "dvc repro", "pipeline.train")


def test_unusable_model_file(trained_digits: TrainedDigits, tmp_path: Path):
    good = render(trained_digits.test_images[0], "dark-on-light.png", tmp_path / "good.png")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"this is not a zip archive")
    result = run_predict(str(good), "--model", str(broken), cwd=tmp_path)
    assert_one_line_error(result, f"cannot load model {broken}")


def test_json_gives_a_failed_file_an_error_field_and_the_same_answers_to_the_rest(
    trained_digits: TrainedDigits, sample_folder: Path, keras_json: list[dict], tmp_path: Path
):
    bad = _truncated(tmp_path / "cut.png")
    result = run_predict(
        str(bad), str(sample_folder), "--model", str(trained_digits.model), "--json", cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    entries = json.loads(result.stdout)
    assert entries[0] == {"file": str(bad), "error": entries[0]["error"]}
    assert entries[0]["error"].startswith("cannot read the image")
    assert entries[1:] == keras_json
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"1 of {len(entries)} inputs" in errors[0], result.stderr


def test_a_model_error_fails_the_whole_batch_before_any_line(
    trained_digits: TrainedDigits, tmp_path: Path
):
    good = render(trained_digits.test_images[0], "dark-on-light.png", tmp_path / "good.png")
    bad = _text(tmp_path / "notes.png")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"this is not a zip archive")
    result = run_predict(str(good), str(bad), "--model", str(broken), cwd=tmp_path)
    assert_one_line_error(result, f"cannot load model {broken}")


def test_a_batch_of_only_bad_files_never_loads_the_model(tmp_path: Path):
    """Nothing to classify: each file gets its error line and the model is not even read (no
    TensorFlow start-up for a batch that cannot use it)."""
    model = tmp_path / "model.keras"
    model.write_bytes(b"never read")
    bad, blank = _text(tmp_path / "notes.png"), _blank(tmp_path / "blank.jpg")
    result = run_predict(str(bad), str(blank), "--model", str(model), cwd=tmp_path)
    assert_batch(result, [(bad, "not an image"), (blank, "no digit found")])
    assert "cannot load model" not in result.stderr


def test_missing_store_and_unknown_run(trained_digits: TrainedDigits, tmp_path: Path):
    good = render(trained_digits.test_images[0], "dark-on-light.png", tmp_path / "good.png")
    # No mlflow.db in the working directory: say so instead of creating an empty store.
    result = run_predict(str(good), "--model", trained_digits.run_model_uri, cwd=tmp_path)
    assert_one_line_error(result, f"sqlite:///{tmp_path / 'mlflow.db'} does not exist")
    assert not (tmp_path / "mlflow.db").exists()
    unknown = "runs:/0123456789abcdef0123456789abcdef/model"
    result = run_predict(
        str(good), "--model", unknown, "--tracking-uri", trained_digits.tracking_uri, cwd=tmp_path
    )
    assert_one_line_error(result, f"cannot load model {unknown}", "not found")
