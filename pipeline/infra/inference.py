"""Images to answers with a loaded model: the one batch path that `predict` (files) and the served
model (image bytes in a request, pipeline.infra.serving) share, so the two cannot drift apart.

Each image is read and its digit located first (pipeline.core.images); an image that cannot be
used is a Failure in its place, never an exception for the batch. Only then, if any image is
usable, is the model loaded (so TensorFlow is imported only when needed) and asked once for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.core.images import Located, locate_digit, to_model_input
from pipeline.infra.errors import InputError
from pipeline.infra.model_loading import Model


@dataclass(frozen=True)
class Failure:
    """An input that could not be classified, and why (the message without the input's name)."""

    file: str
    error: str

    def line(self) -> str:
        return f"{self.file}: error: {self.error}"


def failure(name: str, err: InputError | OSError) -> Failure:
    """An InputError names its input first (`<name>: <problem>`); keep only the problem."""
    message = str(err) if isinstance(err, InputError) else f"cannot read it: {err}"
    return Failure(file=name, error=message.removeprefix(f"{name}: "))


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


def as_json(result: Prediction | Failure) -> dict:
    """A result's JSON entry: its fields, without a warning it does not have."""
    return {key: value for key, value in asdict(result).items() if value is not None}


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


def locate(name: str, read: Callable[[], np.ndarray]) -> Located | Failure:
    """The digit in the grey image `read()` decodes (core.images' read_grey or decode_grey), or
    the Failure that names why there is none."""
    try:
        return locate_digit(read(), name)
    except (InputError, OSError) as err:
        return failure(name, err)


def answer(
    located: Sequence[Located | Failure], names: Sequence[str], load: Callable[[], Model]
) -> list[Prediction | Failure]:
    """One Prediction or Failure per input, in order: the located digits go to the model that
    `load()` returns (called only when at least one is usable) in one batch, on its canvas.
    Raises as `load` and Model.predict do (ModelError, TrackingError), never for an image."""
    usable = [i for i, entry in enumerate(located) if not isinstance(entry, Failure)]
    if not usable:
        return list(located)
    model = load()
    pixels = np.stack([to_model_input(located[i].crop, model.side) for i in usable])
    warnings = [located[i].warning for i in usable]
    predictions = classify(model, pixels, [names[i] for i in usable], warnings)
    answers = dict(zip(usable, predictions, strict=True))
    return [answers.get(i, entry) for i, entry in enumerate(located)]
