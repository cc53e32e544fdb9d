"""Use the trained model: which digit is in each image?

    python -m pipeline.predict IMAGE_OR_FOLDER... [--model PATH_OR_URI] [--json]
                               [--tracking-uri URI] [--trust-model]

--model is models/model.keras (what `dvc repro` trains) by default; it also takes a saved Keras
file elsewhere, a local MLflow model folder, or an MLflow model URI (`runs:/<run id>/model`,
`models:/digit-classifier@champion`), read from --tracking-uri, else MLFLOW_TRACKING_URI, else
the project's sqlite:///mlflow.db. Only models that load without running code from the artifact
are accepted (a .keras file in Keras' safe mode, an MLflow model's Keras/TensorFlow flavour);
--trust-model admits the rest, e.g. an MLflow pyfunc model, whose loading runs its code as you.

Any ordinary image works (PNG, JPEG, BMP, GIF, TIFF, WebP, PGM/PPM; no other format is opened,
whatever the file's name; any size; dark ink on light paper or light on dark; colour, grey,
16-bit, float or transparent, whatever colour the strokes; a photo of unevenly lit paper).
pipeline.core.images turns it into what the model was trained on, the way MNIST was made: grey,
light digit on black, the background subtracted, cropped to the digit, scaled to fit a box
keeping its aspect ratio, placed by its centre of mass on the model's square canvas, pixels
scaled to [0, 1]. A digit touching one edge of the image (or two that meet) may be cut off: its
line carries a warning (`; warning: ...`, in --json a `warning` field). The canvas side comes
from the model's input shape, in any of the usual layouts: flattened (784,), (28, 28) or
(28, 28, 1) -> 28x28 MNIST, (64,), (8, 8) or (8, 8, 1) -> 8x8 scikit-learn digits; the model
must give 10 class scores per image (logits are turned into probabilities).

A batch never stops on one bad file: every input gets one line, in order, `<file>: <digit>
(p=<probability>)` or `<file>: error: <problem>` (with --json, an entry with the prediction's
fields or an `error` field). The exit code is 0 when every input was classified, 1 when any was
not (stderr then says how many) or when the command itself failed: a missing or unloadable model
or store is one `error:` line and nothing else. Every input is read and checked before the model
is loaded (TensorFlow is imported only then), and not at all when no input is usable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.core.images import (
    IMAGE_SUFFIXES,
    Located,
    locate_digit,
    read_grey,
    to_model_input,
)
from pipeline.infra.errors import InputError
from pipeline.infra.model_loading import (
    DEFAULT_MODEL,
    Model,
    check_model_exists,
    check_recorded_model,
    load_model,
)
from pipeline.infra.stage import run_command


@dataclass(frozen=True)
class Failure:
    """An input that could not be classified, and why (the message without the file's name)."""

    file: str
    error: str

    def line(self) -> str:
        return f"{self.file}: error: {self.error}"


def _failure(path: Path, err: InputError | OSError) -> Failure:
    """An InputError names its file first (`<path>: <problem>`); keep only the problem."""
    message = str(err) if isinstance(err, InputError) else f"cannot read it: {err}"
    return Failure(file=str(path), error=message.removeprefix(f"{path}: "))


def image_files(inputs: Iterable[Path]) -> list[Path | Failure]:
    """The files to classify, in order: each file as given, each folder's image files (by
    suffix, sorted, not recursive). A missing path or an unreadable folder or one without images
    is a Failure in its place."""
    files: list[Path | Failure] = []
    for path in inputs:
        if path.is_dir():
            try:
                found = sorted(
                    p
                    for p in path.iterdir()
                    if p.is_file()
                    and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")
                )
            except OSError as err:
                files.append(_failure(path, err))
                continue
            if not found:
                files.append(
                    Failure(str(path), f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            files.append(Failure(str(path), "no such file or folder"))
    return files


@dataclass(frozen=True)
class Prediction:
    """One image's result: the most probable digit, its probability and all ten (6 places)."""

    file: str
    digit: int
    probability: float
    probabilities: list[float]
    warning: str | None = None  # e.g. the digit touches one edge of the image

    def line(self) -> str:
        answer = f"{self.file}: {self.digit} (p={self.probability:.2f})"
        return f"{answer}; warning: {self.warning}" if self.warning else answer


def classify(
    model: Model,
    pixels: np.ndarray,
    names: Sequence[str],
    warnings: Sequence[str | None] | None = None,
) -> list[Prediction]:
    """Predict prepared inputs (one flattened canvas per image) -> one Prediction per name,
    with its warning if any. Raises ModelError when the model does not answer 10 scores per
    image (Model.predict)."""
    probabilities = model.predict(pixels)
    predictions = []
    for name, row, warning in zip(
        names, probabilities, warnings or [None] * len(names), strict=True
    ):
        digit = int(row.argmax())
        predictions.append(
            Prediction(
                file=name,
                digit=digit,
                probability=round(float(row[digit]), 6),
                probabilities=[round(float(p), 6) for p in row],
                warning=warning,
            )
        )
    return predictions


def _located(path: Path) -> Located | Failure:
    try:
        return locate_digit(read_grey(path), str(path))
    except (InputError, OSError) as err:
        return _failure(path, err)


def as_json(result: Prediction | Failure) -> dict:
    """A result's JSON entry: its fields, without a warning it does not have."""
    return {key: value for key, value in asdict(result).items() if value is not None}


def predict_files(
    inputs: Sequence[Path],
    model: str | Path = DEFAULT_MODEL,
    tracking_uri: str | None = None,
    trust_model: bool = False,
) -> list[Prediction | Failure]:
    """Classify image files and folders' images with `model`: one Prediction or Failure per
    input file, in order. A missing model file or store fails first; then every image is read
    and checked; then, if any is usable, the model is loaded (TensorFlow is imported only then;
    `trust_model` admits models whose loading runs code from the artifact, model_loading's
    `trust`). Raises ModelError or TrackingError for the model, never for an image."""
    check_model_exists(model, tracking_uri)
    if Path(model) == DEFAULT_MODEL:  # train's, of the run in runs/train.json
        check_recorded_model()
    items = image_files(inputs)
    located = [item if isinstance(item, Failure) else _located(item) for item in items]
    usable = [i for i, entry in enumerate(located) if not isinstance(entry, Failure)]
    if not usable:
        return [entry for entry in located if isinstance(entry, Failure)]
    loaded = load_model(model, tracking_uri, trust=trust_model)
    pixels = np.stack([to_model_input(located[i].crop, loaded.side) for i in usable])
    names = [str(items[i]) for i in usable]
    predictions = classify(loaded, pixels, names, [located[i].warning for i in usable])
    answers = dict(zip(usable, predictions, strict=True))
    return [answers.get(i, entry) for i, entry in enumerate(located)]


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
        "--trust-model",
        action="store_true",
        help="also load models that only load by running code from the model artifact (an "
        "MLflow pyfunc model's pickle, a flavour other than Keras/TensorFlow, a non-.keras file): "
        "this runs code from the model artifact as you, so use it only for a model whose author "
        "you trust (by default only .keras files, in Keras' safe mode, and MLflow models' "
        "Keras/TensorFlow flavour load)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {file, digit, probability, probabilities}, or {file, error} "
        "for an input that could not be classified",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def predict_and_print() -> None:
        results = predict_files(args.inputs, args.model, args.tracking_uri, args.trust_model)
        if args.json:
            print(json.dumps([as_json(result) for result in results], indent=2))
        else:
            for result in results:
                print(result.line())
        failed = sum(isinstance(result, Failure) for result in results)
        if failed:
            # After the answers: the exit code (1) says the batch was not all classified.
            raise InputError(
                f"{failed} of {len(results)} inputs could not be classified; each one's line "
                "of the output says why"
            )

    return run_command(predict_and_print)


if __name__ == "__main__":
    sys.exit(main())
