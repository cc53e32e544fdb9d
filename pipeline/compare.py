"""Compare swept configs: which is best, and which others are indistinguishable from it.

Reads the crossval runs of one Hydra sweep (`--sweep`, the `sweep` tag every job of one `-m`
invocation carries; `--sweep latest` for the newest) or of a whole experiment (`--experiment`)
from MLflow, and for each config reports the number of folds, the mean fold accuracy, its
standard deviation (ddof=1) and a Student-t confidence interval. Configs are ranked by mean and
each is tested against the best: a paired t-test over the folds (paired by fold number) when both
used the same fold assignment (same data, `folds`, `crossval.*`, and `seed` when shuffling),
otherwise Welch's unpaired t-test, with a note saying why.

Writes compare/compare.md (also printed) and compare/compare.html, and logs both, with a JSON
version, to a new MLflow run tagged stage=compare (and the sweep's tag).

    python -m pipeline.compare --sweep latest
    python -m pipeline.compare --sweep multirun/2026-11-25/17-14-27
    python -m pipeline.compare --experiment digits-mnist --no-log
"""

from __future__ import annotations

import argparse
import datetime
import html
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.infra import paths
from pipeline.infra.config import LOCAL_TRACKING_URI
from pipeline.infra.errors import PipelineError, first_line
from pipeline.infra.files import atomic_path
from pipeline.infra.stage import run_command

ALPHA = 0.05
DEFAULT_OUTPUT = paths.COMPARE_DIR / "compare.md"
CROSSVAL, FOLD_STAGE, COMPARE = "crossval", "crossval-fold", "compare"
FOLD_METRIC = "fold_accuracy"
# Params that say where a run was logged, how its data was fetched (the data itself is pinned
# by checksums) or how many threads it used, not what was trained: two runs differing only in
# these are the same config.
RUN_ONLY_PREFIXES = ("tracking.",)
RUN_ONLY_PARAMS = frozenset({"dataset.mirrors", "dataset.timeout", "dataset.retries", "threads"})
# What decides the fold assignment (pipeline.crossval.fold_indices), with the data's checksum.
FOLD_PARAMS = ("folds", "crossval.shuffle", "crossval.stratified")
_SEARCH_PAGE = 1000


class CompareError(PipelineError):
    """Nothing (or nothing valid) to compare; the message names the problem and the fix."""


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    """Fold accuracies of one config: n, mean, sample std (ddof=1) and a Student-t interval."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


@dataclass(frozen=True)
class TestResult:
    """A two-sided t-test of a config against the best."""

    test: str  # "paired t" or "Welch t"
    statistic: float
    p_value: float
    df: float


def summarize(scores: Sequence[float], confidence: float = 1 - ALPHA) -> Summary:
    """Mean, std (ddof=1) and the `confidence` interval mean ± t(n-1) · std / √n."""
    import numpy as np
    from scipy import stats

    values = np.asarray(scores, dtype=float)
    if values.size < 2:
        raise ValueError(f"need at least 2 scores for a spread, got {values.size}")
    mean, std = float(values.mean()), float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, values.size - 1)) * std / math.sqrt(values.size)
    return Summary(int(values.size), mean, std, mean - half, mean + half, confidence)


def _identical(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=0, abs_tol=1e-12) for x, y in zip(a, b, strict=True)
    )


def paired_t_test(a: Mapping[int, float], b: Mapping[int, float]) -> TestResult:
    """scipy.stats.ttest_rel of a against b, paired by fold number.

    When every pair is equal the t statistic is 0/0 (scipy returns nan): there is no evidence of
    any difference, so this returns t=0, p=1.
    """
    from scipy import stats

    if set(a) != set(b):
        raise ValueError(f"folds differ: {sorted(a)} vs {sorted(b)}")
    folds = sorted(a)
    x, y = [a[k] for k in folds], [b[k] for k in folds]
    if len(folds) < 2:
        raise ValueError("need at least 2 paired folds")
    if _identical(x, y):
        return TestResult("paired t", 0.0, 1.0, len(folds) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "precision loss": nearly equal pairs
        result = stats.ttest_rel(x, y)
    return TestResult("paired t", float(result.statistic), float(result.pvalue), float(result.df))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """scipy.stats.ttest_ind(a, b, equal_var=False); two constant, equal samples give t=0, p=1."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 scores in each sample")
    if len(set(a)) == 1 and len(set(b)) == 1 and _identical([a[0]], [b[0]]):
        return TestResult("Welch t", 0.0, 1.0, float(len(a) + len(b) - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    return TestResult("Welch t", float(result.statistic), float(result.pvalue), float(result.df))


# --------------------------------------------------------------------------- runs


@dataclass
class ConfigRun:
    """One crossval parent run and its fold accuracies (fold number -> fold_accuracy)."""

    run_id: str
    experiment_id: str
    start_time: int
    params: dict[str, str]
    tags: dict[str, str]
    folds: dict[int, float]
    metrics: dict[str, float] = field(default_factory=dict)  # the run's own (accuracy_mean, ...)

    @property
    def config(self) -> dict[str, str]:
        """The params that define what was trained (run-only params left out)."""
        return {
            k: v
            for k, v in self.params.items()
            if k not in RUN_ONLY_PARAMS and not k.startswith(RUN_ONLY_PREFIXES)
        }

    @property
    def fold_assignment(self) -> dict[str, str]:
        """What decides which samples land in which fold: equal -> the folds are the same."""
        key = {k: self.params.get(k, "?") for k in FOLD_PARAMS}
        if self.params.get("crossval.shuffle", "True") != "False":
            key["seed"] = self.params.get("seed", "?")  # KFold's random_state only when shuffling
        key["data"] = self.tags.get("dataset_sha256", "?")
        return key


@dataclass
class Row:
    rank: int
    label: str
    run: ConfigRun
    summary: Summary
    test: TestResult | None  # None for the best
    note: str = ""

    @property
    def is_best(self) -> bool:
        return self.test is None

    def significant(self, alpha: float) -> bool | None:
        return None if self.test is None else self.test.p_value < alpha


@dataclass
class Comparison:
    source: str  # "sweep <id>" or "experiment <name>"
    tracking_uri: str
    rows: list[Row]
    alpha: float = ALPHA
    sweep: str | None = None
    experiment: str | None = None
    notes: list[str] = field(default_factory=list)
    generated: str = field(
        default_factory=lambda: f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )

    @property
    def best(self) -> Row:
        return self.rows[0]

    def verdict(self, row: Row) -> str:
        if row.is_best:
            return "best"
        if row.significant(self.alpha):
            return f"significantly worse than the best (p < {self.alpha:g})"
        return f"not significantly different from the best (p >= {self.alpha:g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sweep": self.sweep,
            "experiment": self.experiment,
            "tracking_uri": self.tracking_uri,
            "generated": self.generated,
            "alpha": self.alpha,
            "notes": self.notes,
            "configs": [
                {
                    "rank": r.rank,
                    "label": r.label,
                    "run_id": r.run.run_id,
                    "params": r.run.config,
                    "fold_accuracy": {str(k): v for k, v in sorted(r.run.folds.items())},
                    **asdict(r.summary),
                    "test": asdict(r.test) if r.test else None,
                    "significant": r.significant(self.alpha),
                    "verdict": self.verdict(r),
                    "note": r.note,
                }
                for r in self.rows
            ],
        }


def filter_literal(value: str) -> str:
    """A string literal for an MLflow search filter."""
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
    """The sweep tag value meant by `sweep` ("latest", the tag itself, or its folder's path)."""
    if sweep == "latest":
        newest = recent_sweeps(client, limit=1)
        if not newest:
            raise CompareError(
                "no crossval sweep in this store. Run one, e.g. "
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
    raise CompareError(f"unknown sweep {sweep!r}: no run in this store has that sweep tag. {fix}")


def _fold_runs(client: Any, parent: Any) -> dict[int, float]:
    children = _search(
        client,
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = '{FOLD_STAGE}'",
    )
    folds: dict[int, float] = {}
    for child in children:
        fold, accuracy = child.data.tags.get("fold"), child.data.metrics.get(FOLD_METRIC)
        if child.info.status != "FINISHED" or accuracy is None or not (fold or "").isdigit():
            continue
        if int(fold) in folds:
            raise CompareError(
                f"crossval run {parent.info.run_id} has two runs for fold {fold}: "
                "the store was edited by hand? Delete one in the MLflow UI"
            )
        folds[int(fold)] = float(accuracy)
    return folds


def load_runs(
    client: Any, *, sweep: str | None = None, experiment: str | None = None
) -> tuple[list[ConfigRun], list[str]]:
    """The finished crossval parent runs of a sweep (its resolved tag value) or an experiment,
    with their fold accuracies; and notes on runs left out (not FINISHED)."""
    if (sweep is None) == (experiment is None):
        raise ValueError("give exactly one of sweep, experiment")
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise CompareError(
                f"unknown experiment {experiment!r} (experiments in this store: {names}). "
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
            f"no crossval runs in {what}{ran}. Fix: run a crossval sweep, e.g. "
            "`python -m pipeline.crossval -m width=64,512`, and compare that"
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
            f"no finished crossval runs in {what}: {'; '.join(notes)}. Fix: rerun the sweep"
        )
    return runs, notes


def group_configs(runs: Iterable[ConfigRun]) -> tuple[list[ConfigRun], list[str]]:
    """One run per config (the newest when a config was run more than once), and notes."""
    newest: dict[tuple[tuple[str, str], ...], list[ConfigRun]] = {}
    for run in runs:
        newest.setdefault(tuple(sorted(run.config.items())), []).append(run)
    chosen, notes = [], []
    for repeats in newest.values():
        repeats.sort(key=lambda r: r.start_time)
        chosen.append(repeats[-1])
        if len(repeats) > 1:
            older = ", ".join(r.run_id for r in repeats[:-1])
            notes.append(
                f"config of run {repeats[-1].run_id} was run {len(repeats)} times: "
                f"the newest run is compared, older ones left out ({older})"
            )
    return chosen, notes


def _override_order(runs: Sequence[ConfigRun]) -> list[str]:
    """Param names in the order the users typed them (hydra_overrides), e.g. width, epochs."""
    order: list[str] = []
    for run in runs:
        for token in run.tags.get("hydra_overrides", "").split():
            key = token.split("=", 1)[0].lstrip("+~")
            for name in (key, f"{key}.name"):  # `dataset=digits` sets dataset.name
                if name in run.params and name not in order:
                    order.append(name)
    return order


def config_labels(runs: Sequence[ConfigRun]) -> list[str]:
    """A short label per run: the config params whose values vary across `runs`."""
    keys = sorted({k for run in runs for k in run.config})
    varying = [k for k in keys if len({run.config.get(k) for run in runs}) > 1]
    order = [k for k in _override_order(runs) if k in varying]
    order += [k for k in varying if k not in order]
    if not order:
        return ["(the only config)" if len(runs) == 1 else "(same params)"] * len(runs)
    return [" ".join(f"{k}={run.config.get(k, '-')}" for k in order) for run in runs]


def _differences(a: Mapping[str, str], b: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b.get(k))


def compare_runs(
    runs: Sequence[ConfigRun], *, alpha: float = ALPHA, source: str = "", tracking_uri: str = ""
) -> Comparison:
    """Rank configs by mean fold accuracy and test each against the best."""
    if not 0 < alpha < 1:
        raise CompareError(f"alpha={alpha} must be in (0, 1)")
    configs, notes = group_configs(runs)
    labels = config_labels(configs)
    for run, label in zip(configs, labels, strict=True):
        if len(run.folds) < 2:
            raise CompareError(
                f"config {label} (crossval run {run.run_id}) has {len(run.folds)} finished fold "
                f"run(s) with {FOLD_METRIC}; at least 2 are needed for a spread and a test. "
                "Fix: rerun that config's crossval"
            )
    ranked = sorted(
        (
            (summarize(list(run.folds.values()), 1 - alpha), label, run)
            for run, label in zip(configs, labels, strict=True)
        ),
        key=lambda item: (-item[0].mean, item[1]),
    )
    best_summary, best_label, best = ranked[0]
    rows = [Row(1, best_label, best, best_summary, None)]
    for rank, (summary, label, run) in enumerate(ranked[1:], start=2):
        same_folds = run.fold_assignment == best.fold_assignment
        if same_folds and set(run.folds) == set(best.folds):
            test, note = paired_t_test(run.folds, best.folds), ""
        else:
            test = welch_t_test(list(run.folds.values()), list(best.folds.values()))
            why = (
                _differences(run.fold_assignment, best.fold_assignment)
                if not same_folds
                else f"fold runs {sorted(run.folds)} vs {sorted(best.folds)}"
            )
            note = f"folds not comparable with the best's ({why}): unpaired Welch t-test"
        rows.append(Row(rank, label, run, summary, test, note))
    return Comparison(source=source, tracking_uri=tracking_uri, rows=rows, alpha=alpha, notes=notes)


# --------------------------------------------------------------------------- output


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    level = f"{100 * (1 - comparison.alpha):g}% CI"
    header = ["rank", "config", "folds", "mean", "std", level, "Δ vs best", "p", "test"]
    header += ["verdict", "run"]
    best = comparison.best.summary.mean
    rows = []
    for row in comparison.rows:
        s = row.summary
        rows.append(
            [
                str(row.rank),
                row.label,
                str(s.n),
                f"{s.mean:.4f}",
                f"{s.std:.4f}",
                f"[{s.ci_low:.4f}, {s.ci_high:.4f}]",
                "—" if row.is_best else f"{s.mean - best:+.4f}",
                "—" if row.test is None else _p(row.test.p_value),
                "—" if row.test is None else row.test.test,
                comparison.verdict(row),
                row.run.run_id[:8],
            ]
        )
    return header, rows


def _method(comparison: Comparison) -> list[str]:
    level = f"{100 * (1 - comparison.alpha):g}%"
    return [
        f"Each row is one config's cross-validation: the mean of its fold accuracies, their "
        f"standard deviation (ddof=1) and a {level} Student-t interval.",
        "Each config is tested against the best with a two-sided paired t-test over folds "
        "(paired by fold number; the folds are the same samples when the data, `folds`, "
        "`crossval.*` and, when shuffling, `seed` match), otherwise with Welch's t-test.",
        f"p >= {comparison.alpha:g}: the data do not show the config is worse than the best. "
        "That is not proof they are equal; with few folds only large gaps are detectable.",
        "Caveats: fold scores share training data, so they are not independent and p-values "
        "are optimistic (Dietterich 1998; Nadeau & Bengio 2003); p-values are not adjusted "
        "for testing several configs, and the best is chosen from the same data.",
    ]


def to_markdown(comparison: Comparison) -> str:
    header, rows = table_rows(comparison)
    lines = [
        f"# Config comparison: {comparison.source}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows),
        "",
    ]
    test_notes = [f"rank {r.rank} ({r.label}): {r.note}" for r in comparison.rows if r.note]
    if notes := test_notes + comparison.notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    lines += ["Method:", "", *(f"- {m}" for m in _method(comparison)), ""]
    lines.append(f"Store: `{comparison.tracking_uri}`; generated {comparison.generated}.")
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem}
td{text-align:right}td:nth-child(2),td:nth-child(10){text-align:left}
tr.best{background:#e6f4ea;font-weight:600}tr.tie{background:#fff8e1}"""


def to_html(comparison: Comparison) -> str:
    header, rows = table_rows(comparison)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row, cells in zip(comparison.rows, rows, strict=True):
        css = "best" if row.is_best else ("" if row.significant(comparison.alpha) else "tie")
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        body.append(f'<tr class="{css}">{tds}</tr>' if css else f"<tr>{tds}</tr>")
    notes = [f"rank {r.rank} ({r.label}): {r.note}" for r in comparison.rows if r.note]
    notes += comparison.notes
    title = f"Config comparison: {comparison.source}"

    def items(texts: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in texts) + "</ul>"

    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        "<p>Green: the best. Yellow: not significantly different from the best.</p>",
        f"<h2>Notes</h2>{items(notes)}" if notes else "",
        f"<h2>Method</h2>{items(_method(comparison))}",
        f"<p>Store: <code>{html.escape(comparison.tracking_uri)}</code>; "
        f"generated {html.escape(comparison.generated)}.</p>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_reports(comparison: Comparison, markdown_path: Path) -> tuple[Path, Path]:
    """Write the Markdown file and an HTML file beside it (same name, .html); returns both."""
    html_path = markdown_path.with_suffix(".html")
    for path, text in ((markdown_path, to_markdown(comparison)), (html_path, to_html(comparison))):
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return markdown_path, html_path


def log_comparison(client: Any, comparison: Comparison, files: Sequence[Path]) -> str:
    """Log the comparison as a new MLflow run (stage=compare, the sweep tag) in the best
    config's experiment; returns its run id. The run ends FAILED/KILLED if logging breaks."""
    from pipeline.infra.tracking import _git_commit

    tags = {"stage": COMPARE, "compare.source": comparison.source}
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


def open_store(uri: str | None) -> tuple[str, Any]:
    """(absolute URI, MlflowClient) for an existing store; never creates one. `uri` None: the
    MLFLOW_TRACKING_URI environment variable, else the project's sqlite:///mlflow.db."""
    import mlflow

    from pipeline.infra.tracking import check_store, store_uri

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


def run_compare(
    *,
    sweep: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    output: Path | None = DEFAULT_OUTPUT,
    log: bool = True,
    alpha: float = ALPHA,
) -> tuple[Comparison, str | None]:
    """Load, compare, write the reports (unless output is None) and log them to MLflow (unless
    log is False). Returns the comparison and the compare run's id (None when not logged)."""
    uri, client = open_store(tracking_uri)
    if sweep is not None:
        sweep = resolve_sweep(client, sweep)
        source = f"sweep {sweep}"
    else:
        source = f"experiment {experiment}"
    runs, notes = load_runs(client, sweep=sweep, experiment=experiment)
    comparison = compare_runs(runs, alpha=alpha, source=source, tracking_uri=uri)
    comparison.sweep, comparison.experiment = sweep, experiment
    comparison.notes[:0] = notes
    files = write_reports(comparison, output) if output is not None else ()
    run_id = log_comparison(client, comparison, files) if log else None
    return comparison, run_id


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description="Rank the configs of a crossval sweep by mean fold accuracy, with confidence "
        "intervals and a t-test of each against the best.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--sweep", help="a sweep's tag (its folder, e.g. multirun/2026-11-25/17-14-27) or 'latest'"
    )
    which.add_argument("--experiment", help="all crossval runs of this MLflow experiment")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
        f"{LOCAL_TRACKING_URI}, relative to the working directory)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"Markdown report; the HTML one goes beside it (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument("--alpha", type=float, default=ALPHA, help="significance level (0.05)")
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def compare_and_print() -> None:
        comparison, run_id = run_compare(
            sweep=args.sweep,
            experiment=args.experiment,
            tracking_uri=args.tracking_uri,
            output=args.output,
            log=not args.no_log,
            alpha=args.alpha,
        )
        print(to_markdown(comparison), end="")
        html_path = args.output.with_suffix(".html")
        logged = f"; logged to MLflow run {run_id}" if run_id else ""
        print(f"wrote {args.output} and {html_path}{logged}", file=sys.stderr)

    return run_command(compare_and_print)


if __name__ == "__main__":
    sys.exit(main())
