"""The served model: pictures in, digits out, through the same code as `predict`.

Train logs it beside the Keras network (`runs:/<run id>/served`; the registry's
`models:/digit-classifier@champion`), so `mlflow models serve` answers images, not pixel rows, and
no client re-implements the preprocessing (training/serving skew). It is an MLflow pyfunc model
logged from code (MLflow's "models from code"): this file is stored as the model's code and run
when the model loads, nothing is pickled. The network is the model's `network` artifact, the
train run's .keras file, read in Keras' safe mode (model_loading.load_keras_file); the pipeline
package goes with it as the model's code path, so a server runs the code it was trained with.

Loading it runs this file, so `pipeline.predict` does not load it without --trust-model
(docs/SECURITY.md); `mlflow models serve` does, as it loads any pyfunc model.

Request (MLflow's scoring protocol): a column `image` of base64-encoded image files (PNG, JPEG, ...,
core.images.FORMATS), one row per image, e.g. `{"dataframe_records": [{"image": "<base64>"}]}`.
Response: `{"predictions": [...]}`, one entry per image, in order: `{"digit", "probability",
"probabilities"}` (and `warning` when the digit touches an edge), or `{"error"}` for an image
that cannot be classified; one bad image never fails the others.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

NAME = "served"  # the model's name in its run: runs:/<run id>/served
NETWORK = "network"  # the artifact holding the Keras network
COLUMN = "image"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/


def _image_bytes(value: object, name: str) -> bytes:
    """A request's image: base64 text (JSON carries no bytes), or bytes when called in-process."""
    from pipeline.infra.errors import InputError

    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise InputError(f"{name}: not an image: expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{name}: not base64 text (an image file's bytes, base64-encoded)"
        ) from None


def _entry(result) -> dict:
    """A served answer: predict's --json entry without the file name (the request has none)."""
    from pipeline.infra.inference import as_json

    entry = as_json(result)
    entry.pop("file")
    return entry


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Images (base64 in the `image` column) -> one answer per image, as predict gives them."""

    def load_context(self, context) -> None:
        from pipeline.infra.model_loading import load_keras_file

        self.model = load_keras_file(Path(context.artifacts[NETWORK]))

    # A DataFrame type hint: MLflow infers no signature from it (the logged one stands) and does
    # not warn that type hints are missing.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[dict]:
        from pipeline.core.images import decode_grey
        from pipeline.infra.errors import InputError
        from pipeline.infra.inference import answer, failure, locate

        values = list(model_input[COLUMN])
        names = [f"image {i}" for i in range(len(values))]
        located = []
        for name, value in zip(names, values, strict=True):
            try:
                data = _image_bytes(value, name)
            except InputError as err:
                located.append(failure(name, err))
                continue
            located.append(locate(name, lambda data=data, name=name: decode_grey(data, name)))
        return [_entry(r) for r in answer(located, names, lambda: self.model)]


def signature():
    """The request's column and the answer's fields (every answer field is optional: an entry
    has either the prediction's or `error`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.long, "digit", required=False),
                ColSpec(DataType.double, "probability", required=False),
                ColSpec(Array(DataType.double), "probabilities", required=False),
                ColSpec(DataType.string, "warning", required=False),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
    )


def png(image: np.ndarray) -> bytes:
    """A (H, W) image in [0, 1], light digit on dark as the datasets store it, as PNG bytes of
    dark ink on white paper (how a client's picture looks)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(255 - image * 255).astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def request_frame(images: Sequence[bytes]) -> pd.DataFrame:
    """Image files' bytes as the served model's input (a DataFrame of base64 text)."""
    return pd.DataFrame({COLUMN: [base64.b64encode(data).decode("ascii") for data in images]})


def log_served_model(network_file: Path, examples: np.ndarray, requirements: list[str]) -> None:
    """Log the served model into the active run as NAME: this file as its code, `network_file`
    (a .keras file) as its network, the pipeline package as its code path, the signature, and
    `examples` ((N, H, W) test images in [0, 1]) as PNGs for its input example. `requirements`:
    the network's pinned pip requirements (Pillow and SciPy, which core.images uses, are
    added). MLflow checks the example by loading the logged model and answering it."""
    from importlib.metadata import version

    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level, bar = pyfunc_log.level, os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    # Quiet: MLflow's "Validating input example" line, and the progress bar of its reloading
    # the logged model to answer the example.
    pyfunc_log.setLevel(logging.WARNING)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"
    try:
        mlflow.pyfunc.log_model(
            name=NAME,
            python_model=Path(__file__),
            artifacts={NETWORK: str(network_file)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(),
            input_example=request_frame([png(image) for image in examples]),
            pip_requirements=[*requirements, *(f"{p}=={version(p)}" for p in ("pillow", "scipy"))],
        )
    finally:
        pyfunc_log.setLevel(level)
        if bar is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = bar


# Models from code: MLflow runs this file when the model is logged or loaded and serves the model
# set here (importing this module elsewhere only sets that marker).
mlflow.models.set_model(ImageClassifier())
