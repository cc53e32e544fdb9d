"""A trained classifier loaded for prediction: a Keras file (models/model.keras, what `dvc repro`
trains), a local MLflow model folder, or an MLflow model URI (`runs:/<run id>/model`,
`models:/digit-classifier@champion`) read from a tracking store.

Whatever the source, the result is a Model: flattened side x side pixels in, 10 class
probabilities out. TensorFlow is imported only when a model is actually loaded.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.infra import paths
from pipeline.infra.errors import ModelError, first_line

DEFAULT_MODEL = paths.MODELS_DIR / "model.keras"
MODEL_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/..., models:/..., s3://...


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
    """True for a URI with a scheme (runs:/, models:/, s3://, ...), False for a local path."""
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
    """A model saved by the train stage (models/model.keras). Raises ModelError when the file is
    missing or Keras cannot read it, or the model does not take a flattened square image."""
    if not path.exists():
        raise ModelError(
            f"model {path} not found. Train it first: run `dvc repro` (or `python -m "
            "pipeline.train`), or pass --model PATH or an MLflow URI such as runs:/<run id>/model"
        )
    from pipeline.core.training import keras  # imports TensorFlow with its start-up noise silenced

    try:
        network = keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for a file it cannot read
        raise ModelError(f"cannot load model {path}: {first_line(err)}") from None
    return _keras_model(network, str(path))


def load_mlflow_model(model: str, tracking_uri: str | None = None) -> Model:
    """An MLflow model (runs:/<id>/model, models:/<name>@<alias>, or a local MLflow model folder)
    through mlflow.pyfunc, from the store `tracking_uri` (see tracking.store_uri). Raises
    TrackingError when that store does not exist, ModelError when MLflow cannot load the model."""
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
            import pipeline.core.training  # noqa: F401  # imports TensorFlow (which pyfunc loads) quietly

            pyfunc = mlflow.pyfunc.load_model(path)
    except MlflowException as err:
        raise ModelError(f"cannot load model {model} from {uri}: {first_line(err)}") from None
    except OSError as err:
        raise ModelError(f"cannot load model {model}: {err}") from None
    return _pyfunc_model(pyfunc, model)


def load_model(model: str | Path = DEFAULT_MODEL, tracking_uri: str | None = None) -> Model:
    """A Keras file path, a local MLflow model folder, or an MLflow model URI; raises as
    load_keras_file and load_mlflow_model do."""
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
