"""Rank swept configs by mean fold accuracy and test each against the best.

Works on plain `ConfigRun` records (one crossval run and its fold accuracies); reading them from
MLflow is pipeline.infra.runs' job, writing the tables pipeline.compare's. Each config is tested
against the best over the folds they share (paired by fold) when both used the same fold
assignment (same data, `folds`, `crossval.*`, and `seed` when shuffling): by default with the
corrected resampled t-test (Nadeau & Bengio 2003), or the plain paired t-test by name (TESTS);
otherwise with Welch's unpaired t-test, and a note saying why.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.stats import (
    ALPHA,
    McNemar,
    Summary,
    TestResult,
    corrected_t_test,
    holm,
    mcnemar_exact,
    paired_t_test,
    summarize,
    welch_t_test,
)
from pipeline.infra.errors import PipelineError

FOLD_METRIC = "fold_accuracy"
# A seed sweep of train is compared by each run's test accuracy.
SEED_METRIC = "test_accuracy"
# What a comparison's scores are: crossval fold runs, or train runs over seeds.
OVER = ("folds", "seeds")
# Params that say where a run was logged, how its data was fetched (the data itself is pinned
# by checksums) or how many threads it used, not what was trained: two runs differing only in
# these are the same config.
RUN_ONLY_PREFIXES = ("tracking.",)
RUN_ONLY_PARAMS = frozenset({"dataset.mirrors", "dataset.timeout", "dataset.retries", "threads"})
# What decides crossval's fold assignment, with the data's checksum.
FOLD_PARAMS = ("folds", "crossval.shuffle", "crossval.stratified", "crossval.repeats")
# Runs logged before crossval.repeats existed had one fold assignment.
PARAM_DEFAULTS = {"crossval.repeats": "1"}
# Up to this many scores, a t interval is wide by nature: say so.
WIDE_UP_TO = 3
# The tests between configs that share folds, by name (compare's --test); the first is the default.
TESTS = ("corrected", "paired")


class CompareError(PipelineError):
    """Nothing (or nothing valid) to compare; the message names the problem and the fix."""


@dataclass
class ConfigRun:
    """One crossval parent run and its fold accuracies ((repeat, fold) -> fold_accuracy, both
    numbered from 1; repeat 1 only unless crossval.repeats > 1).

    params and tags are MLflow's strings (flattened config keys, e.g. "crossval.shuffle").
    """

    run_id: str
    experiment_id: str
    start_time: int  # ms since the epoch
    params: dict[str, str]
    tags: dict[str, str]
    folds: dict[tuple[int, int], float]
    metrics: dict[str, float] = field(default_factory=dict)  # the run's own (accuracy_mean, ...)
    # A config over seeds (seed_groups): seed -> its train run; its folds are (1, seed) -> score.
    seed_runs: dict[int, str] = field(default_factory=dict)

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
        key = {k: self.params.get(k, PARAM_DEFAULTS.get(k, "?")) for k in FOLD_PARAMS}
        if self.params.get("crossval.shuffle", "True") != "False":
            key["seed"] = self.params.get("seed", "?")  # KFold's random_state only when shuffling
        key["data"] = self.tags.get("dataset_sha256", "?")
        return key

    @property
    def test_train_ratio(self) -> float:
        """n_test/n_train of one fold of k-fold CV: 1/(k-1) (each sample is held out once)."""
        k = self.params.get("folds", "")
        if not (k.isdigit() and int(k) >= 2):
            k = str(max(2, len({fold for _, fold in self.folds})))
        return 1 / (int(k) - 1)


@dataclass
class Row:
    rank: int
    label: str
    run: ConfigRun
    summary: Summary
    test: TestResult | None  # None for the best
    note: str = ""
    p_adjusted: float | None = None  # Holm-adjusted over all configs tested against the best

    @property
    def is_best(self) -> bool:
        return self.test is None

    def significant(self, alpha: float) -> bool | None:
        """Whether the Holm-adjusted p-value is below alpha (None for the best)."""
        return None if self.p_adjusted is None else self.p_adjusted < alpha


@dataclass
class Comparison:
    source: str  # "sweep <id>" or "experiment <name>"
    tracking_uri: str
    rows: list[Row]
    alpha: float = ALPHA
    test: str = TESTS[0]  # the test between configs that share folds
    over: str = OVER[0]
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
            return f"significantly worse than the best (Holm p < {self.alpha:g})"
        return f"not significantly different from the best (Holm p >= {self.alpha:g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sweep": self.sweep,
            "experiment": self.experiment,
            "tracking_uri": self.tracking_uri,
            "generated": self.generated,
            "alpha": self.alpha,
            "test": self.test,
            "notes": self.notes,
            "configs": [
                {
                    "rank": r.rank,
                    "label": r.label,
                    "run_id": r.run.run_id,
                    "params": r.run.config,
                    **_scores_dict(r.run),
                    **asdict(r.summary),
                    "test": asdict(r.test) if r.test else None,
                    "p_holm": r.p_adjusted,
                    "significant": r.significant(self.alpha),
                    "verdict": self.verdict(r),
                    "note": r.note,
                }
                for r in self.rows
            ],
        }


def _scores_dict(run: ConfigRun) -> dict[str, Any]:
    if run.seed_runs:
        return {
            "test_accuracy_by_seed": {str(seed): v for (_, seed), v in sorted(run.folds.items())},
            "seed_runs": {str(seed): run_id for seed, run_id in sorted(run.seed_runs.items())},
        }
    return {"fold_accuracy": {f"repeat{i}_fold{k}": v for (i, k), v in sorted(run.folds.items())}}


def seed_groups(runs: Iterable[ConfigRun]) -> tuple[list[ConfigRun], list[str]]:
    """Train runs (their SEED_METRIC in `metrics`) grouped into one config over seeds each: runs
    whose config differs only in `seed` (e.g. `train -m seed=0,1,2,3,4`) become one ConfigRun
    with the seeds' test accuracies, (1, seed) -> score, named after its newest run. A seed run
    more than once counts once, its newest run; runs without the metric are left out. Returns
    the groups and notes on what was left out."""
    groups: dict[tuple[tuple[str, str], ...], list[ConfigRun]] = {}
    notes = []
    for run in sorted(runs, key=lambda r: r.start_time):
        if SEED_METRIC not in run.metrics or not run.params.get("seed", "").isdigit():
            notes.append(f"left out train run {run.run_id}: no {SEED_METRIC} or seed logged")
            continue
        key = tuple(sorted((k, v) for k, v in run.config.items() if k != "seed"))
        groups.setdefault(key, []).append(run)
    chosen = []
    for members in groups.values():
        by_seed = {int(run.params["seed"]): run for run in members}  # the newest per seed
        if len(by_seed) < len(members):
            older = ", ".join(r.run_id for r in members if by_seed[int(r.params["seed"])] is not r)
            notes.append(f"seeds run more than once: the newest run counts, not {older}")
        newest = members[-1]
        chosen.append(
            ConfigRun(
                run_id=newest.run_id,
                experiment_id=newest.experiment_id,
                start_time=newest.start_time,
                params={k: v for k, v in newest.params.items() if k != "seed"},
                tags=newest.tags,
                folds={(1, seed): r.metrics[SEED_METRIC] for seed, r in sorted(by_seed.items())},
                seed_runs={seed: r.run_id for seed, r in sorted(by_seed.items())},
            )
        )
    return chosen, notes


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


def _shared_folds_test(run: ConfigRun, best: ConfigRun, test: str) -> TestResult:
    if test == "paired":
        return paired_t_test(run.folds, best.folds)
    return corrected_t_test(run.folds, best.folds, test_train_ratio=best.test_train_ratio)


def compare_runs(
    runs: Sequence[ConfigRun],
    *,
    alpha: float = ALPHA,
    test: str = TESTS[0],
    over: str = OVER[0],
    source: str = "",
    tracking_uri: str = "",
) -> Comparison:
    """Rank configs by mean fold accuracy and test each against the best: `test` (one of TESTS)
    when they share folds, Welch's test otherwise. over="seeds": `runs` are seed_groups, scored
    by test accuracy over independent seeds: Student-t intervals and Welch's test.

    Raises CompareError when alpha is not in (0, 1), `test` is unknown or a config has fewer
    than 2 folds (seeds).
    """
    if not 0 < alpha < 1:
        raise CompareError(f"alpha={alpha} must be in (0, 1)")
    if test not in TESTS:
        raise CompareError(f"unknown test {test!r}. Fix: use one of {', '.join(TESTS)}")
    configs, notes = group_configs(runs)
    labels = config_labels(configs)
    seeds = over == "seeds"
    for run, label in zip(configs, labels, strict=True):
        if len(run.folds) < 2 and seeds:
            raise CompareError(
                f"config {label} (train run {run.run_id}) has {len(run.folds)} seed(s) with "
                f"{SEED_METRIC}; at least 2 are needed for a spread. Fix: sweep seeds, e.g. "
                "`python -m pipeline.train -m seed=0,1,2,3,4`"
            )
        if len(run.folds) < 2:
            raise CompareError(
                f"config {label} (crossval run {run.run_id}) has {len(run.folds)} finished fold "
                f"run(s) with {FOLD_METRIC}; at least 2 are needed for a spread and a test. "
                "Fix: rerun that config's crossval"
            )
    ranked = sorted(
        (
            (
                summarize(
                    list(run.folds.values()),
                    1 - alpha,
                    test_train_ratio=0.0 if seeds else run.test_train_ratio,
                ),
                label,
                run,
            )
            for run, label in zip(configs, labels, strict=True)
        ),
        key=lambda item: (-item[0].mean, item[1]),
    )
    best_summary, best_label, best = ranked[0]
    rows = [Row(1, best_label, best, best_summary, None)]
    for rank, (summary, label, run) in enumerate(ranked[1:], start=2):
        same_folds = run.fold_assignment == best.fold_assignment
        if seeds:  # independent training runs, scored on the same test set
            result, note = welch_t_test(list(run.folds.values()), list(best.folds.values())), ""
        elif same_folds and set(run.folds) == set(best.folds):
            result, note = _shared_folds_test(run, best, test), ""
        else:
            result = welch_t_test(list(run.folds.values()), list(best.folds.values()))
            why = (
                _differences(run.fold_assignment, best.fold_assignment)
                if not same_folds
                else f"fold runs {sorted(run.folds)} vs {sorted(best.folds)}"
            )
            note = (
                f"folds not comparable with the best's ({why}): unpaired Welch t-test, which "
                "assumes independent scores and, like the plain paired test, is optimistic"
            )
        rows.append(Row(rank, label, run, summary, result, note))
    if seeds:
        for r in rows:
            values = ", ".join(f"{seed}: {v:.4f}" for (_, seed), v in sorted(r.run.folds.items()))
            notes.append(f"rank {r.rank} ({r.label}): {SEED_METRIC} by seed: {values}")
    if few := [f"rank {r.rank} ({r.label})" for r in rows if r.summary.n <= WIDE_UP_TO]:
        notes.append(
            f"{', '.join(few)}: {WIDE_UP_TO} or fewer scores, so the interval is wide by "
            "nature (t(0.975, df) is 12.71 for df 1, 4.30 for df 2); more folds or "
            "crossval.repeats narrow it"
        )
    # Several configs are tested against the best: adjust for multiplicity.
    tested = rows[1:]
    for row, adjusted in zip(tested, holm([r.test.p_value for r in tested if r.test]), strict=True):
        row.p_adjusted = adjusted
    return Comparison(
        source=source,
        tracking_uri=tracking_uri,
        rows=rows,
        alpha=alpha,
        test=test,
        over=over,
        notes=notes,
    )


# --------------------------------------------------------------------------- two train runs


@dataclass
class Predictions:
    """One train run's test-set predictions (its predictions.csv: actual, predicted per sample)."""

    run_id: str
    name: str
    tags: dict[str, str]
    actual: list[int]
    predicted: list[int]

    @property
    def correct(self) -> list[bool]:
        return [a == p for a, p in zip(self.actual, self.predicted, strict=True)]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.actual)


@dataclass
class PairComparison:
    """Two train runs on one test set, by McNemar's exact test."""

    a: Predictions
    b: Predictions
    result: McNemar
    tracking_uri: str
    alpha: float = ALPHA
    generated: str = field(
        default_factory=lambda: f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )

    @property
    def source(self) -> str:
        return f"runs {self.a.run_id[:8]} vs {self.b.run_id[:8]}"

    def verdict(self) -> str:
        if self.result.p_value >= self.alpha:
            return f"not significantly different (p >= {self.alpha:g})"
        better = self.a if self.result.only_a_right > self.result.only_b_right else self.b
        return f"run {better.run_id[:8]} is significantly more accurate (p < {self.alpha:g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "tracking_uri": self.tracking_uri,
            "generated": self.generated,
            "alpha": self.alpha,
            "test": "McNemar exact",
            "runs": [
                {"run_id": p.run_id, "name": p.name, "test_accuracy": p.accuracy}
                for p in (self.a, self.b)
            ],
            **asdict(self.result),
            "verdict": self.verdict(),
        }


def compare_predictions(
    a: Predictions, b: Predictions, *, alpha: float = ALPHA, tracking_uri: str = ""
) -> PairComparison:
    """McNemar's exact test of two train runs on their test-set predictions. CompareError when
    they were scored on different test data: other prepared data (their dataset_sha256 tags) or
    other test samples (predictions.csv's actual labels, which must match sample by sample)."""
    if not 0 < alpha < 1:
        raise CompareError(f"alpha={alpha} must be in (0, 1)")
    sha_a, sha_b = a.tags.get("dataset_sha256"), b.tags.get("dataset_sha256")
    if sha_a != sha_b or a.actual != b.actual:
        why = (
            f"dataset_sha256 {sha_a} vs {sha_b}"
            if sha_a != sha_b
            else f"predictions.csv labels differ ({len(a.actual)} vs {len(b.actual)} rows)"
        )
        raise CompareError(
            f"runs {a.run_id} and {b.run_id} were scored on different test data ({why}): "
            "McNemar's test needs the same test samples. Fix: compare two train runs of the same "
            "prepared dataset"
        )
    result = mcnemar_exact(a.correct, b.correct)
    return PairComparison(a, b, result, tracking_uri, alpha)
