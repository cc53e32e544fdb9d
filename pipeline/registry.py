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
from typing import Any

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
        with using_store(uri):  # register_model and get_model_info take no store argument
            version = mlflow.register_model(model_uri, name)
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.set_registered_model_alias(name, alias, version.version)
            if version.run_id:
                _describe(client, version, model_uri)
    except MlflowException as err:
        raise TrackingError(
            f"cannot register {model_uri} as {name!r} in {uri}: {first_line(err)}"
        ) from None
    return Registered(
        name=name, version=str(version.version), alias=alias, source=model_uri, store=uri
    )


# The source run's tags and metrics a registered version carries as its own tags.
VERSION_TAGS = ("dataset", "dataset_sha256", "git_commit")
VERSION_METRICS = ("test_accuracy", "test_loss")


def _describe(client: Any, version: Any, model_uri: str) -> None:
    """Give a new version what a reviewer asks of it, from the run that logged it: tags
    (dataset, its SHA-256, git commit, model type, the model's input, test accuracy and loss; CV
    accuracy when the run's config has a crossval run in the same store) and a one-line
    description."""
    import mlflow

    run = client.get_run(version.run_id)
    tags = {k: run.data.tags[k] for k in VERSION_TAGS if k in run.data.tags}
    tags |= {k: f"{run.data.metrics[k]:.4f}" for k in VERSION_METRICS if k in run.data.metrics}
    tags["model"] = run.data.params.get("model.name", "?")
    signature = mlflow.models.get_model_info(model_uri).signature
    if signature is not None:
        tags["input"] = ", ".join(
            f"{spec.name or 'pixels'} {spec.type}{list(getattr(spec, 'shape', ()) or [])}"
            for spec in signature.inputs.inputs
        )
    if cv := _crossval_of(client, run):
        tags["cv_accuracy_mean"] = f"{cv['accuracy_mean']:.4f}"
        tags["cv_accuracy_std"] = f"{cv['accuracy_std']:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    test = f"test accuracy {tags['test_accuracy']}" if "test_accuracy" in tags else "not tested"
    cv_text = f", {tags['cv_accuracy_mean']} cross-validated" if cv else ""
    client.update_model_version(
        version.name,
        version.version,
        description=f"{tags['model']} on {tags.get('dataset', '?')}: {test}{cv_text} "
        f"(train run {run.info.run_id}, git {tags.get('git_commit', '?')[:8]})",
    )


def _crossval_of(client: Any, run: Any) -> dict[str, float] | None:
    """The metrics of the newest finished crossval run of train run `run`'s experiment with the
    same data and params (both stages log the whole config); None if there is none."""
    query = "tags.stage = 'crossval' and attributes.status = 'FINISHED'"
    if sha := run.data.tags.get("dataset_sha256"):
        query += f" and tags.dataset_sha256 = '{sha}'"
    found = client.search_runs(
        [run.info.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=50
    )
    for candidate in found:
        if candidate.data.params == run.data.params and "accuracy_mean" in candidate.data.metrics:
            return candidate.data.metrics
    return None


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
