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

from pipeline.core.comparison import (
    FOLD_METRIC,
    CompareError,
    Comparison,
    ConfigRun,
    PairComparison,
    Predictions,
)
from pipeline.infra.errors import first_line, interrupt_in
from pipeline.infra.reconcile import process_tags
from pipeline.infra.tracking import _git_commit, check_store, comparisons_experiment, store_uri

CROSSVAL, FOLD_STAGE, COMPARE, TRAIN = "crossval", "crossval-fold", "compare", "train"
PREDICTIONS = "plots/predictions.csv"  # train's test-set predictions, as it logs them
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
    """The newest sweep ids among crossval runs and train runs (a seed sweep), newest first."""
    ids = _experiment_ids(client)
    if not ids:
        return []
    found = [
        run
        for stage in (CROSSVAL, TRAIN)
        for run in client.search_runs(
            ids,
            f"tags.stage = '{stage}' and tags.sweep LIKE '%'",
            order_by=["attribute.start_time DESC"],
            max_results=200,
        )
    ]
    found.sort(key=lambda run: -(run.info.start_time or 0))
    sweeps: list[str] = []
    for run in found:
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
                f"no crossval sweep in {client.tracking_uri}, nor a train sweep. Run one, e.g. "
                "`python -m pipeline.crossval -m width=64,512` or `python -m pipeline.train -m "
                "seed=0,1,2,3,4`, or pass --experiment NAME"
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
    client: Any,
    *,
    sweep: str | None = None,
    experiment: str | None = None,
    seeds: bool = False,
) -> tuple[list[ConfigRun], list[str]]:
    """The finished crossval parent runs of a sweep (its resolved tag value) or an experiment,
    with their fold accuracies; and notes on runs left out (not FINISHED). seeds=True: its
    finished train runs instead (no folds; their test_accuracy in metrics). CompareError when
    there is none."""
    if (sweep is None) == (experiment is None):
        raise ValueError("give exactly one of sweep, experiment")
    stage = TRAIN if seeds else CROSSVAL
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CompareError(
                f"unknown experiment {experiment!r} (experiments in {client.tracking_uri}: "
                f"{names}). "
                "Fix: pass one of them, or --sweep"
            )
        ids, query, what = [found.experiment_id], f"tags.stage = '{stage}'", experiment
    else:
        assert sweep is not None
        ids = _experiment_ids(client)
        query = f"tags.stage = '{stage}' and tags.sweep = {filter_literal(sweep)}"
        what = f"sweep {sweep}"
    parents = _search(client, ids, query, order_by=["attribute.start_time ASC"]) if ids else []
    if not parents:
        stages: set[str] = set()
        if sweep is not None:
            others = _search(client, ids, f"tags.sweep = {filter_literal(sweep)}")
            stages = {r.data.tags.get("stage", "?") for r in others}
        ran = f" (it has only {', '.join(sorted(stages))} runs)" if stages else ""
        raise CompareError(
            f"no {stage} runs in {what}{ran} of {client.tracking_uri}. Fix: run a crossval "
            "sweep, e.g. `python -m pipeline.crossval -m width=64,512`, or a seed sweep, "
            "`python -m pipeline.train -m seed=0,1,2,3,4`, and compare that"
        )
    notes, runs = [], []
    for parent in parents:
        if parent.info.status != "FINISHED":
            notes.append(
                f"left out {stage} run {parent.info.run_id} ({parent.info.run_name}): "
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
                folds={} if seeds else _fold_runs(client, parent),
                metrics=dict(parent.data.metrics),
            )
        )
    if not runs:
        raise CompareError(
            f"no finished {stage} runs in {what} of {client.tracking_uri}: {'; '.join(notes)}. "
            "Fix: rerun the sweep"
        )
    return runs, notes


def has_runs(client: Any, stage: str, *, sweep: str | None, experiment: str | None) -> bool:
    """Whether the sweep (or experiment) has any run of `stage`."""
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found else []
        query = f"tags.stage = '{stage}'"
    else:
        ids = _experiment_ids(client)
        query = f"tags.stage = '{stage}' and tags.sweep = {filter_literal(sweep or '')}"
    return bool(ids and client.search_runs(ids, query, max_results=1))


def load_predictions(client: Any, run_id: str) -> Predictions:
    """A train run's test-set predictions (its plots/predictions.csv artifact). CompareError
    naming the run when it does not exist or has no such artifact (not a train run)."""
    import csv
    import os
    import tempfile

    # One line per error on stderr: no download progress bar (as predict does).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        run = client.get_run(run_id)
    except Exception as err:  # mlflow raises MlflowException, or a store error
        raise CompareError(
            f"no run {run_id} in {client.tracking_uri} ({first_line(err)}). Fix: pass two train "
            "run ids (MLflow UI, or runs/train.json's run_id)"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PREDICTIONS, tmp)
        except Exception:
            raise CompareError(
                f"run {run_id} ({run.data.tags.get('stage', '?')} stage) has no {PREDICTIONS} "
                "artifact: only train runs log their test-set predictions. Fix: pass train runs"
            ) from None
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    return Predictions(
        run_id=run_id,
        name=run.info.run_name or run_id,
        tags=dict(run.data.tags),
        actual=[int(r["actual"]) for r in rows],
        predicted=[int(r["predicted"]) for r in rows],
    )


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


def _logged_run(
    client: Any,
    experiment_id: str,
    name: str,
    tags: dict[str, str],
    log: Any,
    files: Sequence[Path],
) -> str:
    """A new FINISHED compare run with `tags`, filled by log(run_id); FAILED/KILLED if it breaks.
    A store that refuses (a full disk, a read-only file system) is a CompareError naming the
    cause and the report files already written."""
    try:
        return _new_run(client, experiment_id, name, tags, log)
    except Exception as err:  # mlflow raises many types for a store in trouble
        if interrupt_in(err):
            raise
        written = ", ".join(map(str, files)) or "none asked for"
        raise CompareError(
            f"cannot log the comparison to MLflow at {client.tracking_uri}: {first_line(err)}. "
            f"Its reports are written ({written}); run it again with --no-log to skip logging"
        ) from None


def _new_run(client: Any, experiment_id: str, name: str, tags: dict[str, str], log: Any) -> str:
    experiment_id = comparisons_experiment(client, experiment_id)
    tags = {"stage": COMPARE, **tags, **process_tags()}
    if commit := _git_commit():
        tags["git_commit"] = commit
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    try:
        log(run_id)
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def log_comparison(client: Any, comparison: Comparison, files: Sequence[Path]) -> str:
    """Log the comparison as a new MLflow run (stage=compare, compare.sweep) in the best
    config's comparisons experiment (tracking.comparisons_experiment); returns its run id (see
    _logged_run for failures)."""
    tags = {"compare.source": comparison.source}
    if comparison.sweep:  # not `sweep`: a filter on the sweep shows its own runs only
        tags["compare.sweep"] = comparison.sweep

    def log(run_id: str) -> None:
        client.log_param(run_id, "alpha", comparison.alpha)
        client.log_param(run_id, "test", comparison.test)
        client.log_param(run_id, "over", comparison.over)
        client.log_param(run_id, "configs", len(comparison.rows))
        client.log_metric(run_id, "best_accuracy_mean", comparison.best.summary.mean)
        ties = sum(1 for r in comparison.rows if r.significant(comparison.alpha) is False)
        client.log_metric(run_id, "not_significantly_worse", ties)
        for path in files:
            client.log_artifact(run_id, str(path))
        client.log_dict(run_id, comparison.to_dict(), "compare.json")

    name = f"compare {comparison.source}"
    return _logged_run(client, comparison.best.run.experiment_id, name, tags, log, files)


def log_pair_comparison(client: Any, pair: PairComparison, files: Sequence[Path]) -> str:
    """Log McNemar's comparison of two train runs as a new MLflow run (stage=compare, tagged
    with both run ids) in the first run's comparisons experiment; returns its run id."""
    tags = {"compare.source": pair.source, "compare.runs": f"{pair.a.run_id} {pair.b.run_id}"}

    def log(run_id: str) -> None:
        client.log_param(run_id, "alpha", pair.alpha)
        client.log_param(run_id, "test", "McNemar exact")
        client.log_metric(run_id, "p_value", pair.result.p_value)
        client.log_metric(run_id, "only_a_right", pair.result.only_a_right)
        client.log_metric(run_id, "only_b_right", pair.result.only_b_right)
        for path in files:
            client.log_artifact(run_id, str(path))
        client.log_dict(run_id, pair.to_dict(), "compare.json")

    experiment_id = client.get_run(pair.a.run_id).info.experiment_id
    return _logged_run(client, experiment_id, f"compare {pair.source}", tags, log, files)
