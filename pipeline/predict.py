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
from pathlib import Path

from pipeline.core.images import IMAGE_SUFFIXES, read_grey
from pipeline.infra.errors import InputError
from pipeline.infra.inference import Failure, Prediction, answer, as_json, failure, locate
from pipeline.infra.model_loading import (
    DEFAULT_MODEL,
    check_model_exists,
    check_recorded_model,
    load_model,
)
from pipeline.infra.stage import run_command


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
                files.append(failure(str(path), err))
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
    located = [
        item if isinstance(item, Failure) else locate(str(item), lambda p=item: read_grey(p))
        for item in items
    ]
    names = [item.file if isinstance(item, Failure) else str(item) for item in items]
    return answer(located, names, lambda: load_model(model, tracking_uri, trust=trust_model))


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
