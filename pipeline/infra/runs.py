"""Reading crossval runs from MLflow for a comparison, and logging the comparison back.

A sweep is found by the `sweep` tag every job of one Hydra `-m` invocation carries; its crossval
parent runs (tag stage=crossval) become `ConfigRun`s with the fold_accuracy of their finished
fold runs (stage=crossval-fold), keyed by (repeat, fold). Used by `python -m pipeline.compare`
and by the Hydra callback that tags a search's best trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.comparison import FOLD_METRIC, CompareError, Comparison, ConfigRun
from pipeline.infra.errors import first_line
from pipeline.infra.reconcile import process_tags
from pipeline.infra.tracking import _git_commit, check_store, store_uri

CROSSVAL, FOLD_STAGE, COMPARE = "crossval", "crossval-fold", "compare"
_SEARCH_PAGE = 1000


def filter_literal(value: str) -> str:
    """A string literal for an MLflow search filter (CompareError if `value` holds both quotes)."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise CompareError(f"cannot search MLflow for {value!r}: it contains both kinds of quote")


def _search(client: Any, experiment_ids: list[str], query: str, **kwargs: Any) -> list[Any]:
    """All active runs matching `query` (follows MLflow's pages)."""
    from mlflow.entities import ViewType

    found: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            query,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=_SEARCH_PAGE,
            page_token=token,
            **kwargs,
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def _experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def recent_sweeps(client: Any, limit: int = 5) -> list[str]:
    """The newest sweep ids among crossval runs, newest first."""
    ids = _experiment_ids(client)
    if not ids:
        return []
    page = client.search_runs(
        ids,
        f"tags.stage = '{CROSSVAL}' and tags.sweep LIKE '%'",
        order_by=["attribute.start_time DESC"],
        max_results=200,
    )
    sweeps: list[str] = []
    for run in page:
        sweep = run.data.tags["sweep"]
        if sweep not in sweeps:
            sweeps.append(sweep)
    return sweeps[:limit]


def resolve_sweep(client: Any, sweep: str) -> str:
    """The sweep tag value meant by `sweep` ("latest", the tag itself, or its folder's path).
    CompareError, naming the recent sweeps, when no run has it."""
    if sweep == "latest":
        newest = recent_sweeps(client, limit=1)
        if not newest:
            raise CompareError(
                f"no crossval sweep in {client.tracking_uri}. Run one, e.g. "
                "`python -m pipeline.crossval -m width=64,512`, or pass --experiment NAME"
            )
        return newest[0]
    ids = _experiment_ids(client)
    candidates = dict.fromkeys([sweep, sweep.rstrip("/"), str(Path(sweep).resolve())])
    for candidate in candidates:
        if ids and client.search_runs(
            ids, f"tags.sweep = {filter_literal(candidate)}", max_results=1
        ):
            return candidate
    known = recent_sweeps(client)
    fix = (
        f"Recent crossval sweeps: {', '.join(known)}. Fix: pass one of them, or --sweep latest"
        if known
        else "This store has no crossval sweep: run one (`python -m pipeline.crossval -m ...`)"
    )
    raise CompareError(
        f"unknown sweep {sweep!r}: no run in {client.tracking_uri} has that sweep tag. {fix}"
    )


def _fold_runs(client: Any, parent: Any) -> dict[tuple[int, int], float]:
    children = _search(
        client,
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = '{FOLD_STAGE}'",
    )
    folds: dict[tuple[int, int], float] = {}
    for child in children:
        fold, accuracy = child.data.tags.get("fold"), child.data.metrics.get(FOLD_METRIC)
        repeat = child.data.tags.get("repeat", "1")  # runs from before crossval.repeats
        if child.info.status != "FINISHED" or accuracy is None or not (fold or "").isdigit():
            continue
        if not repeat.isdigit():
            continue
        key = (int(repeat), int(fold))
        if key in folds:
            raise CompareError(
                f"crossval run {parent.info.run_id} has two runs for repeat {repeat} fold "
                f"{fold}: the store was edited by hand? Delete one in the MLflow UI"
            )
        folds[key] = float(accuracy)
    return folds


def load_runs(
    client: Any, *, sweep: str | None = None, experiment: str | None = None
) -> tuple[list[ConfigRun], list[str]]:
    """The finished crossval parent runs of a sweep (its resolved tag value) or an experiment,
    with their fold accuracies; and notes on runs left out (not FINISHED). CompareError when
    there is none."""
    if (sweep is None) == (experiment is None):
        raise ValueError("give exactly one of sweep, experiment")
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CompareError(
                f"unknown experiment {experiment!r} (experiments in {client.tracking_uri}: "
                f"{names}). "
                "Fix: pass one of them, or --sweep"
            )
        ids, query, what = [found.experiment_id], f"tags.stage = '{CROSSVAL}'", experiment
    else:
        assert sweep is not None
        ids = _experiment_ids(client)
        query = f"tags.stage = '{CROSSVAL}' and tags.sweep = {filter_literal(sweep)}"
        what = f"sweep {sweep}"
    parents = _search(client, ids, query, order_by=["attribute.start_time ASC"]) if ids else []
    if not parents:
        stages: set[str] = set()
        if sweep is not None:
            others = _search(client, ids, f"tags.sweep = {filter_literal(sweep)}")
            stages = {r.data.tags.get("stage", "?") for r in others}
        ran = f" (it has only {', '.join(sorted(stages))} runs)" if stages else ""
        raise CompareError(
            f"no crossval runs in {what}{ran} of {client.tracking_uri}. Fix: run a crossval "
            "sweep, e.g. `python -m pipeline.crossval -m width=64,512`, and compare that"
        )
    notes, runs = [], []
    for parent in parents:
        if parent.info.status != "FINISHED":
            notes.append(
                f"left out crossval run {parent.info.run_id} ({parent.info.run_name}): "
                f"{parent.info.status}, not FINISHED"
            )
            continue
        runs.append(
            ConfigRun(
                run_id=parent.info.run_id,
                experiment_id=parent.info.experiment_id,
                start_time=int(parent.info.start_time or 0),
                params=dict(parent.data.params),
                tags=dict(parent.data.tags),
                folds=_fold_runs(client, parent),
                metrics=dict(parent.data.metrics),
            )
        )
    if not runs:
        raise CompareError(
            f"no finished crossval runs in {what} of {client.tracking_uri}: {'; '.join(notes)}. "
            "Fix: rerun the sweep"
        )
    return runs, notes


def open_store(uri: str | None) -> tuple[str, Any]:
    """(absolute URI, MlflowClient) for an existing store; never creates one. `uri` None: the
    store by tracking.store_uri's rule (MLFLOW_TRACKING_URI, else the project's mlflow.db)."""
    import mlflow

    resolved = store_uri(uri)
    check_store(
        resolved,
        "run the crossval stage first, run this from the project root, or pass --tracking-uri",
    )
    try:
        client = mlflow.MlflowClient(tracking_uri=resolved)
        client.search_experiments(max_results=1)
    except Exception as err:  # mlflow raises many types for a bad store
        raise CompareError(f"cannot open MLflow store {resolved}: {first_line(err)}") from None
    return resolved, client


def log_comparison(client: Any, comparison: Comparison, files: Sequence[Path]) -> str:
    """Log the comparison as a new MLflow run (stage=compare, the sweep tag) in the best
    config's experiment; returns its run id. The run ends FAILED/KILLED if logging breaks."""
    tags = {"stage": COMPARE, "compare.source": comparison.source, **process_tags()}
    if comparison.sweep:
        tags["sweep"] = comparison.sweep
    if commit := _git_commit():
        tags["git_commit"] = commit
    run = client.create_run(
        comparison.best.run.experiment_id, run_name=f"compare {comparison.source}", tags=tags
    )
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "alpha", comparison.alpha)
        client.log_param(run_id, "test", comparison.test)
        client.log_param(run_id, "configs", len(comparison.rows))
        client.log_metric(run_id, "best_accuracy_mean", comparison.best.summary.mean)
        ties = sum(1 for r in comparison.rows if r.significant(comparison.alpha) is False)
        client.log_metric(run_id, "not_significantly_worse", ties)
        for path in files:
            client.log_artifact(run_id, str(path))
        client.log_dict(run_id, comparison.to_dict(), "compare.json")
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
