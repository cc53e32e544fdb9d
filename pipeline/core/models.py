"""The networks (the seed MLP and a small CNN), seeding, and the one fit loop train and CV share."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from pipeline.core.data import NUM_CLASSES
from pipeline.infra.config import Config, ModelConfig
from pipeline.infra.errors import ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C-level writes to stderr: TensorFlow's import prints absl/oneDNN banners that
    TF_CPP_MIN_LOG_LEVEL does not reach (tensorflow/tensorflow#100442). Python exceptions raised
    inside still propagate and print normally once stderr is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with quiet_stderr():
    import keras
    import tensorflow as tf

# Train steps per tf.function call: the same updates, fewer Python round trips per epoch
# (the seed MLP's MNIST epoch: 2.40 s -> 1.93 s on 2 cores; docs/BENCHMARKS.md).
STEPS_PER_EXECUTION = 32


def configure_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools, once per job, so parallel sweep jobs don't oversubscribe
    the machine. `threads: 0` follows OMP_NUM_THREADS when it is set (Ray sets it to a task's
    `num_cpus`; Slurm users set it to their allocation), else keeps TensorFlow's default: all
    cores. Only possible before TensorFlow runs its first op."""
    if not threads and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
        log.info("TensorFlow threads: %d (OMP_NUM_THREADS)", threads)
    if threads and tf.config.threading.get_intra_op_parallelism_threads() != threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised in this process (e.g. a later sweep job)
            pass


def check_memory(model: ModelConfig, width: int, input_dim: int) -> None:
    """Refuse a model whose weights alone would not fit in memory, before TensorFlow tries.

    Weights, gradients and two optimizer slots: about 4 float32 copies of every parameter.
    """
    params = input_dim * width + (model.depth - 1) * width * width + width * NUM_CLASSES
    if model.name == "cnn":
        params += sum(9 * f * f for f in model.filters)
    needed = 4 * 4 * params
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if needed > available:
        raise ConfigError(
            f"width={width} with model.depth={model.depth} needs about {needed / 2**30:.1f} GiB "
            f"for its weights alone, more than the {available / 2**30:.1f} GiB of free memory. "
            "Fix: use a smaller width or depth"
        )


def new_session(seed: int, deterministic: bool) -> None:
    """Start from a clean Keras state (frees earlier models, e.g. the previous fold's), seeded:
    Python, NumPy and TensorFlow; optionally with deterministic TensorFlow ops."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def _optimizer(model: ModelConfig) -> keras.optimizers.Optimizer:
    try:
        return keras.optimizers.get(
            {"class_name": model.optimizer, "config": {"learning_rate": model.learning_rate}}
        )
    except (ValueError, TypeError):
        raise ConfigError(
            f"model.optimizer={model.optimizer!r} is not a Keras optimizer. "
            "Fix: use e.g. rmsprop, adam, sgd, adamw"
        ) from None


def _check_activation(model: ModelConfig) -> None:
    try:
        keras.activations.get(model.activation)
    except ValueError:
        raise ConfigError(
            f"model.activation={model.activation!r} is not a Keras activation. "
            "Fix: use e.g. relu, tanh, sigmoid, gelu"
        ) from None


def build_model(model: ModelConfig, width: int, input_dim: int, image_shape: tuple[int, int]):
    """A compiled Keras model taking flattened pixels (so every model has one input format).

    mlp: depth x Dense(width, activation) -> Dense(10, softmax); the default is the seed article's
    Dense(512, relu) -> Dense(10, softmax). cnn: the pixels reshaped to an image, then per entry
    of `filters` a 3x3 Conv + 2x2 MaxPool, then dropout and the same dense head.
    """
    check_memory(model, width, input_dim)
    _check_activation(model)
    inputs = keras.Input(shape=(input_dim,), name="pixels")
    x = inputs
    if model.name == "cnn":
        x = keras.layers.Reshape((*image_shape, 1))(x)
        for filters in model.filters:
            x = keras.layers.Conv2D(filters, 3, padding="same", activation=model.activation)(x)
            x = keras.layers.MaxPooling2D(2, padding="same")(x)
        x = keras.layers.Flatten()(x)
        if model.dropout:
            x = keras.layers.Dropout(model.dropout)(x)
    for _ in range(model.depth):
        x = keras.layers.Dense(width, activation=model.activation)(x)
        if model.dropout:
            x = keras.layers.Dropout(model.dropout)(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    network = keras.Model(inputs, outputs, name=model.name)
    network.compile(
        optimizer=_optimizer(model),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    return network


def model_requirements() -> list[str]:
    """Pinned pip requirements for the logged model: the packages that are installed here.

    Given explicitly because MLflow's inference of them reloads the model in a subprocess
    (about 14 s a run) and would name the right packages anyway.
    """
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in ("tensorflow", "tensorflow-cpu", "keras", "numpy"):
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return requirements


class EpochMetricsLogger(keras.callbacks.Callback):
    """Log each epoch's metrics to the active MLflow run, with step = epoch (1-based).

    If the store fails mid-training, training goes on (its results are saved locally); the
    stage reports the tracking failure when it logs the final results.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        import mlflow

        if self.failed:
            return
        try:
            mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch + 1)
        except Exception as err:
            self.failed = True
            log.warning("MLflow logging failed (%s); training continues without it", err)


def fit(
    network: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    cfg: Config,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, list[float]]:
    """Train with the configured epochs and batch size; returns the per-epoch history.

    Keras' progress bar is shown on a terminal only, so CI logs stay readable.
    """
    history = network.fit(
        x,
        y,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        validation_data=validation_data,
        validation_split=cfg.validation_split,  # Keras ignores it when validation_data is given
        callbacks=[EpochMetricsLogger()],
        verbose=1 if sys.stdout.isatty() else 0,
    )
    return {k: [float(v) for v in values] for k, values in history.history.items()}
