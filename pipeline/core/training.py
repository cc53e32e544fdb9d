"""TensorFlow set-up (quiet import, threads, seeded sessions) and the fit loop train and CV share.

Importing this module imports TensorFlow and Keras, with their start-up banners silenced; other
modules that need Keras take it from here (`from pipeline.core.training import keras`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

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


def new_session(seed: int, deterministic: bool) -> None:
    """Start from a clean Keras state (frees earlier models, e.g. the previous fold's), seeded:
    Python, NumPy and TensorFlow; optionally with deterministic TensorFlow ops."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def compile_model(network: keras.Model, *, optimizer: str, learning_rate: float) -> keras.Model:
    """Compile `network` (softmax outputs, one-hot labels) for training: categorical
    cross-entropy loss, accuracy metric, `optimizer` by its Keras name. Returns `network`.

    Raises ConfigError naming model.optimizer when Keras has no optimizer of that name.
    """
    try:
        keras_optimizer = keras.optimizers.get(
            {"class_name": optimizer, "config": {"learning_rate": learning_rate}}
        )
    except (ValueError, TypeError):
        raise ConfigError(
            f"model.optimizer={optimizer!r} is not a Keras optimizer. "
            "Fix: use e.g. rmsprop, adam, sgd, adamw"
        ) from None
    network.compile(
        optimizer=keras_optimizer,
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    return network


def metric_name(keras_name: str) -> str:
    """The project's name for a Keras history or log key: `loss` -> `train_loss`, `accuracy` ->
    `train_accuracy`, `val_*` as it is. One vocabulary everywhere (MLflow, metrics/*.json,
    history.csv, DVC plots): train_, val_, test_ and fold_ prefixes say on which data."""
    return keras_name if keras_name.startswith("val_") else f"train_{keras_name}"


def fit(
    network: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    validation_split: float = 0.0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Train a compiled `network` on `x` (N, features) and one-hot `y` (N, 10); returns the
    per-epoch history, metric name (metric_name: `train_loss`, `train_accuracy`, and `val_*`
    when validating) -> one float per epoch.

    `validation_split` holds out that last fraction of `x` (Keras ignores it when
    `validation_data` is given). Keras' progress bar is shown on a terminal only, so CI logs stay
    readable.
    """
    history = network.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=validation_data,
        validation_split=validation_split,
        callbacks=list(callbacks),
        verbose=1 if sys.stdout.isatty() else 0,
    )
    return {metric_name(k): [float(v) for v in values] for k, values in history.history.items()}
