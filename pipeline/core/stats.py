"""The statistics of a config comparison: a fold-score summary with a Student-t interval, and
two-sided t-tests of one config against another: the corrected resampled t-test over shared
folds (Nadeau & Bengio 2003; Bouckaert & Frank 2004 for repeated k-fold), the plain paired
t-test, or Welch's unpaired test.

SciPy is imported inside the functions: the Hydra callbacks reach this module through
pipeline.infra.runs, and every sweep loads them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    """Scores of one config (fold accuracies, or test accuracies over seeds): n, mean, sample std
    (ddof=1) and a t interval (method "Student t" or "corrected t"), clipped to the scores'
    bounds (clipped=True when it was); half_width is the t interval's, before clipping."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    half_width: float
    method: str
    clipped: bool


@dataclass(frozen=True)
class TestResult:
    """A two-sided t-test of a config against the best."""

    test: str  # "corrected t", "paired t" or "Welch t"
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


def summarize(
    scores: Sequence[float],
    confidence: float = 1 - ALPHA,
    *,
    test_train_ratio: float = 0.0,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Summary:
    """Mean, std (ddof=1, sample_std) and the `confidence` interval of `scores` (n >= 2 values;
    ValueError otherwise):

        mean ± t(n-1) · std · sqrt(1/n + test_train_ratio),

    the Student-t interval for test_train_ratio=0 (independent scores, e.g. seeds), and Nadeau &
    Bengio's (2003) corrected resampled t interval for cross-validation folds (n_test/n_train =
    1/(k-1) for k folds), whose scores share training data. An accuracy lies in [0, 1]: the
    interval is clipped to `bounds` and flagged, since t intervals, symmetric by construction,
    can spill over with few folds."""
    import numpy as np
    from scipy import stats

    values = np.asarray(scores, dtype=float)
    mean, std = float(values.mean()), sample_std(values)
    t = float(stats.t.ppf((1 + confidence) / 2, values.size - 1))
    half = t * std * math.sqrt(1 / values.size + test_train_ratio)
    low, high = max(bounds[0], mean - half), min(bounds[1], mean + half)
    method = "corrected t" if test_train_ratio > 0 else "Student t"
    clipped = low > mean - half or high < mean + half
    return Summary(int(values.size), mean, std, low, high, confidence, half, method, clipped)


def _identical(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=0, abs_tol=1e-12) for x, y in zip(a, b, strict=True)
    )


def _pairs(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[list, list]:
    """The scores of a and b in the same fold order (ValueError unless the same >= 2 folds)."""
    if set(a) != set(b):
        raise ValueError(f"folds differ: {sorted(a)} vs {sorted(b)}")
    if len(a) < 2:
        raise ValueError("need at least 2 paired folds")
    folds = sorted(a)
    return [a[k] for k in folds], [b[k] for k in folds]


def paired_t_test(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> TestResult:
    """scipy.stats.ttest_rel of a against b, paired by fold (fold -> score, e.g. fold number or
    (repeat, fold); the same folds in both and at least 2; ValueError otherwise).

    When every pair is equal the t statistic is 0/0 (scipy returns nan): there is no evidence of
    any difference, so this returns t=0, p=1.
    """
    from scipy import stats

    x, y = _pairs(a, b)
    if _identical(x, y):
        return TestResult("paired t", 0.0, 1.0, len(x) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "precision loss": nearly equal pairs
        result = stats.ttest_rel(x, y)
    return TestResult("paired t", float(result.statistic), float(result.pvalue), float(result.df))


def corrected_t_test(
    a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, test_train_ratio: float
) -> TestResult:
    """The corrected resampled t-test of a against b over the same n folds (fold -> score, as
    paired_t_test): with d the n paired differences,

        t = mean(d) / sqrt((1/n + n_test/n_train) · var(d)),  df = n - 1, two-sided p.

    Nadeau & Bengio (2003), "Inference for the Generalization Error", Machine Learning 52: fold
    scores share training data, so var(d)/n underestimates the variance of mean(d); the
    n_test/n_train term corrects for that. Over r repeats of k-fold CV (n = r·k differences)
    this is Bouckaert & Frank's (2004) corrected repeated k-fold cv test. For k-fold CV
    `test_train_ratio` = 1/(k-1) (>= 0; 0 gives the plain paired t-test). Equal pairs: t=0, p=1.
    """
    import numpy as np
    from scipy import stats

    if test_train_ratio < 0:
        raise ValueError(f"test_train_ratio={test_train_ratio} must be >= 0")
    x, y = _pairs(a, b)
    df = len(x) - 1
    d = np.subtract(x, y)
    var = float(d.var(ddof=1))
    if _identical(x, y) or var == 0:
        # Equal pairs: no evidence. A constant nonzero difference: t is infinite.
        t = 0.0 if _identical(x, y) else math.copysign(math.inf, float(d.mean()))
        return TestResult("corrected t", t, 1.0 if t == 0 else 0.0, df)
    t = float(d.mean()) / math.sqrt((1 / len(d) + test_train_ratio) * var)
    return TestResult("corrected t", t, float(2 * stats.t.sf(abs(t), df)), df)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjustment of m p-values, in their input order: the i-th smallest
    (i = 1..m) becomes max over j <= i of min(1, (m - j + 1) · p_(j)). Rejecting where the
    adjusted p < alpha keeps the family-wise error rate at alpha for any dependence between the
    tests ("A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two classifiers on the same test samples: the 2x2 table of
    agreements (both right, only a right, only b right, both wrong) and the two-sided p."""

    both_right: int
    only_a_right: int
    only_b_right: int
    both_wrong: int
    p_value: float

    @property
    def n(self) -> int:
        return self.both_right + self.only_a_right + self.only_b_right + self.both_wrong


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemar:
    """McNemar's (1947) test in its exact form: under "equally accurate", each of the n_ab + n_ba
    discordant samples (one model right, the other wrong) is a fair coin, so the two-sided p is
    scipy.stats.binomtest(n_ab, n_ab + n_ba, 0.5) (1 when there is no discordant sample).
    Dietterich (1998) recommends it for two models scored once on one test set. `a_correct`,
    `b_correct`: per test sample, whether each model got it right (same length; ValueError)."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equal-length 1-D sequences, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = float(stats.binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    return McNemar(int((a & b).sum()), only_a, only_b, int((~a & ~b).sum()), p)


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
