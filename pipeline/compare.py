"""Compare swept configs: which is best, and which others are indistinguishable from it.

Reads the crossval runs of one Hydra sweep (`--sweep`, the `sweep` tag every job of one `-m`
invocation carries; `--sweep latest` for the newest) or of a whole experiment (`--experiment`)
from MLflow, and for each config reports the number of folds, the mean fold accuracy, its
standard deviation (ddof=1) and a Student-t confidence interval. Configs are ranked by mean and
each is tested against the best over the folds they share (paired by fold) when both used the
same fold assignment (same data, `folds`, `crossval.*`, and `seed` when shuffling): by default
the corrected resampled t-test (Nadeau & Bengio 2003), or `--test paired`, the plain paired
t-test; otherwise Welch's unpaired t-test, with a note saying why.

A sweep of train runs over seeds (`python -m pipeline.train -m seed=0,1,2,3,4`) is compared
as one config over seeds: the mean test accuracy, a Student-t interval, the per-seed values.
`--runs A B` compares two train runs on their test-set predictions by McNemar's exact test.

Writes compare/compare.md (also printed) and compare/compare.html, and logs both, with a JSON
version, to a new MLflow run tagged stage=compare (and the sweep's tag).

    python -m pipeline.compare --sweep latest
    python -m pipeline.compare --sweep multirun/2026-11-25/17-14-27
    python -m pipeline.compare --experiment digits-mnist --no-log
    python -m pipeline.compare --runs 6cbda2c6... 9206a0cf...
"""

from __future__ import annotations

import argparse
import html
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.comparison import (
    TESTS,
    Comparison,
    PairComparison,
    Row,
    compare_predictions,
    compare_runs,
    seed_groups,
)
from pipeline.core.stats import ALPHA
from pipeline.infra import paths
from pipeline.infra.config import LOCAL_TRACKING_URI
from pipeline.infra.credentials import redact
from pipeline.infra.files import atomic_path
from pipeline.infra.render import (
    html_list,
    html_table,
    inline_html,
    markdown_list,
    markdown_table,
    page,
)
from pipeline.infra.runs import (
    CROSSVAL,
    TRAIN,
    has_runs,
    load_predictions,
    load_runs,
    log_comparison,
    log_pair_comparison,
    open_store,
    resolve_sweep,
)
from pipeline.infra.stage import run_command

DEFAULT_OUTPUT = paths.COMPARE_DIR / "compare.md"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _folds(row: Row) -> str:
    """n, or r x k for repeated k-fold CV."""
    repeats = len({repeat for repeat, _ in row.run.folds})
    return str(row.summary.n) if repeats == 1 else f"{repeats}x{row.summary.n // repeats}"


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    level = f"{100 * (1 - comparison.alpha):g}% CI"
    header = ["rank", "config", comparison.over, "mean", "std", level, "Δ vs best", "p"]
    header += ["p (Holm)", "test"]
    header += ["verdict", "run"]
    best = comparison.best.summary.mean
    rows = []
    for row in comparison.rows:
        s = row.summary
        rows.append(
            [
                str(row.rank),
                row.label,
                _folds(row),
                f"{s.mean:.4f}",
                f"{s.std:.4f}",
                f"[{s.ci_low:.4f}, {s.ci_high:.4f}]" + (" (clipped)" if s.clipped else ""),
                "—" if row.is_best else f"{s.mean - best:+.4f}",
                "—" if row.test is None else _p(row.test.p_value),
                "—" if row.p_adjusted is None else _p(row.p_adjusted),
                "—" if row.test is None else row.test.test,
                comparison.verdict(row),
                row.run.run_id[:8],
            ]
        )
    return header, rows


def _method(comparison: Comparison) -> list[str]:
    level = f"{100 * (1 - comparison.alpha):g}%"
    if comparison.over == "seeds":
        return _seed_method(comparison, level)
    return [
        f"Each row is one config's cross-validation: the mean of its fold accuracies, their "
        f"standard deviation (ddof=1) and a {level} corrected t interval, mean ± t(n-1) · std · "
        "sqrt(1/n + n_test/n_train) (Nadeau & Bengio 2003: fold scores share training data, "
        "so std/√n is too narrow). An accuracy lies in [0, 1]: an interval reaching past it "
        "is clipped there and marked (clipped).",
        f"Each config is tested against the best with a two-sided {_TEST_NAMES[comparison.test]} "
        "over the folds they share (paired by fold; the folds are the same samples when the "
        "data, `folds`, `crossval.*` and, when shuffling, `seed` match), otherwise with "
        "Welch's t-test.",
        "p (Holm): the p-values against the best adjusted for testing several configs (Holm "
        "1979; controls the chance of any false 'worse' at alpha); the verdict uses them.",
        f"Holm p >= {comparison.alpha:g}: the data do not show the config is worse than the best. "
        "That is not proof they are equal; with few folds only large gaps are detectable.",
        _CAVEATS[comparison.test],
    ]


def _seed_method(comparison: Comparison, level: str) -> list[str]:
    return [
        "Each row is one config trained over several seeds (train runs differing only in "
        "`seed`): the mean of their test accuracies, their standard deviation (ddof=1) and a "
        f"{level} Student-t interval, mean ± t(n-1) · std / √n, clipped to [0, 1] and marked "
        "(clipped) where it reaches past. The spread is the training randomness (initial "
        "weights, batch order) on one fixed test set; it says nothing of test-set sampling.",
        "Each config is tested against the best with Welch's two-sided t-test over seeds "
        "(the seeds' runs are independent).",
        "p (Holm): the p-values against the best adjusted for testing several configs (Holm "
        "1979); the verdict uses them.",
    ]


_TEST_NAMES = {
    "corrected": "corrected resampled t-test (Nadeau & Bengio 2003: the variance of the fold "
    "differences scaled by 1/n + n_test/n_train, n_test/n_train = 1/(k-1) for k folds; over "
    "repeated k-fold CV, Bouckaert & Frank 2004's corrected repeated k-fold test over all r·k "
    "differences, df = n - 1)",
    "paired": "plain paired t-test (`--test paired`)",
}
_CAVEATS = {
    "corrected": "Caveats: the correction accounts for folds sharing training data (a plain "
    "paired t-test over folds is anti-conservative: Dietterich 1998; Nadeau & Bengio 2003); "
    "Welch's test, where folds differ, has no such correction; the best is chosen from the "
    "same data.",
    "paired": "Caveats: fold scores share training data, so they are not independent and the "
    "plain paired t-test's p-values are optimistic (Dietterich 1998; Nadeau & Bengio 2003); "
    "the default corrected test accounts for that; the best is chosen from the same data.",
}


def _notes(comparison: Comparison) -> list[str]:
    tests = [f"rank {r.rank} ({r.label}): {r.note}" for r in comparison.rows if r.note]
    return tests + comparison.notes


def _store(comparison: Comparison) -> str:
    return f"Store: `{comparison.tracking_uri}`; generated {comparison.generated}."


def to_markdown(comparison: Comparison) -> str:
    """The comparison as Markdown: a title, the table, notes, the method and the store."""
    parts = [f"# Config comparison: {comparison.source}", markdown_table(*table_rows(comparison))]
    if notes := _notes(comparison):
        parts += ["Notes:", markdown_list(notes)]
    parts += ["Method:", markdown_list(_method(comparison)), _store(comparison)]
    return "\n\n".join(parts) + "\n"


# Left-align the text columns (config, verdict); green the best, yellow its ties.
_STYLE = """body{max-width:72rem}th{text-align:center}
td:nth-child(2),td:nth-child(11){text-align:left}tr.best{background:#e6f4ea;font-weight:600}tr.tie{background:#fff8e1}"""


def to_html(comparison: Comparison) -> str:
    """The comparison as a self-contained HTML page, with the same content as to_markdown."""
    header, rows = table_rows(comparison)
    alpha = comparison.alpha
    classes = [
        "best" if r.is_best else ("" if r.significant(alpha) else "tie") for r in comparison.rows
    ]
    title = f"Config comparison: {comparison.source}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        html_table(header, rows, classes),
        "<p>Green: the best. Yellow: not significantly different from the best.</p>",
    ]
    if notes := _notes(comparison):
        parts.append(f"<h2>Notes</h2>{html_list(notes)}")
    parts += [
        f"<h2>Method</h2>{html_list(_method(comparison))}",
        f"<p>{inline_html(_store(comparison))}</p>",
    ]
    return page(title, parts, _STYLE)


def write_reports(comparison: Comparison, markdown_path: Path) -> tuple[Path, Path]:
    """Write the Markdown file and an HTML file beside it (same name, .html); returns both."""
    html_path = markdown_path.with_suffix(".html")
    for path, text in ((markdown_path, to_markdown(comparison)), (html_path, to_html(comparison))):
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return markdown_path, html_path


def run_compare(
    *,
    sweep: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    output: Path | None = DEFAULT_OUTPUT,
    log: bool = True,
    alpha: float = ALPHA,
    test: str = TESTS[0],
) -> tuple[Comparison, str | None]:
    """Load, compare, write the reports (unless output is None) and log them to MLflow (unless
    log is False). Returns the comparison and the compare run's id (None when not logged)."""
    uri, client = open_store(tracking_uri)
    if sweep is not None:
        sweep = resolve_sweep(client, sweep)
        source = f"sweep {sweep}"
    else:
        source = f"experiment {experiment}"
    # Crossval runs if there are any; else train runs, as configs over seeds.
    seeds = not has_runs(client, CROSSVAL, sweep=sweep, experiment=experiment) and has_runs(
        client, TRAIN, sweep=sweep, experiment=experiment
    )
    runs, notes = load_runs(client, sweep=sweep, experiment=experiment, seeds=seeds)
    if seeds:
        runs, grouping = seed_groups(runs)
        notes += grouping
    # The store as the reports and the compare run record it: its password masked.
    comparison = compare_runs(
        runs,
        alpha=alpha,
        test=test,
        over="seeds" if seeds else "folds",
        source=source,
        tracking_uri=redact(uri),
    )
    comparison.sweep, comparison.experiment = sweep, experiment
    comparison.notes[:0] = notes
    files = write_reports(comparison, output) if output is not None else ()
    run_id = log_comparison(client, comparison, files) if log else None
    return comparison, run_id


# --------------------------------------------------------------------------- two train runs


def pair_table(pair: PairComparison) -> tuple[list[str], list[list[str]]]:
    """The 2x2 table of agreements: rows run A right/wrong, columns run B right/wrong."""
    a, b, r = pair.a.run_id[:8], pair.b.run_id[:8], pair.result
    header = ["", f"{b} right", f"{b} wrong", "total"]
    rows = [
        [f"{a} right", str(r.both_right), str(r.only_a_right), str(r.both_right + r.only_a_right)],
        [f"{a} wrong", str(r.only_b_right), str(r.both_wrong), str(r.only_b_right + r.both_wrong)],
        ["total", str(r.both_right + r.only_b_right), str(r.only_a_right + r.both_wrong), str(r.n)],
    ]
    return header, rows


def _pair_lines(pair: PairComparison) -> list[str]:
    r = pair.result
    return [
        *(
            f"Run `{p.run_id}` ({p.name}): test accuracy {p.accuracy:.4f} on {r.n} samples"
            for p in (pair.a, pair.b)
        ),
        f"McNemar's exact test: {r.only_a_right} vs {r.only_b_right} discordant samples, "
        f"p = {_p(r.p_value)}: **{pair.verdict()}**.",
    ]


_PAIR_METHOD = [
    "McNemar's test (McNemar 1947), exact form: of the samples one model gets right and the "
    "other wrong, each is equally likely to go either way if the models are equally accurate, "
    "so the two-sided p is the binomial test of the discordant counts at 1/2. It uses each test "
    "sample once, which a t-test on two accuracies cannot (Dietterich 1998 recommends it for two "
    "models scored on one test set).",
    "Both runs must have been scored on the same test samples: the same prepared data "
    "(`dataset_sha256`) and the same labels, sample by sample, in their `predictions.csv`.",
    "It compares these two trained models, not the two configs: seed noise is not in it. For "
    "configs, compare seed sweeps (`train -m seed=...`) or crossval sweeps.",
]


def pair_markdown(pair: PairComparison) -> str:
    """McNemar's comparison of two train runs as Markdown: the runs, the 2x2 table, the test."""
    parts = [
        f"# Two models on one test set: {pair.source}",
        markdown_list(_pair_lines(pair)),
        markdown_table(*pair_table(pair)),
        "Method:",
        markdown_list(_PAIR_METHOD),
        f"Store: `{pair.tracking_uri}`; generated {pair.generated}.",
    ]
    return "\n\n".join(parts) + "\n"


def pair_html(pair: PairComparison) -> str:
    title = f"Two models on one test set: {pair.source}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        html_list(_pair_lines(pair)),
        html_table(*pair_table(pair)),
        f"<h2>Method</h2>{html_list(_PAIR_METHOD)}",
        f"<p>{inline_html(f'Store: `{pair.tracking_uri}`; generated {pair.generated}.')}</p>",
    ]
    return page(title, parts, _STYLE)


def run_pair(
    run_a: str,
    run_b: str,
    *,
    tracking_uri: str | None = None,
    output: Path | None = DEFAULT_OUTPUT,
    log: bool = True,
    alpha: float = ALPHA,
) -> tuple[PairComparison, str | None]:
    """McNemar's exact test of two train runs: load their predictions, compare, write the
    reports (unless output is None), log them (unless log is False)."""
    uri, client = open_store(tracking_uri)
    a, b = load_predictions(client, run_a), load_predictions(client, run_b)
    pair = compare_predictions(a, b, alpha=alpha, tracking_uri=redact(uri))
    files: tuple[Path, ...] = ()
    if output is not None:
        html_path = output.with_suffix(".html")
        for path, text in ((output, pair_markdown(pair)), (html_path, pair_html(pair))):
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        files = (output, html_path)
    run_id = log_pair_comparison(client, pair, files) if log else None
    return pair, run_id


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compare",
        description="Rank the configs of a crossval sweep (or a train sweep over seeds) by mean "
        "accuracy, with confidence intervals and a test of each against the best; or compare "
        "two train runs on one test set (--runs) by McNemar's exact test.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--sweep", help="a sweep's tag (its folder, e.g. multirun/2026-11-25/17-14-27) or 'latest'"
    )
    which.add_argument("--experiment", help="all crossval runs of this MLflow experiment")
    which.add_argument(
        "--runs",
        nargs=2,
        metavar=("A", "B"),
        help="two train runs' ids: McNemar's exact test on their test-set predictions",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's "
        f"{LOCAL_TRACKING_URI}: in the working directory, or DVC_ROOT under DVC)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"Markdown report; the HTML one goes beside it (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument("--alpha", type=float, default=ALPHA, help="significance level (0.05)")
    parser.add_argument(
        "--test",
        choices=TESTS,
        default=TESTS[0],
        help="the test between configs that share folds: the corrected resampled t-test "
        "(default; Nadeau & Bengio 2003) or the plain paired t-test",
    )
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def compare_and_print() -> None:
        if args.runs:
            pair, run_id = run_pair(
                *args.runs,
                tracking_uri=args.tracking_uri,
                output=args.output,
                log=not args.no_log,
                alpha=args.alpha,
            )
            text = pair_markdown(pair)
        else:
            comparison, run_id = run_compare(
                sweep=args.sweep,
                experiment=args.experiment,
                tracking_uri=args.tracking_uri,
                output=args.output,
                log=not args.no_log,
                alpha=args.alpha,
                test=args.test,
            )
            text = to_markdown(comparison)
        print(text, end="")
        html_path = args.output.with_suffix(".html")
        logged = f"; logged to MLflow run {run_id}" if run_id else ""
        print(f"wrote {args.output} and {html_path}{logged}", file=sys.stderr)

    return run_command(compare_and_print)


if __name__ == "__main__":
    sys.exit(main())
