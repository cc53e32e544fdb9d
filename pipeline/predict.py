"""Use the trained model: which digit is in each image?

    python -m pipeline.predict IMAGE_OR_FOLDER... [--model PATH_OR_URI] [--json]
                               [--tracking-uri URI]

--model is models/model.keras (what `dvc repro` trains) by default; it also takes a saved Keras
file elsewhere, a local MLflow model folder, or an MLflow model URI (`runs:/<run id>/model`,
`models:/digit-classifier@champion`), read from --tracking-uri, else MLFLOW_TRACKING_URI, else
the project's sqlite:///mlflow.db.

Any ordinary image works (PNG, JPEG, ...; any size; dark ink on light paper or light on dark;
colour, grey, or transparent, which is composited on white). It is turned into what the model
was trained on, the way MNIST was made: grey, light digit on black, cropped to the digit,
scaled to fit a box keeping its aspect ratio, placed by its centre of mass on the model's
square canvas, pixels scaled to [0, 1]. The canvas side comes from the model's input size
(784 -> 28x28 MNIST, 64 -> 8x8 scikit-learn digits).

Every input is read and checked before the model is loaded, so a bad file fails fast with one
line naming it; nothing is printed for the others then.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.infra import paths
from pipeline.infra.errors import PipelineError, first_line
from pipeline.infra.stage import run_command

DEFAULT_MODEL = paths.MODELS_DIR / "model.keras"
MAX_MEGAPIXELS = 50
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")
# A digit is at least this many grey levels (of 255) darker or lighter than the background;
# less is a blank page, sensor noise or JPEG artefacts.
MIN_CONTRAST = 32.0
# Of the ink's peak: pixels above BOX_LEVEL bound the digit; those below NOISE_LEVEL are zeroed.
BOX_LEVEL = 0.15
NOISE_LEVEL = 0.05
# The cropped digit is kept at most this many pixels on its longer side until the model's canvas
# size is known (far above any model's, so the final resize is unaffected in practice).
CROP_CAP = 256
# The box the digit is fitted into, by canvas side. MNIST (28): 20x20, the digit's centre of
# mass at the centre. scikit-learn's 8x8 digits fill their canvas's full height (all 1,797 of
# them are 8 rows tall), so there the box is the whole canvas. Other sides: MNIST's proportion.
DIGIT_BOX = {28: 20, 8: 8}
MODEL_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/..., models:/..., s3://...


class InputError(PipelineError):
    """An input image cannot be used; the message names the file and the problem."""


class ModelError(PipelineError):
    """The model is missing or cannot be loaded or used."""


# --------------------------------------------------------------------------- images


def image_files(inputs: Iterable[Path]) -> list[Path]:
    """The files to classify: each file as given, each folder's image files (by suffix, sorted,
    not recursive). A missing path or a folder without images is an error."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                raise InputError(
                    f"{path}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def _to_grey(image) -> np.ndarray:
    """float32 grey levels 0..255; transparency composited on white."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / np.float32(257)
    if image.mode in ("I", "F"):
        grey = np.asarray(image, dtype=np.float32)
        peak = float(grey.max(initial=0))
        return grey * np.float32(255 / peak) if peak > 255 else grey
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def read_grey(path: Path, max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """Decode an image file (first frame, EXIF orientation applied) into float32 grey 0..255.

    Raises InputError for an empty file, a file that is not an image, a damaged image, and an
    image over `max_megapixels` (checked from the header, before any pixels are decoded)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an image")
    too_large = (
        f"{path}: image too large (the limit is {max_megapixels:g} megapixels); downscale it first"
    )
    try:
        with warnings.catch_warnings():
            # Our own limit is lower than Pillow's warning threshold; the error is ours to raise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_megapixels * 1e6:
                    raise InputError(
                        f"{path}: image too large ({width}x{height} = "
                        f"{width * height / 1e6:.1f} megapixels, the limit is "
                        f"{max_megapixels:g}); downscale it first"
                    )
                image.load()
                return _to_grey(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:
        raise InputError(too_large) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{path}: not an image (Pillow cannot identify it; use PNG, JPEG, BMP, GIF, TIFF "
            "or WebP)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # damaged/truncated images
        raise InputError(f"{path}: cannot read the image: {err}") from None


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a float image: area averaging when shrinking (how scikit-learn's digits were
    made from their 32x32 bitmaps, and no ringing), Lanczos when enlarging a small crop."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    shrinking = width <= image.width and height <= image.height
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return np.asarray(image.resize((width, height), resample), dtype=np.float32)


def locate_digit(grey: np.ndarray, name: str = "image") -> np.ndarray:
    """The digit as light ink on black in [0, 1], cropped to its bounding box (longer side at
    most CROP_CAP pixels). The background is what the border pixels mostly are: a light one is
    inverted, then subtracted. Raises InputError (naming `name`) if there is no digit."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 127.5:
        grey, background = 255 - grey, 255 - background
    ink = np.clip(grey - background, 0, None)
    peak = float(ink.max(initial=0))
    if peak < MIN_CONTRAST:
        raise InputError(f"{name}: no digit found (the image is blank or has no contrast)")
    ink /= peak
    rows = np.flatnonzero((ink > BOX_LEVEL).any(axis=1))
    cols = np.flatnonzero((ink > BOX_LEVEL).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    crop = np.where(crop < NOISE_LEVEL, 0, crop).astype(np.float32)
    height, width = crop.shape
    if max(height, width) > CROP_CAP:
        scale = CROP_CAP / max(height, width)
        crop = _resize(crop, max(1, round(width * scale)), max(1, round(height * scale)))
    return crop


def digit_box(side: int) -> int:
    """The square the digit is fitted into on a side x side canvas."""
    return DIGIT_BOX.get(side, max(1, round(side * 20 / 28)))


def to_model_input(crop: np.ndarray, side: int) -> np.ndarray:
    """Fit a located digit into digit_box(side) keeping its aspect ratio, place its centre of
    mass at the centre of a side x side canvas; returns the flattened canvas, float32 in [0, 1]."""
    box = digit_box(side)
    height, width = crop.shape
    scale = box / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    patch = np.clip(_resize(crop, new_w, new_h), 0, None)
    if patch.sum() <= 0:  # shrunk to nothing (cannot happen for a located digit; be safe)
        patch = np.ones_like(patch)
    patch /= patch.max()
    mass = patch.sum()
    ys, xs = np.indices(patch.shape, dtype=np.float64) + 0.5
    centre_y = float((ys * patch).sum() / mass)
    centre_x = float((xs * patch).sum() / mass)
    top = min(max(round(side / 2 - centre_y), 0), side - new_h)
    left = min(max(round(side / 2 - centre_x), 0), side - new_w)
    canvas = np.zeros((side, side), dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = patch
    return canvas.reshape(-1)


def prepare_image(path: Path, side: int) -> np.ndarray:
    """An image file as the model's input: side*side float32 pixels in [0, 1]."""
    return to_model_input(locate_digit(read_grey(path), str(path)), side)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Model:
    """A loaded classifier: flattened side x side pixels in, 10 class probabilities out."""

    source: str
    input_size: int
    predict: Callable[[np.ndarray], np.ndarray]

    @property
    def side(self) -> int:
        return math.isqrt(self.input_size)


def is_model_uri(model: str) -> bool:
    return bool(MODEL_URI.match(model))


def _checked(source: str, input_size: int | None, predict: Callable) -> Model:
    if input_size is None or math.isqrt(input_size) ** 2 != input_size:
        raise ModelError(
            f"model {source} takes {input_size} inputs, not a square image's flattened pixels"
        )
    return Model(source=source, input_size=input_size, predict=predict)


def _keras_model(network, source: str) -> Model:
    shape = network.input_shape
    size = shape[-1] if isinstance(shape, tuple) and len(shape) == 2 else None

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(network.predict(x, batch_size=256, verbose=0))

    return _checked(source, size, predict)


def _pyfunc_model(pyfunc, source: str) -> Model:
    schema = pyfunc.metadata.get_input_schema()
    shape = None
    if schema is not None and schema.is_tensor_spec() and len(schema.inputs) == 1:
        shape = schema.inputs[0].shape
    size = shape[-1] if shape is not None and len(shape) == 2 else None

    def predict(x: np.ndarray) -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' progress bar
            return np.asarray(pyfunc.predict(x))

    return _checked(source, size, predict)


def load_keras_file(path: Path) -> Model:
    """A model saved by the train stage (models/model.keras)."""
    if not path.exists():
        raise ModelError(
            f"model {path} not found. Train it first: run `dvc repro` (or `python -m "
            "pipeline.train`), or pass --model PATH or an MLflow URI such as runs:/<run id>/model"
        )
    from pipeline.core.models import keras  # imports TensorFlow with its start-up noise silenced

    try:
        network = keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for a file it cannot read
        raise ModelError(f"cannot load model {path}: {first_line(err)}") from None
    return _keras_model(network, str(path))


def load_mlflow_model(model: str, tracking_uri: str | None = None) -> Model:
    """An MLflow model (runs:/<id>/model, models:/<name>@<alias>, or a local MLflow model folder)
    through mlflow.pyfunc, from the store `tracking_uri` (see tracking.store_uri)."""
    from pipeline.infra.tracking import NO_STORE_FIX, check_store, store_uri, using_store

    uri = store_uri(tracking_uri)
    if is_model_uri(model):
        check_store(uri, NO_STORE_FIX)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with (
            tempfile.TemporaryDirectory(prefix="predict-model-") as local,
            using_store(uri),
            contextlib.redirect_stdout(io.StringIO()),  # Keras' progress bar, if any
        ):
            path = model
            if is_model_uri(model):
                # Fetched first, so an unknown run or model fails before TensorFlow is imported.
                path = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=local)
            import pipeline.core.models  # noqa: F401  # imports TensorFlow (which pyfunc loads) quietly

            pyfunc = mlflow.pyfunc.load_model(path)
    except MlflowException as err:
        raise ModelError(f"cannot load model {model} from {uri}: {first_line(err)}") from None
    except OSError as err:
        raise ModelError(f"cannot load model {model}: {err}") from None
    return _pyfunc_model(pyfunc, model)


def load_model(model: str | Path = DEFAULT_MODEL, tracking_uri: str | None = None) -> Model:
    """A Keras file path, a local MLflow model folder, or an MLflow model URI."""
    text = str(model)
    if is_model_uri(text) or (Path(text) / "MLmodel").is_file():
        return load_mlflow_model(text, tracking_uri)
    return load_keras_file(Path(text))


def check_model_exists(model: str | Path, tracking_uri: str | None = None) -> None:
    """Fail fast (before the images are read) when a model file or the MLflow store is missing."""
    from pipeline.infra.tracking import NO_STORE_FIX, check_store, store_uri

    text = str(model)
    if is_model_uri(text):
        check_store(store_uri(tracking_uri), NO_STORE_FIX)
    elif not Path(text).exists():
        load_keras_file(Path(text))  # raises the missing-model error


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    file: str
    digit: int
    probability: float
    probabilities: list[float]

    def line(self) -> str:
        return f"{self.file}: {self.digit} (p={self.probability:.2f})"


def classify(model: Model, pixels: np.ndarray, names: Sequence[str]) -> list[Prediction]:
    """Predict prepared inputs (one row per image) -> one Prediction per name."""
    probabilities = model.predict(np.asarray(pixels, dtype=np.float32))
    if probabilities.ndim != 2 or len(probabilities) != len(names):
        raise ModelError(
            f"model {model.source} returned shape {probabilities.shape}, "
            f"expected ({len(names)}, classes)"
        )
    predictions = []
    for name, row in zip(names, probabilities, strict=True):
        digit = int(row.argmax())
        predictions.append(
            Prediction(
                file=name,
                digit=digit,
                probability=round(float(row[digit]), 6),
                probabilities=[round(float(p), 6) for p in row],
            )
        )
    return predictions


def predict_files(
    inputs: Sequence[Path], model: str | Path = DEFAULT_MODEL, tracking_uri: str | None = None
) -> list[Prediction]:
    """Classify image files and folders' images with `model`. Every image is read and checked
    first, then the model is loaded (TensorFlow is imported only then)."""
    files = image_files(inputs)
    check_model_exists(model, tracking_uri)
    crops = [locate_digit(read_grey(path), str(path)) for path in files]
    loaded = load_model(model, tracking_uri)
    pixels = np.stack([to_model_input(crop, loaded.side) for crop in crops])
    return classify(loaded, pixels, [str(path) for path in files])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Classify images of handwritten digits with the trained model.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="a .keras file, an MLflow model folder, or an MLflow URI such as runs:/<run id>/model "
        "or models:/digit-classifier@champion (default: %(default)s)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store for model URIs (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {file, digit, probability, probabilities}",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def predict_and_print() -> None:
        predictions = predict_files(args.inputs, args.model, args.tracking_uri)
        if args.json:
            print(json.dumps([asdict(p) for p in predictions], indent=2))
        else:
            for prediction in predictions:
                print(prediction.line())

    return run_command(predict_and_print)


if __name__ == "__main__":
    sys.exit(main())
