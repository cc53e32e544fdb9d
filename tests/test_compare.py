"""`python -m pipeline.compare`: the statistics on hand-checkable numbers, then a real crossval
sweep (a Hydra multirun subprocess on the digits data, a real sqlite MLflow store) compared and
checked against fold accuracies read back from MLflow independently of pipeline.compare."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_helpers import project_copy, run_module, sqlite_uri
from scipy import stats

from pipeline.compare import main, pair_markdown, run_compare, run_pair, to_markdown
from pipeline.core.comparison import (
    CompareError,
    Comparison,
    ConfigRun,
    compare_runs,
    seed_groups,
)
from pipeline.core.stats import (
    corrected_t_test,
    holm,
    mcnemar_exact,
    paired_t_test,
    summarize,
    welch_t_test,
)

TABLE_HEADER = (
    "| rank | config | folds | mean | std | 95% CI | Δ vs best | p | p (Holm) | test | verdict "
    "| run |"
)
NOT_SIGNIFICANT = "not significantly different from the best (Holm p >= 0.05)"
SIGNIFICANT = "significantly worse than the best (Holm p < 0.05)"

# --------------------------------------------------------------------------- statistics


def test_summary_on_hand_checked_numbers():
    s = summarize([0.8, 0.9, 0.85])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.85), pytest.approx(0.05))
    # t(0.975, df=2) = 4.302653; half width = 4.302653 * 0.05 / sqrt(3) = 0.124207
    assert s.half_width == pytest.approx(0.124207, abs=1e-6)
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.725793, abs=1e-6), pytest.approx(0.974207))
    assert (s.method, s.clipped) == ("Student t", False)


def test_corrected_interval_on_the_papers_formula():
    """Nadeau & Bengio (2003): mean ± t(n-1) · sqrt((1/n + n_test/n_train) · var)."""
    scores = [0.8, 0.82, 0.81]
    s = summarize(scores, test_train_ratio=1 / 2)
    half = stats.t.ppf(0.975, 2) * math.sqrt((1 / 3 + 1 / 2) * stats.tvar(scores))
    assert s.half_width == pytest.approx(half, rel=1e-12)
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.81 - half), pytest.approx(0.81 + half))
    assert s.method == "corrected t"


def test_intervals_stay_in_0_1_and_say_so():
    # The 2-fold case: t(0.975, 1) = 12.7 made [-0.4832, 0.7593].
    low = summarize([0.2, 0.076])
    assert low.mean - low.half_width < 0 and low.ci_low == 0.0 and low.clipped
    assert low.ci_high == pytest.approx(low.mean + low.half_width)
    high = summarize([0.8, 0.9, 1.0])
    assert (high.ci_high, high.clipped) == (1.0, True)
    assert high.ci_low == pytest.approx(0.9 - stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    assert 0 <= high.ci_low <= high.mean <= high.ci_high <= 1
    assert to_markdown(compare_runs([_run("a", [0.8, 0.9, 1.0])])).count("] (clipped) |") == 1


def test_interval_is_wider_for_fewer_folds():
    # Same mean and spread of values; 3 folds vs 6 (t(0.975, 5) = 2.570582, std = 0.044721).
    few, many = summarize([0.8, 0.9, 0.85]), summarize([0.8, 0.9, 0.85] * 2)
    assert many.half_width == pytest.approx(2.570582 * 0.044721 / math.sqrt(6), abs=1e-6)
    assert few.half_width > 2 * many.half_width
    assert few.ci_low < few.mean < few.ci_high


def test_two_or_three_folds_get_a_wide_by_nature_note():
    comparison = compare_runs([_run("a", [0.80, 0.82, 0.81]), _run("b", [0.9, 0.8, 0.85, 0.8])])
    notes = [n for n in comparison.notes if "wide by nature" in n]
    assert len(notes) == 1 and "rank 2 (folds=3)" in notes[0] and "rank 1" not in notes[0]


def test_summary_needs_two_scores():
    with pytest.raises(ValueError, match="at least 2"):
        summarize([0.9])


def test_paired_t_test_pairs_by_fold_number():
    # Differences per fold: 0.20, 0.05, 0.25 -> mean 1/6, sd 0.104083, t = 2.773501 (df 2).
    a = {1: 0.90, 2: 0.80, 3: 0.85}
    b = {3: 0.60, 1: 0.70, 2: 0.75}  # order must not matter: pairs are by fold number
    result = paired_t_test(a, b)
    assert result.test == "paired t"
    assert result.statistic == pytest.approx(2.773501, abs=1e-6)
    assert result.df == 2
    assert result.p_value == pytest.approx(stats.ttest_rel([0.9, 0.8, 0.85], [0.7, 0.75, 0.6])[1])
    assert result.p_value == pytest.approx(0.109129, abs=1e-6)


def test_corrected_t_test_on_the_papers_formula():
    """Nadeau & Bengio (2003), eq. for the corrected resampled t: t = mean(d) /
    sqrt((1/n + n_test/n_train) * var(d)), df = n - 1; for k-fold, n_test/n_train = 1/(k-1)."""
    a = {1: 0.90, 2: 0.80, 3: 0.85}
    b = {3: 0.60, 1: 0.70, 2: 0.75}
    d = [0.20, 0.05, 0.25]
    mean, var = sum(d) / 3, stats.tvar(d)
    t = mean / math.sqrt((1 / 3 + 1 / 2) * var)  # 1.754116...
    result = corrected_t_test(a, b, test_train_ratio=1 / 2)
    assert result.test == "corrected t"
    assert result.statistic == pytest.approx(1.754116, abs=1e-6)
    assert result.statistic == pytest.approx(t, rel=1e-12)
    assert result.df == 2
    assert result.p_value == pytest.approx(2 * stats.t.sf(t, 2), rel=1e-12)
    # The correction only widens: the plain paired test on the same folds is more confident.
    assert result.p_value > paired_t_test(a, b).p_value


def test_corrected_repeated_kfold_test_uses_all_r_times_k_differences():
    """Bouckaert & Frank (2004): r repeats of k folds, t = mean(d) / sqrt((1/(k r) + n2/n1) var(d))
    over all k r differences, df = k r - 1."""
    a = {(1, 1): 0.91, (1, 2): 0.88, (2, 1): 0.90, (2, 2): 0.86}
    b = {(2, 2): 0.85, (1, 1): 0.87, (2, 1): 0.89, (1, 2): 0.85}
    d = [0.04, 0.03, 0.01, 0.01]
    t = (sum(d) / 4) / math.sqrt((1 / 4 + 1 / 1) * stats.tvar(d))
    result = corrected_t_test(a, b, test_train_ratio=1.0)  # k = 2: n_test/n_train = 1
    assert result.statistic == pytest.approx(t, rel=1e-12)
    assert result.df == 3
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), 3), rel=1e-12)
    same = corrected_t_test(a, dict(a), test_train_ratio=1.0)
    assert (same.statistic, same.p_value) == (0.0, 1.0)
    with pytest.raises(ValueError, match="folds differ"):
        corrected_t_test(a, {(1, 1): 0.9, (1, 2): 0.8}, test_train_ratio=1.0)


def test_identical_folds_are_no_evidence_of_a_difference():
    result = paired_t_test({1: 0.9, 2: 0.8}, {1: 0.9, 2: 0.8})
    assert (result.statistic, result.p_value) == (0.0, 1.0)  # scipy alone would give nan


def test_paired_t_test_refuses_unmatched_folds():
    with pytest.raises(ValueError, match="folds differ"):
        paired_t_test({1: 0.9, 2: 0.8}, {1: 0.9, 3: 0.8})


def test_welch_t_test_on_hand_checked_numbers():
    a, b = [0.90, 0.80, 0.85], [0.70, 0.75, 0.60]
    va, vb = 0.0025, 0.0058333333  # sample variances
    se2 = va / 3 + vb / 3
    t = (0.85 - 0.6833333333) / math.sqrt(se2)
    df = se2**2 / ((va / 3) ** 2 / 2 + (vb / 3) ** 2 / 2)
    result = welch_t_test(a, b)
    assert result.test == "Welch t"
    assert result.statistic == pytest.approx(t, rel=1e-6)
    assert result.df == pytest.approx(df, rel=1e-6)
    assert result.p_value == pytest.approx(2 * stats.t.sf(t, df), rel=1e-6)


def test_holm_adjustment_by_hand():
    """Holm (1979): sort the m p-values, multiply the i-th smallest by m - i + 1, keep them
    non-decreasing, cap at 1; returned in the input order."""
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5·2 capped at 1, then non-decreasing
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_verdicts_use_holm_adjusted_p_values():
    # Three configs against the best, each raw p just under 0.05: Holm lifts some over it.
    best = _run("best", [0.90, 0.91, 0.92, 0.93, 0.94], width=512)
    others = [
        _run(f"w{w}", [0.90 - g, 0.91 - g - 0.01, 0.92 - g, 0.93 - g + 0.01, 0.94 - g], width=w)
        for w, g in ((8, 0.02), (16, 0.014), (32, 0.0135))
    ]
    comparison = compare_runs([best, *others])
    rows = comparison.rows[1:]
    raw = [r.test.p_value for r in rows]  # type: ignore[union-attr]
    assert [r.p_adjusted for r in rows] == pytest.approx(holm(raw))
    for row in rows:
        assert comparison.verdict(row) == (
            SIGNIFICANT if row.p_adjusted < 0.05 else NOT_SIGNIFICANT  # type: ignore[operator]
        )
    assert any(p < 0.05 for p in raw) and any(r.significant(0.05) is False for r in rows)
    assert "p (Holm)" in to_markdown(comparison)


def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.random(500) < 0.9, rng.random(500) < 0.85
    result = mcnemar_exact(a.tolist(), b.tolist())
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    assert (result.only_a_right, result.only_b_right) == (only_a, only_b)
    assert result.both_right == int((a & b).sum()) and result.n == 500
    assert result.p_value == pytest.approx(stats.binomtest(only_a, only_a + only_b).pvalue)
    # By hand: 1 vs 9 discordant -> 2 · (1 + 9 + ... ) / 2^10 = 2 · 11/1024
    hand = mcnemar_exact([True] * 1 + [False] * 9, [False] * 1 + [True] * 9)
    assert hand.p_value == pytest.approx(22 / 1024)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0  # no discordant sample
    with pytest.raises(ValueError, match="equal-length"):
        mcnemar_exact([True], [True, False])


def _run(run_id: str, folds: list[float], start: int = 0, **params: Any) -> ConfigRun:
    base = {"width": "64", "epochs": "5", "folds": str(len(folds)), "seed": "42"}
    base.update({"crossval.shuffle": "True", "crossval.stratified": "False"})
    base.update({k.replace("__", "."): str(v) for k, v in params.items()})
    return ConfigRun(
        run_id=run_id,
        experiment_id="1",
        start_time=start,
        params=base,
        tags={"dataset_sha256": "abc", "hydra_overrides": "width=1 epochs=1"},
        folds={(1, k): v for k, v in enumerate(folds, start=1)},
    )


def test_ranking_labels_and_verdicts_without_mlflow():
    comparison = compare_runs(
        [
            _run("a", [0.80, 0.82, 0.81], width=8),
            _run("b", [0.95, 0.96, 0.94], width=512),
            _run("c", [0.94, 0.97, 0.93], width=256),
        ]
    )
    assert [r.run.run_id for r in comparison.rows] == ["b", "c", "a"]
    assert [r.rank for r in comparison.rows] == [1, 2, 3]
    assert [r.label for r in comparison.rows] == ["width=512", "width=256", "width=8"]
    assert [comparison.verdict(r) for r in comparison.rows] == [
        "best",
        NOT_SIGNIFICANT,
        SIGNIFICANT,
    ]
    markdown = to_markdown(comparison)
    assert TABLE_HEADER in markdown
    assert "| 3 | width=8 | 3 | 0.8100 | 0.0100 |" in markdown


def test_shared_folds_use_the_corrected_test_by_default_the_paired_one_by_name():
    runs = [_run("a", [0.95, 0.96, 0.94]), _run("b", [0.90, 0.93, 0.92], width=8)]
    corrected, paired = compare_runs(runs).rows[1], compare_runs(runs, test="paired").rows[1]
    assert corrected.test is not None and corrected.test.test == "corrected t"
    # folds=3: n_test/n_train = 1/2
    expected = corrected_t_test(runs[1].folds, runs[0].folds, test_train_ratio=1 / 2)
    assert corrected.test == expected
    assert paired.test is not None and paired.test.test == "paired t"
    assert paired.test.p_value == pytest.approx(
        stats.ttest_rel([0.90, 0.93, 0.92], [0.95, 0.96, 0.94]).pvalue
    )
    assert "corrected resampled t-test" in to_markdown(compare_runs(runs))
    with pytest.raises(CompareError, match="unknown test 'z'"):
        compare_runs(runs, test="z")


def test_different_fold_assignments_fall_back_to_welch_with_a_note():
    comparison = compare_runs(
        [_run("a", [0.95, 0.96, 0.94], seed=1), _run("b", [0.90, 0.91, 0.92], seed=2)]
    )
    worse = comparison.rows[1]
    assert worse.test is not None and worse.test.test == "Welch t"
    assert "seed 2 vs 1" in worse.note
    expected = stats.ttest_ind([0.90, 0.91, 0.92], [0.95, 0.96, 0.94], equal_var=False)
    assert worse.test.p_value == pytest.approx(expected.pvalue)


def test_a_repeated_config_counts_once_newest_run():
    comparison = compare_runs(
        [
            _run("old", [0.1, 0.2, 0.3], start=1, width=64),
            _run("new", [0.9, 0.8, 0.85], start=2, width=64),
            _run("other", [0.5, 0.6, 0.55], start=3, width=8),
        ]
    )
    assert [r.run.run_id for r in comparison.rows] == ["new", "other"]
    assert any("old" in note and "newest" in note for note in comparison.notes)


def _train(run_id: str, seed: int, accuracy: float, start: int, **params: Any) -> ConfigRun:
    run = _run(run_id, [], start=start, seed=seed, **params)
    run.metrics = {"test_accuracy": accuracy}
    return run


def test_train_runs_over_seeds_group_into_one_config_each():
    runs = [
        _train("s0", 0, 0.90, 1),
        _train("s1-old", 1, 0.10, 2),
        _train("s1", 1, 0.92, 3),
        _train("s2", 2, 0.94, 4),
        _train("w0", 0, 0.80, 5, width=8),
        _train("w1", 1, 0.82, 6, width=8),
    ]
    groups, notes = seed_groups(runs)
    assert [g.seed_runs for g in groups] == [{0: "s0", 1: "s1", 2: "s2"}, {0: "w0", 1: "w1"}]
    assert any("s1-old" in n for n in notes)
    comparison = compare_runs(groups, over="seeds")
    best, other = comparison.rows
    assert best.summary.mean == pytest.approx(0.92) and best.summary.method == "Student t"
    assert other.test is not None and other.test.test == "Welch t"
    assert other.test.p_value == pytest.approx(
        stats.ttest_ind([0.80, 0.82], [0.90, 0.92, 0.94], equal_var=False).pvalue
    )
    with pytest.raises(CompareError, match=r"1 seed\(s\).*seed=0,1,2,3,4"):
        compare_runs(seed_groups([_train("x", 0, 0.9, 1)])[0], over="seeds")


def test_a_config_with_one_fold_is_refused():
    with pytest.raises(CompareError, match=r"width=8 .*has 1 finished fold"):
        compare_runs([_run("a", [0.9, 0.8], width=64), _run("b", [0.5], width=8)])


# --------------------------------------------------------------------------- a real sweep

# One Hydra multirun, four jobs with hand-picked combinations (a config group added through
# hydra.searchpath, since a sweep over width=... x epochs=... is a full cross product):
# Repeated 3-fold CV, 2 repeats: 6 fold runs each, for the corrected repeated k-fold test.
COMBOS = {
    "best": {"width": 64, "epochs": 5, "folds": 3, "crossval.repeats": 2},
    # Identical training: crossval passes each fold's validation data, so validation_split is
    # unused. With deterministic=true its folds are bitwise the best's.
    "clone": {"width": 64, "epochs": 5, "folds": 3, "crossval.repeats": 2, "validation_split": 0.1},
    "worse": {"width": 4, "epochs": 1, "folds": 3, "crossval.repeats": 2},
    # Other folds than the best's: not pairable, so Welch's test.
    "twofold": {"width": 64, "epochs": 2, "folds": 2},
}


@dataclass
class Sweep:
    project: Path
    uri: str
    sweep: str
    # combo -> (repeat, fold) -> fold_accuracy, read back here
    accuracies: dict[str, dict[tuple[int, int], float]]
    parents: dict[str, Any]  # combo -> the crossval parent run
    comparison: Comparison
    compare_run_id: str | None
    report: Path


def _read_back(uri: str, sweep: str) -> tuple[dict[str, Any], dict[str, dict[Any, float]]]:
    """The sweep's crossval parents and their folds' accuracies, read with plain MlflowClient."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    parents, accuracies = {}, {}
    for run in client.search_runs(ids, f"tags.sweep = '{sweep}' and tags.stage = 'crossval'"):
        combo = run.data.tags["hydra_overrides"].split("+combo=")[1].split()[0]
        parents[combo] = run
        children = client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
        accuracies[combo] = {
            (int(c.data.tags["repeat"]), int(c.data.tags["fold"])): c.data.metrics["fold_accuracy"]
            for c in children
        }
    return parents, accuracies


@pytest.fixture(scope="module")
def sweep(digits_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    project = project_copy(digits_prepared, tmp_path_factory.mktemp("compare"))
    combos = project / "extra_conf" / "combo"
    combos.mkdir(parents=True)
    for name, values in COMBOS.items():
        # YAML keys do not nest on dots: crossval.repeats is written as crossval: {repeats: 2}
        lines = ["# @package _global_"]
        for k, v in values.items():
            head, _, tail = k.partition(".")
            lines.append(f"{head}: {{{tail}: {v}}}" if tail else f"{k}: {v}")
        (combos / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    uri = sqlite_uri(project / "mlflow.db")
    sweep_dir = project / "multirun"
    done = run_module(
        "pipeline.crossval",
        "-m",
        f"+combo={','.join(COMBOS)}",
        "dataset=digits",
        "deterministic=true",
        "threads=1",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.searchpath=[file://{project / 'extra_conf'}]",
        cwd=project,
        timeout=900,  # 4 jobs, 20 fold runs, on a shared machine
    )
    assert done.returncode == 0, done.stdout + done.stderr
    parents, accuracies = _read_back(uri, str(sweep_dir))
    assert sorted(parents) == sorted(COMBOS), done.stderr
    comparison, run_id = run_compare(
        sweep=str(sweep_dir), tracking_uri=uri, output=project / "out" / "compare.md"
    )
    return Sweep(
        project, uri, str(sweep_dir), accuracies, parents, comparison, run_id, project / "out"
    )


def _row(sweep: Sweep, combo: str):
    run_id = sweep.parents[combo].info.run_id
    return next(r for r in sweep.comparison.rows if r.run.run_id == run_id)


def test_every_job_is_compared_with_its_folds(sweep: Sweep):
    assert len(sweep.comparison.rows) == len(COMBOS)
    for combo, values in COMBOS.items():
        row = _row(sweep, combo)
        assert row.run.folds == sweep.accuracies[combo]
        repeats = values.get("crossval.repeats", 1)
        assert row.summary.n == values["folds"] * repeats
        assert sorted(row.run.folds) == [
            (r, k) for r in range(1, repeats + 1) for k in range(1, values["folds"] + 1)
        ]
        assert f"width={values['width']}" in row.label and f"epochs={values['epochs']}" in row.label


def test_configs_are_ranked_by_mean_fold_accuracy(sweep: Sweep):
    means = {c: sum(a.values()) / len(a) for c, a in sweep.accuracies.items()}
    ranked = [r.run.run_id for r in sweep.comparison.rows]
    by_mean = sorted(means, key=lambda c: -means[c])
    # best and clone tie exactly; the tie is broken by label (validation_split=0.0 first)
    assert ranked[0] == sweep.parents["best"].info.run_id
    assert [sweep.parents[c].info.run_id for c in by_mean if c != "clone"] == [
        r for r in ranked if r != sweep.parents["clone"].info.run_id
    ]
    for row in sweep.comparison.rows:
        assert row.summary.mean == pytest.approx(means[_combo(sweep, row)], abs=1e-12)


def _combo(sweep: Sweep, row) -> str:
    return next(c for c, p in sweep.parents.items() if p.info.run_id == row.run.run_id)


def test_intervals_are_corrected_t_around_the_mean_within_0_1(sweep: Sweep):
    for row in sweep.comparison.rows:
        scores = list(sweep.accuracies[_combo(sweep, row)].values())
        s = row.summary
        assert 0 <= s.ci_low < s.mean < s.ci_high <= 1
        n = len(scores)
        std = stats.tstd(scores)  # ddof=1
        assert s.std == pytest.approx(std)
        # k-fold: n_test/n_train = 1/(k-1); n = repeats x k
        k = COMBOS[_combo(sweep, row)]["folds"]
        factor = math.sqrt(1 / n + 1 / (k - 1))
        assert s.half_width == pytest.approx(stats.t.ppf(0.975, n - 1) * std * factor)
        assert s.ci_low == pytest.approx(max(0, s.mean - s.half_width))
        assert s.ci_high == pytest.approx(min(1, s.mean + s.half_width))
    assert any("wide by nature" in n for n in sweep.comparison.notes)  # 2 and 3 folds


def test_clearly_worse_config_is_significant_by_the_corrected_test(sweep: Sweep):
    worse, best = sweep.accuracies["worse"], sweep.accuracies["best"]
    d = [worse[k] - best[k] for k in sorted(best)]
    # Bouckaert & Frank's corrected repeated k-fold t, 2 x 3 folds: (1/6 + 1/2) · var(d), df 5.
    t = (sum(d) / 6) / math.sqrt((1 / 6 + 1 / 2) * stats.tvar(d))
    row = _row(sweep, "worse")
    assert row.test is not None and row.test.test == "corrected t"
    assert row.test.statistic == pytest.approx(t, rel=1e-9)
    assert row.test.df == 5
    assert row.test.p_value == pytest.approx(2 * stats.t.sf(abs(t), 5), rel=1e-9)
    assert row.test.p_value < 0.05
    assert sweep.comparison.verdict(row) == SIGNIFICANT


def test_identical_config_is_not_significant(sweep: Sweep):
    assert sweep.accuracies["clone"] == sweep.accuracies["best"]  # deterministic=true
    row = _row(sweep, "clone")
    assert row.test is not None and row.test.test == "corrected t"
    assert row.test.p_value == 1.0
    assert sweep.comparison.verdict(row) == NOT_SIGNIFICANT


def test_other_folds_use_welch_with_a_note(sweep: Sweep):
    row = _row(sweep, "twofold")
    expected = stats.ttest_ind(
        list(sweep.accuracies["twofold"].values()),
        list(sweep.accuracies["best"].values()),
        equal_var=False,
    )
    assert row.test is not None and row.test.test == "Welch t"
    assert row.test.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert "folds 2 vs 3" in row.note and "crossval.repeats 1 vs 2" in row.note


def test_repeated_folds_are_tagged_and_summarised(sweep: Sweep):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=sweep.uri)
    parent = sweep.parents["best"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    names = sorted(c.info.run_name for c in children)
    assert names == [f"repeat {r} fold {k}" for r in (1, 2) for k in (1, 2, 3)]
    # The job's metrics/crossval.json: all 6 fold scores, their mean and sample std.
    written = [json.loads(p.read_text()) for p in Path(sweep.sweep).glob("*/metrics/crossval.json")]
    scores = sweep.accuracies["best"]
    expected = {f"repeat{r}_fold{k}": scores[(r, k)] for r, k in scores}
    assert any(
        w["fold_accuracy"] == pytest.approx(expected)
        and w["accuracy_std"] == pytest.approx(stats.tstd(list(scores.values())))
        for w in written
    )
    markdown = (sweep.report / "compare.md").read_text()
    assert f"| {_row(sweep, 'best').label} | 2x3 |" in markdown


def test_reports_are_written(sweep: Sweep):
    markdown = (sweep.report / "compare.md").read_text()
    assert markdown.startswith(f"# Config comparison: sweep {sweep.sweep}")
    assert TABLE_HEADER in markdown
    rows = {line.split(" | ")[1]: line for line in markdown.splitlines() if line[:2] == "| "}
    for combo, verdict in (("best", "best"), ("clone", NOT_SIGNIFICANT), ("worse", SIGNIFICANT)):
        row = _row(sweep, combo)
        assert rows[row.label].endswith(f"| {verdict} | {row.run.run_id[:8]} |")
    page = (sweep.report / "compare.html").read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page and 'class="best"' in page


def test_comparison_is_logged_as_an_mlflow_run(sweep: Sweep, tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=sweep.uri)
    assert sweep.compare_run_id is not None
    run = client.get_run(sweep.compare_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "compare"
    # Kept apart from the runs it compares: its own experiment, and no `sweep` tag.
    assert run.data.tags["compare.sweep"] == sweep.sweep and "sweep" not in run.data.tags
    compared = client.get_experiment(sweep.parents["best"].info.experiment_id).name
    assert client.get_experiment(run.info.experiment_id).name == f"{compared}-comparisons"
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert listed == {"compare.md", "compare.html", "compare.json"}
    path = client.download_artifacts(run.info.run_id, "compare.json", str(tmp_path))
    logged = json.loads(Path(path).read_text())
    assert [c["run_id"] for c in logged["configs"]] == [r.run.run_id for r in sweep.comparison.rows]


def test_cli_compares_the_latest_sweep(sweep: Sweep):
    done = run_module("pipeline.compare", "--sweep", "latest", "--no-log", cwd=sweep.project)
    assert done.returncode == 0, done.stderr
    assert f"# Config comparison: sweep {sweep.sweep}" in done.stdout
    assert "| corrected t |" in done.stdout
    assert TABLE_HEADER in done.stdout
    # Defaults: the store ./mlflow.db and compare/compare.{md,html}, relative to the cwd.
    assert (sweep.project / "compare" / "compare.md").read_text() == done.stdout
    assert (sweep.project / "compare" / "compare.html").is_file()


def test_store_defaults_to_mlflow_tracking_uri(sweep: Sweep, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no mlflow.db here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep.uri)
    main(["--sweep", "latest", "--no-log", "--output", str(tmp_path / "c.md"), "--test", "paired"])
    out = capsys.readouterr().out
    assert f"# Config comparison: sweep {sweep.sweep}" in out
    assert "| paired t |" in out and "plain paired t-test (`--test paired`)" in out
    assert (tmp_path / "c.md").is_file() and (tmp_path / "c.html").is_file()


# --------------------------------------------------------------------------- errors


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: "), captured.err
    return captured.err


def test_unknown_sweep_names_the_known_ones(sweep: Sweep, capsys):
    message = _error(capsys, "--sweep", "multirun/nope", "--tracking-uri", sweep.uri, "--no-log")
    assert "unknown sweep 'multirun/nope'" in message
    assert sweep.sweep in message


def test_unknown_experiment(sweep: Sweep, capsys):
    message = _error(capsys, "--experiment", "nope", "--tracking-uri", sweep.uri, "--no-log")
    assert "unknown experiment 'nope'" in message and "digits-digits" in message


def test_missing_store(tmp_path: Path, capsys):
    message = _error(capsys, "--sweep", "latest", "--tracking-uri", f"sqlite:///{tmp_path}/x.db")
    assert f"MLflow store sqlite:///{tmp_path}/x.db does not exist" in message
    assert not (tmp_path / "x.db").exists()  # not created as a side effect


def test_sweep_without_crossval_runs_and_a_one_fold_config(sweep: Sweep, capsys):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=sweep.uri)
    experiment = client.create_experiment("handmade")
    client.create_run(experiment, tags={"stage": "train", "sweep": "train-only"}, start_time=1)
    message = _error(capsys, "--sweep", "train-only", "--tracking-uri", sweep.uri, "--no-log")
    # Only train runs: compared as configs over seeds, and this one never finished.
    assert "no finished train runs in sweep train-only" in message
    message = _error(capsys, "--experiment", "handmade", "--tracking-uri", sweep.uri, "--no-log")
    assert "no finished train runs in handmade" in message

    # A finished crossval run of which only one fold run survived.
    for width in (8, 16):
        parent = client.create_run(
            experiment, tags={"stage": "crossval", "sweep": "one-fold"}, start_time=1
        )
        client.log_param(parent.info.run_id, "width", width)
        for fold in (1, 2) if width == 8 else (1,):
            child = client.create_run(
                experiment,
                tags={
                    "stage": "crossval-fold",
                    "fold": str(fold),
                    "mlflow.parentRunId": parent.info.run_id,
                },
            )
            client.log_metric(child.info.run_id, "fold_accuracy", 0.5)
            client.set_terminated(child.info.run_id)
        client.set_terminated(parent.info.run_id)
    message = _error(capsys, "--sweep", "one-fold", "--tracking-uri", sweep.uri, "--no-log")
    assert "config width=16" in message and "has 1 finished fold run(s)" in message


# --------------------------------------------------------------------------- a seed sweep of train

SEEDS = (0, 1, 2, 3, 4)


@dataclass
class SeedSweep:
    project: Path
    uri: str
    runs: dict[int, Any]  # seed -> its train run, read back with plain MlflowClient
    comparison: Comparison
    compare_run_id: str | None


@pytest.fixture(scope="module")
def seed_sweep(digits_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> SeedSweep:
    import mlflow

    project = project_copy(digits_prepared, tmp_path_factory.mktemp("seeds"))
    uri = sqlite_uri(project / "mlflow.db")
    sweep_dir = project / "multirun"
    done = run_module(
        "pipeline.train",
        "-m",
        f"seed={','.join(map(str, SEEDS))}",
        "debug=fast",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=project,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, f"tags.sweep = '{sweep_dir}' and tags.stage = 'train'")
    runs = {int(r.data.params["seed"]): r for r in found}
    assert sorted(runs) == list(SEEDS)
    comparison, run_id = run_compare(
        sweep="latest", tracking_uri=uri, output=project / "out" / "compare.md"
    )
    return SeedSweep(project, uri, runs, comparison, run_id)


def test_a_seed_sweep_is_one_config_over_seeds(seed_sweep: SeedSweep):
    comparison = seed_sweep.comparison
    assert comparison.over == "seeds" and len(comparison.rows) == 1
    row = comparison.best
    accuracy = {seed: r.data.metrics["test_accuracy"] for seed, r in seed_sweep.runs.items()}
    assert row.run.seed_runs == {seed: r.info.run_id for seed, r in seed_sweep.runs.items()}
    values = [accuracy[seed] for seed in SEEDS]
    s = row.summary
    assert (s.n, s.method) == (5, "Student t")
    assert s.mean == pytest.approx(np.mean(values), abs=1e-12)
    assert s.std == pytest.approx(stats.tstd(values))
    assert s.half_width == pytest.approx(stats.t.ppf(0.975, 4) * stats.tstd(values) / math.sqrt(5))
    assert 0 <= s.ci_low <= s.mean <= s.ci_high <= 1
    markdown = to_markdown(comparison)
    assert "| rank | config | seeds | mean |" in markdown
    per_seed = ", ".join(f"{seed}: {accuracy[seed]:.4f}" for seed in SEEDS)
    assert f"test_accuracy by seed: {per_seed}" in markdown
    assert "Student-t interval" in markdown


def test_the_seed_comparison_is_logged(seed_sweep: SeedSweep, tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=seed_sweep.uri)
    assert seed_sweep.compare_run_id is not None
    run = client.get_run(seed_sweep.compare_run_id)
    assert run.info.status == "FINISHED" and run.data.params["over"] == "seeds"
    path = client.download_artifacts(run.info.run_id, "compare.json", str(tmp_path))
    logged = json.loads(Path(path).read_text())["configs"][0]
    assert sorted(logged["test_accuracy_by_seed"]) == [str(s) for s in SEEDS]
    assert logged["ci_high"] <= 1 and "method" in logged


def _predictions(uri: str, run_id: str, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import mlflow

    path = mlflow.MlflowClient(tracking_uri=uri).download_artifacts(
        run_id, "plots/predictions.csv", str(tmp_path / run_id)
    )
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=int)
    return table[:, 0], table[:, 1]


def test_mcnemar_on_two_train_runs(seed_sweep: SeedSweep, tmp_path: Path, capsys):
    import mlflow

    a, b = seed_sweep.runs[0].info.run_id, seed_sweep.runs[1].info.run_id
    (actual_a, pred_a), (actual_b, pred_b) = (
        _predictions(seed_sweep.uri, r, tmp_path) for r in (a, b)
    )
    assert (actual_a == actual_b).all()
    right_a, right_b = pred_a == actual_a, pred_b == actual_b
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    pair, _ = run_pair(a, b, tracking_uri=seed_sweep.uri, output=None, log=False)
    assert (pair.result.only_a_right, pair.result.only_b_right) == (only_a, only_b)
    assert pair.result.both_right == int((right_a & right_b).sum())
    expected = stats.binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    assert pair.result.p_value == pytest.approx(expected)
    assert pair.a.accuracy == pytest.approx(seed_sweep.runs[0].data.metrics["test_accuracy"])

    output = tmp_path / "pair.md"
    assert main(["--runs", a, b, "--tracking-uri", seed_sweep.uri, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert (
        printed
        == output.read_text()
        == pair_markdown(pair).replace(pair.generated, printed.split("generated ")[1].rstrip(".\n"))
    )
    assert f"| {a[:8]} right | {pair.result.both_right} | {only_a} |" in printed
    assert "McNemar" in printed and output.with_suffix(".html").is_file()
    client = mlflow.MlflowClient(tracking_uri=seed_sweep.uri)
    compared = client.get_experiment(seed_sweep.runs[0].info.experiment_id).name
    comparisons = client.get_experiment_by_name(f"{compared}-comparisons")  # apart from the runs
    logged = client.search_runs([comparisons.experiment_id], f"tags.`compare.runs` = '{a} {b}'")
    assert len(logged) == 1 and logged[0].info.status == "FINISHED"
    assert logged[0].data.metrics["p_value"] == pytest.approx(expected)


def test_mcnemar_refuses_runs_scored_on_other_test_data(
    seed_sweep: SeedSweep, tmp_path: Path, capsys
):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=seed_sweep.uri)
    real = seed_sweep.runs[0]
    other = client.create_run(
        real.info.experiment_id, tags={"stage": "train", "dataset_sha256": "other"}
    ).info.run_id
    csv_dir = tmp_path / "plots"
    csv_dir.mkdir()
    (csv_dir / "predictions.csv").write_text("actual,predicted\n1,1\n2,2\n")
    client.log_artifacts(other, str(csv_dir), artifact_path="plots")
    client.set_terminated(other)
    args = ("--tracking-uri", seed_sweep.uri, "--no-log", "--output", str(tmp_path / "x.md"))
    message = _error(capsys, "--runs", real.info.run_id, other, *args)
    assert "different test data" in message and "dataset_sha256" in message
    assert not (tmp_path / "x.md").exists()
    nothing = client.create_run(real.info.experiment_id, tags={"stage": "crossval"}).info.run_id
    message = _error(capsys, "--runs", real.info.run_id, nothing, *args)
    assert "has no plots/predictions.csv" in message
