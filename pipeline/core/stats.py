"""The statistics of a config comparison: a fold-score summary with a Student-t interval, and
two-sided t-tests of one config against another (paired over folds, or Welch's unpaired).

SciPy is imported inside the functions: the Hydra callbacks reach this module through
pipeline.infra.runs, and every sweep loads them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05


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


def sample_std(scores: Sequence[float]) -> float:
    """The sample standard deviation of `scores`, sqrt(Σ(x - mean)² / (n - 1)) (ddof=1, Bessel's
    correction: the folds are a sample of the possible splits), for n >= 2 values (ValueError
    otherwise). crossval's accuracy_std and compare's std are both this."""
    import numpy as np

    values = np.asarray(scores, dtype=float)
    if values.size < 2:
        raise ValueError(f"need at least 2 scores for a spread, got {values.size}")
    return float(values.std(ddof=1))


def summarize(scores: Sequence[float], confidence: float = 1 - ALPHA) -> Summary:
    """Mean, std (ddof=1, sample_std) and the `confidence` interval mean ± t(n-1) · std / √n of
    `scores` (n >= 2 values; ValueError otherwise)."""
    import numpy as np
    from scipy import stats

    values = np.asarray(scores, dtype=float)
    mean, std = float(values.mean()), sample_std(values)
    half = float(stats.t.ppf((1 + confidence) / 2, values.size - 1)) * std / math.sqrt(values.size)
    return Summary(int(values.size), mean, std, mean - half, mean + half, confidence)


def _identical(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=0, abs_tol=1e-12) for x, y in zip(a, b, strict=True)
    )


def paired_t_test(a: Mapping[int, float], b: Mapping[int, float]) -> TestResult:
    """scipy.stats.ttest_rel of a against b, paired by fold number (fold -> score, the same folds
    in both and at least 2; ValueError otherwise).

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
    """scipy.stats.ttest_ind(a, b, equal_var=False): Welch's t-test, with the Welch-Satterthwaite
    df (at least 2 scores each; ValueError otherwise). Two constant, equal samples give t=0, p=1."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 scores in each sample")
    if len(set(a)) == 1 and len(set(b)) == 1 and _identical([a[0]], [b[0]]):
        return TestResult("Welch t", 0.0, 1.0, float(len(a) + len(b) - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    return TestResult("Welch t", float(result.statistic), float(result.pvalue), float(result.df))
