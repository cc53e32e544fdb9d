"""Hyper-parameter search: `python -m pipeline.crossval -m hparams_search=mlp_optuna` (Hydra's
Optuna sweeper maximizing the mean fold accuracy), on the digits data with a fresh sqlite store.

The real CLI runs a tiny search (the test-size preset, so 2 folds; 3 trials; a narrowed search
space given on the command line, as a user would); the runs are read back from MLflow: one
FINISHED crossval run per trial, one sweep tag, distinct configs inside the search space, and
exactly one run tagged best, the one with the highest `accuracy_mean`, which the sweeper's
optimization_results.yaml agrees on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from run_helpers import (
    CONF_DIR,
    compose,
    new_store,
    prepared_digits,
    project_copy,
    run_cli,
    runs,
    settings,
)

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the `search` extra")

SEARCHES = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))
TRIALS = 3
# The search space, narrowed on the command line for speed; the learning rate keeps
# conf/hparams_search/mlp_optuna.yaml's log interval.
WIDTHS, EPOCHS, BATCH_SIZES = (8, 16), (1, 2), (32, 64, 128)
LEARNING_RATES = (1e-4, 1e-2)
SPACE = (
    f"width=choice({','.join(map(str, WIDTHS))})",
    f"epochs=int(interval({EPOCHS[0]},{EPOCHS[-1]}))",
    f"batch_size=choice({','.join(map(str, BATCH_SIZES))})",
)
OBJECTIVE = "accuracy_mean"


@dataclass
class Search:
    returncode: int
    log: str
    sweep_dir: Path
    runs: list[Any]  # every run in the store: crossval parents and their fold runs

    @property
    def trials(self) -> list[Any]:
        return [r for r in self.runs if r.data.tags.get("stage") == "crossval"]


def search(factory: pytest.TempPathFactory, name: str, *overrides: str) -> Search:
    """Run the search CLI in a fresh project (digits prepared, an empty store of its own)."""
    project = project_copy(prepared_digits(factory), factory.mktemp(name))
    uri = new_store(factory, project)
    sweep_dir = project / "multirun"
    returncode, log = run_cli(
        project,
        "pipeline.crossval",
        "-m",
        "hparams_search=mlp_optuna",
        "debug=fast",
        *overrides,
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return Search(returncode, log, sweep_dir, runs(uri))


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Search:
    return search(tmp_path_factory, "search", f"hydra.sweeper.n_trials={TRIALS}", *SPACE)


def _config(run: Any) -> tuple[int, int, int, float]:
    p = run.data.params
    return int(p["width"]), int(p["epochs"]), int(p["batch_size"]), float(p["model.learning_rate"])


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize("name", SEARCHES)
def test_every_search_composes_validates_and_changes_only_hydra(name: str):
    """The task config is the default one: a search only configures hydra.* (sweeper, space)."""
    from omegaconf import OmegaConf

    assert settings(f"hparams_search={name}") == settings()
    assert settings(f"hparams_search={name}", "dataset=digits") == settings("dataset=digits")
    cfg = compose(f"hparams_search={name}", "hydra/launcher=joblib", return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert sweeper.sampler.seed is not None  # a search is reproducible
    assert sweeper.params, "no search space"
    for key in sweeper.params:  # a typo (model.lr) would fail every trial at run time
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a config key"
    assert cfg.hydra.callbacks.tag_best_trial._target_ == "pipeline.infra.callbacks.TagBestTrial"


def test_a_search_over_train_is_refused(tmp_path_factory: pytest.TempPathFactory):
    """Only crossval returns an objective: tuning train's test accuracy would fit the test set."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("train"))
    uri = new_store(tmp_path_factory, project)
    returncode, log = run_cli(
        project,
        "pipeline.train",
        "-m",
        "hparams_search=mlp_optuna",
        "debug=fast",
        f"tracking.uri={uri}",
    )
    assert returncode == 1, log
    assert "optimizes cross-validated accuracy" in log and "pipeline.crossval" in log, log
    assert "Traceback" not in log, log
    assert runs(uri) == []


# --------------------------------------------------------------------------- a real search


@pytest.mark.slow
def test_search_exits_cleanly(done: Search):
    assert done.returncode == 0, done.log
    assert "Traceback" not in done.log, done.log
    # Optuna's own lines ("[I 2026-...] A new study created") without colorlog's escape codes
    # when the output is not a terminal.
    assert "A new study created" in done.log
    assert "\x1b[" not in done.log, done.log


@pytest.mark.slow
def test_one_finished_crossval_run_per_trial_in_one_sweep(done: Search):
    assert len(done.trials) == TRIALS, done.log
    assert all(r.info.status == "FINISHED" for r in done.runs)  # fold runs included
    assert {r.data.tags["sweep"] for r in done.trials} == {str(done.sweep_dir)}
    assert sorted(int(r.data.tags["sweep_job"]) for r in done.trials) == list(range(TRIALS))


@pytest.mark.slow
def test_trials_differ_and_stay_inside_the_search_space(done: Search):
    configs = [_config(r) for r in done.trials]
    assert len(set(configs)) == TRIALS, configs
    for width, epochs, batch_size, learning_rate in configs:
        assert width in WIDTHS and epochs in EPOCHS and batch_size in BATCH_SIZES, configs
        assert LEARNING_RATES[0] <= learning_rate <= LEARNING_RATES[1], configs
    assert {r.data.params["folds"] for r in done.trials} == {"2"}  # the preset's, never searched


@pytest.mark.slow
def test_exactly_the_best_trial_is_tagged_and_named(done: Search):
    tagged = [r for r in done.trials if r.data.tags.get("best_trial") == "true"]
    assert len(tagged) == 1, [r.data.tags for r in done.trials]
    best = tagged[0]
    assert best.data.metrics[OBJECTIVE] == max(r.data.metrics[OBJECTIVE] for r in done.trials)
    assert not any("best_trial" in r.data.tags for r in done.runs if r is not best)
    assert f"Best trial: MLflow run {best.info.run_id}, {OBJECTIVE}=" in done.log, done.log
    assert best.data.tags["hydra_overrides"] in done.log
    assert "Best parameters:" in done.log  # the sweeper's own line


@pytest.mark.slow
def test_optimization_results_agree_with_the_tagged_run(done: Search):
    results = yaml.safe_load((done.sweep_dir / "optimization_results.yaml").read_text())
    (best,) = [r for r in done.trials if r.data.tags.get("best_trial") == "true"]
    assert math.isclose(results["best_value"], best.data.metrics[OBJECTIVE], abs_tol=1e-9)
    params = results["best_params"]
    assert _config(best) == (
        params["width"],
        params["epochs"],
        params["batch_size"],
        pytest.approx(params["model.learning_rate"]),
    )


# --------------------------------------------------------------------------- failing trials


@pytest.mark.slow
def test_a_failing_trial_stops_the_search_with_its_error(tmp_path_factory):
    """The default (max_failure_rate=0): the first failed trial ends the search, exit 1, with the
    trial's one-line error. Its run, opened before the failure, ends FAILED, not RUNNING."""
    failed = search(
        tmp_path_factory, "fail", "hydra.sweeper.n_trials=3", "width=choice(4000000000)"
    )
    assert failed.returncode == 1, failed.log
    assert "error: width=4000000000 with model.depth=1 needs about" in failed.log, failed.log
    assert "Traceback" not in failed.log, failed.log
    assert [r.info.status for r in failed.trials] == ["FAILED"]  # the later trials never ran
    assert not (failed.sweep_dir / "optimization_results.yaml").exists()


@pytest.mark.slow
def test_with_max_failure_rate_1_failed_trials_are_skipped(tmp_path_factory):
    """hydra.sweeper.max_failure_rate=1.0: failed trials are logged and the search goes on; the
    best is chosen, and tagged, among the trials that finished."""
    mixed = search(
        tmp_path_factory,
        "skip",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=1.0",
        "width=choice(8,4000000000)",
        "epochs=1",  # on the command line: not searched (mlp_optuna's space has epochs 2-10)
    )
    assert mixed.returncode == 0, mixed.log
    statuses = sorted(r.info.status for r in mixed.trials)
    assert len(statuses) == 4 and "FAILED" in statuses and "FINISHED" in statuses, statuses
    assert "Failed experiment: error: width=4000000000" in mixed.log, mixed.log
    assert all(r.info.status in ("FINISHED", "FAILED") for r in mixed.runs)
    (best,) = [r for r in mixed.trials if r.data.tags.get("best_trial") == "true"]
    assert best.info.status == "FINISHED" and best.data.params["width"] == "8"
