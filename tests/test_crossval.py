"""The crossval stage on the real digits data: a parent MLflow run with one child run per fold in
a real sqlite store, the fold split itself, and its local outputs."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_helpers import (
    assert_png,
    client,
    download,
    history,
    isolated_mlflow,
    names_key,
    new_store,
    prepared_digits,
    runs,
    settings,
)

from pipeline.core.stats import summarize

FOLDS = 3
EPOCHS = 2
TINY = ("debug=fast", f"folds={FOLDS}", f"epochs={EPOCHS}", "batch_size=32")


@dataclass
class CrossValidated:
    uri: str
    parent: Any  # mlflow.entities.Run
    children: list[Any]  # ordered by their `fold` tag
    metrics: dict[str, Any]  # what crossval() returned
    out: Path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_digits(tmp_path_factory)


@pytest.fixture(scope="module")
def train_labels(prepared: Path) -> np.ndarray:
    from pipeline.core.data import load_split

    return load_split(prepared / "train.npz").labels


@pytest.fixture(scope="module")
def cv(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> CrossValidated:
    from pipeline.crossval import crossval

    root = tmp_path_factory.mktemp("crossval")
    uri = new_store(tmp_path_factory, root)
    cfg = settings(*TINY, f"tracking.uri={uri}")
    with isolated_mlflow(root):
        metrics = crossval(cfg, prepared, root / "out")
    found = runs(uri)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, f"expected one parent run, found {len(parents)}"
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    children.sort(key=lambda r: int(r.data.tags.get("fold", "0")))
    return CrossValidated(uri, parents[0], children, metrics, root / "out")


# --------------------------------------------------------------------------- MLflow runs


def test_parent_run_finished_and_tagged(cv: CrossValidated, prepared: Path):
    parent = cv.parent
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["stage"] == "crossval"
    summary = json.loads((prepared / "summary.json").read_text())
    assert parent.data.tags["dataset_sha256"] == summary["sha256"]
    record = json.loads((cv.out / "runs" / "crossval.json").read_text())
    assert record["dataset_sha256"] == summary["sha256"]  # the report refuses other data
    assert parent.data.params["folds"] == str(FOLDS)
    assert parent.data.params["epochs"] == str(EPOCHS)


def test_one_finished_child_run_per_fold(cv: CrossValidated):
    assert len(cv.children) == FOLDS
    assert [r.data.tags["fold"] for r in cv.children] == [str(k) for k in range(1, FOLDS + 1)]
    for child in cv.children:
        assert child.data.tags["mlflow.parentRunId"] == cv.parent.info.run_id
        assert child.info.experiment_id == cv.parent.info.experiment_id
        assert child.data.tags["stage"] == "crossval-fold"
        assert child.info.status == "FINISHED"
        assert 0.0 <= child.data.metrics["fold_accuracy"] <= 1.0
        assert "fold_loss" in child.data.metrics


def test_fold_runs_carry_their_parents_params_and_tags(cv: CrossValidated):
    """So a filter on a param or on the sweep/dataset tags keeps the folds with their parent."""
    own = {"stage", "fold", "mlflow.parentRunId"}
    for child in cv.children:
        assert child.data.params == cv.parent.data.params
        for key, value in cv.parent.data.tags.items():
            if not key.startswith("mlflow.") and key not in own:
                assert child.data.tags.get(key) == value, key


def test_each_fold_logs_a_validation_curve_per_epoch(cv: CrossValidated):
    for child in cv.children:
        for key in ("val_accuracy", "val_loss", "train_loss", "train_accuracy"):
            points = history(cv.uri, child.info.run_id, key)
            assert [step for step, _ in points] == list(range(1, EPOCHS + 1)), key
        # The fold's score is its model's accuracy on the held-out fold after the last epoch.
        last = history(cv.uri, child.info.run_id, "val_accuracy")[-1][1]
        assert child.data.metrics["fold_accuracy"] == pytest.approx(last, abs=1e-6)


def test_parent_summary_is_the_mean_and_std_of_the_folds(cv: CrossValidated):
    """The sample std (ddof=1), as compare's for the same folds (core.stats.summarize)."""
    accuracies = [child.data.metrics["fold_accuracy"] for child in cv.children]
    logged = cv.parent.data.metrics
    written = json.loads((cv.out / "metrics" / "crossval.json").read_text())
    assert logged["accuracy_mean"] == pytest.approx(np.mean(accuracies), abs=1e-9)
    for std in (logged["accuracy_std"], written["accuracy_std"], cv.metrics["accuracy_std"]):
        assert std == pytest.approx(np.std(accuracies, ddof=1), abs=1e-9)
        assert std == pytest.approx(summarize(accuracies).std, abs=1e-9)
    losses = [child.data.metrics["fold_loss"] for child in cv.children]
    assert logged["loss_mean"] == pytest.approx(np.mean(losses), abs=1e-9)
    for std in (logged["loss_std"], written["loss_std"]):
        assert std == pytest.approx(np.std(losses, ddof=1), abs=1e-9)
    assert logged["accuracy_mean"] > 0.3  # chance is 0.1


def test_every_fold_trains_a_fresh_model(cv: CrossValidated):
    """A network reused across folds would start later folds already trained (and score on data
    it has seen). Fresh ones all start from scratch: similar, high first-epoch losses."""
    first_losses = [history(cv.uri, c.info.run_id, "train_loss")[0][1] for c in cv.children]
    last_losses = [history(cv.uri, c.info.run_id, "train_loss")[-1][1] for c in cv.children]
    assert max(first_losses) - min(first_losses) < 0.15, first_losses
    # Later folds start no lower than where the previous fold's model ended.
    for previous_end, start in zip(last_losses, first_losses[1:], strict=False):
        assert start > previous_end, (first_losses, last_losses)


def test_plots_are_logged_as_pngs(cv: CrossValidated, tmp_path: Path):
    run_id = cv.parent.info.run_id
    listed = {a.path for a in client(cv.uri).list_artifacts(run_id, "plots")}
    assert {"plots/boxplot.png", "plots/curves.png", "plots/history.csv"} <= listed
    for name in ("boxplot.png", "curves.png"):
        assert_png(download(cv.uri, run_id, f"plots/{name}", tmp_path))


# --------------------------------------------------------------------------- local outputs


def test_local_outputs_match_the_runs(cv: CrossValidated):
    written = json.loads((cv.out / "metrics" / "crossval.json").read_text())
    assert written == cv.metrics
    assert written["fold_accuracy"] == {
        f"fold{k}": pytest.approx(c.data.metrics["fold_accuracy"], abs=1e-6)
        for k, c in enumerate(cv.children, start=1)
    }
    assert written["accuracy_mean"] == pytest.approx(cv.parent.data.metrics["accuracy_mean"])
    record = json.loads((cv.out / "runs" / "crossval.json").read_text())
    assert record["run_id"] == cv.parent.info.run_id
    with open(cv.out / "plots" / "crossval" / "history.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["fold"]), int(r["epoch"])) for r in rows] == [
        (k, e) for k in range(1, FOLDS + 1) for e in range(1, EPOCHS + 1)
    ]
    for name in ("boxplot.png", "curves.png"):
        assert_png(cv.out / "plots" / "crossval" / name)


# --------------------------------------------------------------------------- the fold split


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_held_out_folds_partition_the_training_set(train_labels, stratified, shuffle):
    from pipeline.core.folds import fold_indices

    folds = fold_indices(train_labels, folds=FOLDS, seed=42, shuffle=shuffle, stratified=stratified)
    assert len(folds) == FOLDS
    held_out = [set(val.tolist()) for _, val in folds]
    for (train_idx, val_idx), val_set in zip(folds, held_out, strict=True):
        assert val_set.isdisjoint(train_idx.tolist()), "a fold trains on its own held-out data"
        assert len(train_idx) + len(val_idx) == len(train_labels)
    for i in range(FOLDS):
        for j in range(i + 1, FOLDS):
            assert held_out[i].isdisjoint(held_out[j]), f"folds {i + 1} and {j + 1} overlap"
    assert set().union(*held_out) == set(range(len(train_labels)))
    sizes = [len(s) for s in held_out]
    assert max(sizes) - min(sizes) <= 1


def test_stratified_folds_keep_the_class_proportions(train_labels):
    from pipeline.core.folds import fold_indices

    overall = np.bincount(train_labels, minlength=10) / len(train_labels)
    counts = []
    for _, val_idx in fold_indices(
        train_labels, folds=FOLDS, seed=42, shuffle=True, stratified=True
    ):
        fold_counts = np.bincount(train_labels[val_idx], minlength=10)
        counts.append(fold_counts)
        np.testing.assert_allclose(fold_counts / len(val_idx), overall, atol=0.005)
    # Each class is spread over the folds as evenly as possible.
    assert (np.ptp(np.array(counts), axis=0) <= 1).all()


@pytest.mark.parametrize("stratified", [False, True])
def test_repeated_folds_are_new_assignments_and_repeat_1_is_the_unrepeated_one(
    train_labels, stratified
):
    from pipeline.core.folds import fold_indices, repeated_fold_indices

    split = {"folds": FOLDS, "seed": 42, "shuffle": True, "stratified": stratified}
    repeated = repeated_fold_indices(train_labels, repeats=2, **split)
    assert [(r, k) for r, k, _, _ in repeated] == [(r, k) for r in (1, 2) for k in (1, 2, 3)]
    for repeat in (1, 2):  # each repeat is a partition of the training set
        held_out = [val for r, _, _, val in repeated if r == repeat]
        assert sorted(np.concatenate(held_out).tolist()) == list(range(len(train_labels)))
    once = fold_indices(train_labels, **split)
    assert all(np.array_equal(v, o[1]) for (_, _, _, v), o in zip(repeated[:3], once, strict=True))
    assert not all(
        np.array_equal(a[3], b[3]) for a, b in zip(repeated[:3], repeated[3:], strict=True)
    )


def test_repeats_need_shuffled_folds():
    from pipeline.infra.errors import ConfigError

    with pytest.raises(ConfigError, match=r"crossval.repeats=2 .*crossval.shuffle=true"):
        settings("crossval.repeats=2", "crossval.shuffle=false")
    with pytest.raises(ConfigError, match=r"crossval\.repeats=0"):
        settings("crossval.repeats=0")
    assert settings("crossval.repeats=3").crossval.repeats == 3


def test_shuffled_folds_depend_on_the_seed(train_labels):
    from pipeline.core.folds import fold_indices

    def folds(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return fold_indices(train_labels, folds=FOLDS, seed=seed, shuffle=True, stratified=False)

    first, again, other = folds(1), folds(1), folds(2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_more_folds_than_the_smallest_class_is_a_config_error(
    prepared, train_labels, tmp_path, tmp_path_factory
):
    from pipeline.core.folds import fold_indices
    from pipeline.crossval import crossval
    from pipeline.infra.errors import ConfigError

    smallest = int(np.bincount(train_labels).min())
    overrides = (f"folds={smallest + 1}", "crossval.stratified=true")
    uri = new_store(tmp_path_factory, tmp_path)
    cfg = settings(*TINY, *overrides, f"tracking.uri={uri}")
    with pytest.raises(ConfigError) as raised:
        fold_indices(train_labels, folds=smallest + 1, seed=42, shuffle=True, stratified=True)
    message = str(raised.value)
    assert names_key(message, "folds"), message
    assert str(smallest) in message
    # crossval checks the split before it starts a run.
    with isolated_mlflow(tmp_path), pytest.raises(ConfigError, match="folds"):
        crossval(cfg, prepared, tmp_path / "out")
    assert runs(uri) == []
    assert not (tmp_path / "out").exists()
    # Without stratification the same number of folds is fine (the whole set is large enough).
    unstratified = fold_indices(
        train_labels, folds=smallest + 1, seed=42, shuffle=True, stratified=False
    )
    assert len(unstratified) == smallest + 1
