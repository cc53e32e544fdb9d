"""The model types: one builder per architecture in `ARCHITECTURES`, and `build_model`.

Every model takes flattened pixels, shape (N, rows*cols) in [0, 1], and ends in
Dense(10, softmax), so train, CV and predict treat them alike. A model type is one entry in
`ARCHITECTURES` plus its conf/model/<name>.yaml; the config schema reads the valid names and
each architecture's conv-layer requirement from the table.

This module does not import Keras until a model is built: the config schema imports it, and every
stage validates its config before any heavy import.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.data import NUM_CLASSES
from pipeline.infra.errors import ConfigError


@dataclass(frozen=True)
class Hyper:
    """The values a builder reads: image shape (rows, cols), dense `width` (units) and `depth`
    (layers), activation and dropout rate, conv `filters` (one entry per conv layer)."""

    image_shape: tuple[int, int]
    width: int
    depth: int
    activation: str
    dropout: float
    filters: tuple[int, ...]


# Flattened-pixels Keras tensor, Hyper -> the features the softmax layer reads.
Builder = Callable[[Any, Hyper], Any]


@dataclass(frozen=True)
class Architecture:
    """A model type: its builder, how many conv layers (`model.filters` entries) it takes, and
    the Hyper fields its builder never reads (`ignores`)."""

    build: Builder
    min_filters: int = 0
    max_filters: int | None = None
    ignores: frozenset[str] = frozenset()

    def filters_expected(self) -> str:
        """What `model.filters` must hold, in words, for config errors."""
        if self.max_filters == self.min_filters:
            return f"exactly {self.min_filters} conv layers"
        if self.min_filters == 1:
            return "at least one conv layer"
        return f"at least {self.min_filters} conv layers"

    def takes_filters(self, count: int) -> bool:
        return count >= self.min_filters and (self.max_filters is None or count <= self.max_filters)


def _dense_head(x: Any, hp: Hyper) -> Any:
    """`depth` x Dense(width, activation), each followed by Dropout when `dropout` > 0."""
    from pipeline.core.training import keras

    for _ in range(hp.depth):
        x = keras.layers.Dense(hp.width, activation=hp.activation)(x)
        if hp.dropout:
            x = keras.layers.Dropout(hp.dropout)(x)
    return x


def mlp(pixels: Any, hp: Hyper) -> Any:
    """The seed article's network with the defaults: Dense(512, relu) -> softmax."""
    return _dense_head(pixels, hp)


def cnn(pixels: Any, hp: Hyper) -> Any:
    """The pixels as a 1-channel image; per `filters` entry a 3x3 same-padded Conv and a 2x2
    MaxPool; Flatten, Dropout, then the dense head of `mlp`."""
    from pipeline.core.training import keras

    x = keras.layers.Reshape((*hp.image_shape, 1))(pixels)
    for filters in hp.filters:
        x = keras.layers.Conv2D(filters, 3, padding="same", activation=hp.activation)(x)
        x = keras.layers.MaxPooling2D(2, padding="same")(x)
    x = keras.layers.Flatten()(x)
    if hp.dropout:
        x = keras.layers.Dropout(hp.dropout)(x)
    return _dense_head(x, hp)


def lenet5(pixels: Any, hp: Hyper) -> Any:
    """LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to
    document recognition", Fig. 2) on the flattened input: the pixels as a 1-channel image,
    Conv(filters[0], 5x5) -> AvgPool(2) -> Conv(filters[1], 5x5) -> AvgPool(2) -> Flatten ->
    Dense(120) -> Dense(84), then the shared Dense(10, softmax).

    Both convs are same-padded (the paper pads 28x28 digits to 32x32 and uses valid convs), so
    8x8 digits keep a 2x2 map. The paper's partial C3 connections, trainable subsampling and
    RBF output are the usual full conv, average pool and softmax. `width` and `depth` are
    ignored: the 120-84 head is part of the architecture; `dropout`, when > 0, follows each of
    its two Dense layers.
    """
    from pipeline.core.training import keras

    x = keras.layers.Reshape((*hp.image_shape, 1))(pixels)
    for filters in hp.filters:
        x = keras.layers.Conv2D(filters, 5, padding="same", activation=hp.activation)(x)
        x = keras.layers.AveragePooling2D(2, padding="same")(x)
    x = keras.layers.Flatten()(x)
    for units in (120, 84):
        x = keras.layers.Dense(units, activation=hp.activation)(x)
        if hp.dropout:
            x = keras.layers.Dropout(hp.dropout)(x)
    return x


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(mlp, ignores=frozenset({"filters"})),
    "cnn": Architecture(cnn, min_filters=1),
    "lenet5": Architecture(
        lenet5, min_filters=2, max_filters=2, ignores=frozenset({"width", "depth"})
    ),
}


def check_memory(params: int, *, width: int, depth: int) -> None:
    """Refuse a model of `params` parameters whose training state would not fit in free memory,
    before TensorFlow tries. Weights, gradients and two optimizer slots: about 4 float32 copies
    of every parameter (4 bytes each). Raises ConfigError naming width and model.depth."""
    needed = 4 * 4 * params
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if needed > available:
        raise ConfigError(
            f"width={width} with model.depth={depth} needs about {needed / 2**30:.1f} GiB "
            f"for its weights alone, more than the {available / 2**30:.1f} GiB of free memory. "
            "Fix: use a smaller width or depth"
        )


def count_params(network: Callable[[], Any]) -> int:
    """The number of parameters of the model that `network()` builds, without allocating them.

    Keras 3 defers creating a variable made inside a StatelessScope; the deferred variables are
    dropped again, so they are never allocated. Python's random state is restored, because Keras
    draws each unseeded initializer's seed from it: the real model then gets the same weights as
    if no probe had been built.
    """
    from keras.src.backend.common import global_state  # no public API drops deferred variables

    from pipeline.core.training import keras

    key = "uninitialized_variables"
    pending = list(global_state.get_global_attribute(key) or [])
    python_random = random.getstate()
    try:
        with keras.StatelessScope(initialize_variables=False):
            return int(network().count_params())
    finally:
        global_state.set_global_attribute(key, pending)
        random.setstate(python_random)


def _check_activation(activation: str) -> None:
    from pipeline.core.training import keras

    try:
        keras.activations.get(activation)
    except ValueError:
        raise ConfigError(
            f"model.activation={activation!r} is not a Keras activation. "
            "Fix: use e.g. relu, tanh, sigmoid, gelu"
        ) from None


def build_model(
    name: str,
    *,
    input_dim: int,
    image_shape: tuple[int, int],
    width: int,
    depth: int,
    activation: str,
    dropout: float,
    optimizer: str,
    learning_rate: float,
    filters: list[int] | tuple[int, ...],
) -> Any:
    """A compiled Keras model of type `name` (a key of ARCHITECTURES) taking flattened pixels,
    shape (N, input_dim) with input_dim = rows*cols of `image_shape`, and giving class
    probabilities, shape (N, 10); compiled by training.compile_model. The keyword arguments
    besides input_dim, image_shape and width are conf/model's keys, so a stage passes
    `**asdict(cfg.model)`.

    Raises ConfigError (naming the config key) for an unknown activation or optimizer, or when
    the model's training state would not fit in free memory (check_memory); nothing is
    allocated before these checks pass.
    """
    from pipeline.core.training import compile_model, keras

    _check_activation(activation)
    rows, cols = image_shape
    hp = Hyper((rows, cols), width, depth, activation, dropout, tuple(filters))
    body = ARCHITECTURES[name].build

    def network() -> keras.Model:
        inputs = keras.Input(shape=(input_dim,), name="pixels")
        features = body(inputs, hp)
        outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")
        return keras.Model(inputs, outputs(features), name=name)

    check_memory(count_params(network), width=width, depth=depth)
    return compile_model(network(), optimizer=optimizer, learning_rate=learning_rate)
