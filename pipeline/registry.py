"""Register a trained model in the MLflow Model Registry and point an alias at it.

    python -m pipeline.registry                        # the models of the run in runs/train.json
    python -m pipeline.registry runs:/<run id>/model   # any logged model
        [--name digit-classifier] [--alias champion] [--tracking-uri URI]

Without a model URI, both models of the recorded train run are registered, each with the alias:
its Keras network (`runs:/<id>/model`) as `digit-classifier`, the one `predict` loads without
running code from the artifact and that scores pixel rows in batch; and its served model
(`runs:/<id>/served`, images in: pipeline.infra.serving) as `digit-classifier-images`, the one
to serve:

    python -m pipeline.predict --model models:/digit-classifier@champion digit.png
    mlflow models serve -m models:/digit-classifier-images@champion --env-manager local
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.infra.credentials import redact
from pipeline.infra.errors import PipelineError, TrackingError, first_line
from pipeline.infra.files import read_json
from pipeline.infra.model_loading import TRAIN_RECORD, check_recorded_model
from pipeline.infra.stage import run_command
from pipeline.infra.tracking import (
    NO_STORE_FIX,
    check_store,
    recorded_store,
    store_uri,
    using_store,
)

DEFAULT_NAME = "digit-classifier"
# The served model's name: the network's name + this (digit-classifier-images).
SERVED_SUFFIX = "-images"
DEFAULT_ALIAS = "champion"


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str
    source: str
    store: str  # the tracking store (its registry) the version is in

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def register(
    model_uri: str,
    name: str = DEFAULT_NAME,
    alias: str = DEFAULT_ALIAS,
    tracking_uri: str | None = None,
) -> Registered:
    """Register `model_uri` (e.g. runs:/<id>/model) as a new version of `name` and point `alias`
    at that version. The registry is the tracking store's own."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = store_uri(tracking_uri)
    check_store(uri, NO_STORE_FIX)
    try:
        with using_store(uri):
            version = mlflow.register_model(model_uri, name)
        mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
            name, alias, version.version
        )
    except MlflowException as err:
        raise TrackingError(
            f"cannot register {model_uri} as {name!r} in {uri}: {first_line(err)}"
        ) from None
    return Registered(
        name=name, version=str(version.version), alias=alias, source=model_uri, store=uri
    )


def recorded_run(record: Path = TRAIN_RECORD) -> tuple[str, str]:
    """(run id, tracking URI) of the train run recorded in runs/train.json."""
    if not record.is_file():
        raise PipelineError(
            f"{record} is missing: no trained model to register. Run `dvc repro` or "
            "`python -m pipeline.train`, or name a model: python -m pipeline.registry "
            "runs:/<run id>/model"
        )
    data = read_json(record)
    return data["run_id"], data["tracking_uri"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.registry",
        description="Register a trained model in the MLflow Model Registry and set an alias.",
    )
    parser.add_argument(
        "model_uri",
        nargs="?",
        help="the model to register, e.g. runs:/<run id>/model (default: both models of the run "
        f"recorded in {TRAIN_RECORD}: its network as --name, its served model, images in, as "
        f"--name + {SERVED_SUFFIX!r})",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="registered model name (%(default)s)")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help="alias to set (%(default)s)")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: with no model_uri, the store recorded in "
        f"{TRAIN_RECORD}, or MLFLOW_TRACKING_URI if that is the recorded one with its "
        "masked password; else MLFLOW_TRACKING_URI, else the project's sqlite:///mlflow.db)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # MLflow 3 warns that runs:/<id>/model "has no artifacts" while it registers the run's
    # logged model correctly; that only confuses.
    logging.getLogger("mlflow.tracking._model_registry.fluent").setLevel(logging.ERROR)

    def register_and_print() -> None:
        models, tracking_uri = [(args.model_uri, args.name)], args.tracking_uri
        if args.model_uri is None:
            from pipeline.infra.serving import NAME as SERVED_MODEL  # imports MLflow

            check_recorded_model()  # the run's model is the one predict uses
            run_id, recorded_uri = recorded_run()
            tracking_uri = tracking_uri or recorded_store(recorded_uri, store_uri())
            models = [
                (f"runs:/{run_id}/model", args.name),
                (f"runs:/{run_id}/{SERVED_MODEL}", args.name + SERVED_SUFFIX),
            ]
        for model_uri, name in models:
            registered = register(model_uri, name, args.alias, tracking_uri)
            print(
                f"registered {registered.source} as {registered.name} version "
                f"{registered.version} in {redact(registered.store)}; {registered.uri} points at it"
            )

    return run_command(register_and_print)


if __name__ == "__main__":
    sys.exit(main())
