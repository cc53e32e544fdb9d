"""A trained classifier loaded for prediction: a Keras file (models/model.keras, what `dvc repro`
trains), a local MLflow model folder, or an MLflow model URI (`runs:/<run id>/model`,
`models:/digit-classifier@champion`) read from a tracking store.

Whatever the source, the result is a Model: flattened side x side pixels in, 10 class
probabilities out. The network itself may take the canvas in any of the usual MNIST layouts:
flattened (N,) with N = side*side, (side, side), or one channel (side, side, 1); a model that
takes anything else, or does not give 10 scores per image, is refused in one line naming what it
found. Scores that are not probabilities (logits: a last Dense(10) without softmax, as in
TensorFlow's beginner quickstart) are turned into probabilities with softmax. TensorFlow is
imported only when a model is actually loaded.

Only formats that load without running code from the artifact are read by default: a .keras file
in Keras' safe mode (a Lambda layer, which is Python bytecode, is refused), and an MLflow model
through its `tensorflow` or `keras` flavour's saved .keras file, read the same way. Anything else
(a pyfunc model's pickled python_model, another flavour, a pickle) is refused unless the caller
trusts its author (`trust=True`, predict's --trust-model): then MLflow's own pyfunc loader runs,
and with it whatever code the artifact holds.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.data import NUM_CLASSES
from pipeline.infra import paths
from pipeline.infra.errors import ModelError, first_line
from pipeline.infra.files import file_sha256, read_json

DEFAULT_MODEL = paths.MODELS_DIR / "model.keras"
MODEL_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/..., models:/..., s3://...
# MLflow flavours whose data folder holds the model as a .keras file: mlflow.tensorflow's (for a
# Keras model with TensorFlow >= 2.16) and mlflow.keras's (Keras 3), both data/model.keras.
KERAS_FLAVOURS = ("tensorflow", "keras")
KERAS_FILE = "model.keras"
TRUST_FIX = (
    "pass --trust-model to load it anyway, only if you trust whoever wrote it "
    "(that runs code from the model artifact as you)"
)


# What predict can give a model, for the messages that refuse one.
LAYOUTS = "(N,), (S, S) or (S, S, 1) with N = S*S, e.g. (784,), (28, 28) or (28, 28, 1) for MNIST"


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _probabilities(source: str, scores: np.ndarray, count: int) -> np.ndarray:
    """A model's answer for `count` images as (count, NUM_CLASSES) float32 probabilities: when
    not every row already is a probability distribution (non-negative, summing to 1 within
    1e-3), the rows are logits and go through softmax. Raises ModelError for any other shape."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (count, NUM_CLASSES):
        raise ModelError(
            f"model {source} returned shape {shape_text(scores.shape)} for {count} images, "
            f"not ({count}, {NUM_CLASSES}) class probabilities"
        )
    is_distribution = (scores >= -1e-6).all() and np.allclose(scores.sum(axis=1), 1, atol=1e-3)
    return (scores if is_distribution else _softmax(scores)).astype(np.float32)


@dataclass(frozen=True)
class Model:
    """A loaded classifier: flattened side x side pixels in, 10 class probabilities out.

    `layout` is the per-image input shape the network takes (one of LAYOUTS), `run` the
    network on a batch in that layout, returning its raw scores."""

    source: str
    layout: tuple[int, ...]
    run: Callable[[np.ndarray], np.ndarray]

    @property
    def input_size(self) -> int:
        return math.prod(self.layout)

    @property
    def side(self) -> int:
        return math.isqrt(self.input_size)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, side*side) canvases flattened row by row -> (N, 10) float32 probabilities."""
        x = np.asarray(pixels, dtype=np.float32)
        return _probabilities(self.source, self.run(x.reshape(len(x), *self.layout)), len(x))


def is_model_uri(model: str) -> bool:
    """True for a URI with a scheme (runs:/, models:/, s3://, ...), False for a local path."""
    return bool(MODEL_URI.match(model))


def shape_text(dims: Sequence[int | None]) -> str:
    """A shape as Python writes a tuple, an unknown size (None, or MLflow's -1) as `any`:
    (784,), (28, 28), (any, any, 1)."""
    names = ["any" if d is None or d < 0 else str(d) for d in dims]
    return f"({names[0]},)" if len(names) == 1 else f"({', '.join(names)})"


def _shapes(shapes) -> list[tuple]:
    """A model's input or output shape(s) (one tuple, or a list or dict of them) as a list."""
    if isinstance(shapes, dict):
        return [tuple(s) for s in shapes.values()]
    if shapes and isinstance(shapes[0], list | tuple):
        return [tuple(s) for s in shapes]
    return [tuple(shapes)]


def image_layout(source: str, shapes) -> tuple[int, ...]:
    """The per-image input shape of a model that takes one grey square image: (N,) with N a
    perfect square, (S, S) or (S, S, 1). `shapes`: its input shape(s), batch dimension first
    (Keras' `input_shape`, or an MLflow tensor spec's shape, -1 for any size). Raises
    ModelError naming what it takes otherwise."""
    found = _shapes(shapes)
    if len(found) != 1:
        raise ModelError(f"model {source} takes {len(found)} inputs, not one image as {LAYOUTS}")
    dims = found[0][1:]
    if all(isinstance(d, int) and d > 0 for d in dims):
        flat = len(dims) == 1 and math.isqrt(dims[0]) ** 2 == dims[0]
        if flat or (len(dims) in (2, 3) and dims[0] == dims[1] and dims[2:] in ((), (1,))):
            return tuple(dims)
    raise ModelError(
        f"model {source} takes inputs of shape {shape_text(dims)} per image, not one grey "
        f"square image as {LAYOUTS}"
    )


def check_classes(source: str, shapes) -> None:
    """Raise ModelError unless the model gives NUM_CLASSES scores per image. `shapes`: its
    output shape(s), batch dimension first."""
    found = _shapes(shapes)
    if len(found) != 1:
        raise ModelError(
            f"model {source} has {len(found)} outputs, not one of {NUM_CLASSES} class "
            "probabilities per image"
        )
    dims = found[0][1:]
    if dims == (NUM_CLASSES,):
        return
    what = (
        f"{dims[0]} outputs"
        if len(dims) == 1 and isinstance(dims[0], int) and dims[0] > 0
        else f"outputs of shape {shape_text(dims)}"
    )
    raise ModelError(
        f"model {source} gives {what} per image, not {NUM_CLASSES} class probabilities"
    )


def _keras_model(network, source: str) -> Model:
    layout = image_layout(source, network.input_shape)
    check_classes(source, network.output_shape)

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(network.predict(x, batch_size=256, verbose=0))

    return Model(source=source, layout=layout, run=run)


def _pyfunc_model(pyfunc, source: str) -> Model:
    schema = pyfunc.metadata.get_input_schema()
    if schema is None or not schema.is_tensor_spec():
        raise ModelError(
            f"model {source} declares no tensor input in its MLflow signature, so predict cannot "
            f"tell which image it takes (one of {LAYOUTS}); log it with a signature"
        )
    layout = image_layout(source, [spec.shape for spec in schema.inputs])
    outputs = pyfunc.metadata.get_output_schema()
    if outputs is not None and outputs.is_tensor_spec():
        check_classes(source, [spec.shape for spec in outputs.inputs])

    def run(x: np.ndarray) -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' progress bar
            return np.asarray(pyfunc.predict(x))

    return Model(source=source, layout=layout, run=run)


def _warn_trusted(source: str, loader: str) -> None:
    print(
        f"warning: --trust-model: loading {source} with {loader}, which runs code from the "
        "model artifact as you",
        file=sys.stderr,
    )


def _read_keras(path: Path, source: str):
    """keras.models.load_model in safe mode (explicitly: a Lambda layer is refused)."""
    from pipeline.core.training import keras  # imports TensorFlow with its start-up noise silenced

    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a file it cannot read
        raise ModelError(f"cannot load model {source}: {first_line(err)}") from None


def load_keras_file(path: Path, trust: bool = False) -> Model:
    """A model saved by the train stage (models/model.keras), read in Keras' safe mode. Raises
    ModelError when the file is missing, is not a .keras file (unless `trust`: then Keras' own
    loader is tried, e.g. for a legacy .h5 file), Keras cannot read it or refuses it in safe
    mode, or the model does not take one square image (image_layout) or give 10 scores per image
    (check_classes)."""
    if not path.exists():
        raise ModelError(
            f"model {path} not found. Train it first: run `dvc repro` (or `python -m "
            "pipeline.train`), or pass --model PATH or an MLflow URI such as runs:/<run id>/model"
        )
    if path.suffix != ".keras":
        if not trust:
            raise ModelError(
                f"model {path} is a {path.suffix or 'suffix-less'} file: only .keras files "
                f"(read in Keras' safe mode) and MLflow models with a Keras flavour load by "
                f"default; {TRUST_FIX}"
            )
        _warn_trusted(str(path), "Keras' own loader")
    return _keras_model(_read_keras(path, str(path)), str(path))


def mlflow_flavours(folder: Path) -> dict:
    """The `flavors` of an MLflow model folder's MLmodel file (read as plain YAML, nothing
    imported). Raises ModelError when MLmodel is unreadable or names no flavour."""
    import yaml

    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ModelError(f"cannot read {folder / 'MLmodel'}: {first_line(err)}") from None
    flavours = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavours, dict) or not flavours:
        raise ModelError(f"{folder / 'MLmodel'} names no model flavour")
    return flavours


def saved_keras_file(folder: Path, flavours: dict) -> Path | None:
    """The .keras file of an MLflow model folder's `tensorflow` (a Keras model) or `keras`
    flavour (KERAS_FLAVOURS); None when no flavour keeps its model in one that Keras' safe mode
    can read alone (a SavedModel or .h5 save, pickled custom objects, a file outside the folder)."""
    root = folder.resolve()
    for name in KERAS_FLAVOURS:
        conf = flavours.get(name)
        if not isinstance(conf, dict):
            continue
        if conf.get("model_type", "keras") != "keras" or conf.get("save_format") == "h5":
            continue  # a TensorFlow module or estimator, or a legacy HDF5 save
        if conf.get("save_exported_model"):
            continue  # a TensorFlow SavedModel export, not a .keras file
        data = (folder / str(conf.get("data", "data"))).resolve()
        keras_file = data / KERAS_FILE
        if not keras_file.is_relative_to(root) or not keras_file.is_file():
            continue
        if any(data.glob("*.cloudpickle")):
            continue  # needs custom objects that only unpickling (running code) restores
        return keras_file
    return None


def _load_mlflow_folder(folder: Path, source: str, trust: bool) -> Model:
    flavours = mlflow_flavours(folder)
    keras_file = saved_keras_file(folder, flavours)
    if keras_file is not None:
        return _keras_model(_read_keras(keras_file, source), source)
    if not trust:
        names = ", ".join(map(str, flavours))
        raise ModelError(
            f"model {source} is an MLflow model with flavour(s) {names}, none of which loads "
            f"without running code from the artifact (predict reads a tensorflow or keras "
            f"flavour's saved {KERAS_FILE}); {TRUST_FIX}"
        )
    import mlflow

    _warn_trusted(source, "mlflow.pyfunc")
    import pipeline.core.training  # noqa: F401  # imports TensorFlow (which pyfunc may load) quietly

    return _pyfunc_model(mlflow.pyfunc.load_model(str(folder)), source)


def load_mlflow_model(model: str, tracking_uri: str | None = None, trust: bool = False) -> Model:
    """An MLflow model (runs:/<id>/model, models:/<name>@<alias>, or a local MLflow model folder)
    from the store `tracking_uri` (see tracking.store_uri): downloaded first if a URI, then read
    from its Keras flavour's .keras file (saved_keras_file) in Keras' safe mode, or, only when
    `trust`, through mlflow.pyfunc (running the artifact's code). Raises TrackingError when the
    store does not exist, ModelError when the model has no Keras flavour and `trust` is False, or
    cannot be downloaded or loaded."""
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
            return _load_mlflow_folder(Path(path), model, trust)
    except MlflowException as err:
        raise ModelError(f"cannot load model {model} from {uri}: {first_line(err)}") from None
    except OSError as err:
        raise ModelError(f"cannot load model {model}: {err}") from None


def load_model(
    model: str | Path = DEFAULT_MODEL, tracking_uri: str | None = None, trust: bool = False
) -> Model:
    """A Keras file path, a local MLflow model folder, or an MLflow model URI; `trust` also
    admits formats whose loading runs code from the artifact (see the module docstring). Raises
    as load_keras_file and load_mlflow_model do."""
    text = str(model)
    if is_model_uri(text) or (Path(text) / "MLmodel").is_file():
        return load_mlflow_model(text, tracking_uri, trust)
    return load_keras_file(Path(text), trust)


def check_model_exists(model: str | Path, tracking_uri: str | None = None) -> None:
    """Fail fast (before the images are read) when a model file or the MLflow store is missing."""
    from pipeline.infra.tracking import NO_STORE_FIX, check_store, store_uri

    text = str(model)
    if is_model_uri(text):
        check_store(store_uri(tracking_uri), NO_STORE_FIX)
    elif not Path(text).exists():
        load_keras_file(Path(text))  # raises the missing-model error


TRAIN_RECORD = paths.RUNS_DIR / "train.json"


def check_recorded_model(model: Path = DEFAULT_MODEL, record: Path = TRAIN_RECORD) -> None:
    """Refuse `model` (train's models/model.keras) when the run record beside it (runs/train.json)
    names another model by its SHA-256 (model_sha256): the two then come from different runs
    (e.g. one restored or copied without the other), and predict would use one model while
    registry registers the other. Nothing to check without the model, the record, or a
    model_sha256 in it (written by an older version). ModelError naming both and the fix."""
    if not (model.is_file() and record.is_file()):
        return
    recorded = read_json(record).get("model_sha256")
    if recorded is None or (found := file_sha256(model)) == recorded:
        return
    raise ModelError(
        f"{model} is not the model of the run in {record} (sha256 {found[:16]}…, the run's "
        f"{recorded[:16]}…): they come from different runs. Fix: train again (`dvc repro` or "
        "`python -m pipeline.train`), or restore both of one run with `dvc checkout`"
    )
