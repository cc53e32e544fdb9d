"""How MLflow runs end: FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM, never left
RUNNING; checked in a real sqlite store, in-process and against a real `python -m pipeline.train`
process that is sent SIGTERM mid-training."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from run_helpers import (
    client,
    free_port,
    history,
    isolated_mlflow,
    new_store,
    prepared_digits,
    project_copy,
    reaped,
    runs,
    settings,
    start_cli,
)

SHA = "0" * 64


class Boom(RuntimeError):
    pass


@pytest.fixture
def store(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return new_store(tmp_path_factory, tmp_path)


def four_epochs(uri: str):
    """Settings for the runs below (epochs=4: a param they check; nothing is trained)."""
    return settings("debug=fast", "epochs=4", f"tracking.uri={uri}")


def test_a_run_that_completes_ends_finished_with_params_and_tags(store: str, tmp_path: Path):
    from pipeline.infra.tracking import tracked_run

    with isolated_mlflow(tmp_path), tracked_run(four_epochs(store), "train", SHA) as run:
        import mlflow

        assert mlflow.active_run().info.run_id == run.info.run_id
        mlflow.log_metric("loss", 1.5, step=1)
    [found] = runs(store)
    assert found.info.run_id == run.info.run_id
    assert found.info.status == "FINISHED"
    assert found.data.params["epochs"] == "4"
    assert found.data.tags["stage"] == "train"
    assert found.data.tags["dataset_sha256"] == SHA
    assert history(store, run.info.run_id, "loss") == [(1, 1.5)]


def test_experiments_are_tagged_as_model_training(store: str, tmp_path: Path):
    """MLflow 3's UI opens an experiment without this kind on its GenAI overview. An experiment
    the pipeline creates gets the kind; one it reuses gets it too, unless it has a kind already."""
    from pipeline.infra.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, tracked_run

    mlflow_client = client(store)
    untagged = mlflow_client.create_experiment("untagged")
    chosen = mlflow_client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    for name in ("fresh", "untagged", "chosen"):
        cfg = settings("debug=fast", f"tracking.uri={store}", f"tracking.experiment={name}")
        with isolated_mlflow(tmp_path), tracked_run(cfg, "train", SHA):
            pass
    kinds = {
        name: mlflow_client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)
        for name in ("fresh", "untagged", "chosen")
    }
    assert kinds == {"fresh": EXPERIMENT_KIND, "untagged": EXPERIMENT_KIND, "chosen": "finetuning"}
    assert mlflow_client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert mlflow_client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_ui_links_open_the_model_training_view_without_a_password():
    from pipeline.infra.tracking import ui_link

    assert ui_link("http://alice:s3cret@mlflow.example:5000/", "7", "abc") == (
        "http://alice:***@mlflow.example:5000/#/experiments/7/runs/abc"
        "?workflowType=machine_learning"
    )
    # A sqlite store: where `mlflow ui --backend-store-uri ...` serves it by default.
    assert ui_link("sqlite:////tmp/mlflow.db", "1") == (
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    )


@pytest.mark.parametrize(
    ("overrides", "logged", "not_logged"),
    [
        (
            ("dataset=mnist", "model=mlp"),
            {"epochs", "batch_size", "width", "seed", "model.name", "model.depth", "dataset.name"},
            {"model.filters", "dataset.test_fraction", "dataset.split_seed"},
        ),
        (
            ("dataset=digits", "model=lenet5"),
            {"model.filters", "dataset.test_fraction", "dataset.split_seed", "model.activation"},
            {"width", "model.depth"},
        ),
    ],
)
def test_params_are_what_defines_the_run_and_applies_to_it(
    store: str, tmp_path: Path, overrides, logged, not_logged
):
    """Not where it is logged, how fast it trains or where its data comes from (those are tags
    or nothing), and not the keys its dataset or model type never reads."""
    from pipeline.infra.tracking import tracked_run

    cfg = settings("debug=fast", *overrides, "threads=1", f"tracking.uri={store}")
    with isolated_mlflow(tmp_path), tracked_run(cfg, "train", SHA):
        pass
    [run] = runs(store, f"digits-{cfg.dataset.name}")
    params = set(run.data.params)
    assert logged <= params and not (not_logged & params)
    plumbing = {"tracking.uri", "tracking.experiment", "threads", "dataset.mirrors"}
    plumbing |= {"dataset.timeout", "dataset.retries", "dataset.max_file_mb"}
    assert not (plumbing & params)
    assert not [
        p for p in params if p.startswith(("dataset.files", "dataset.train", "dataset.test."))
    ]
    assert run.data.tags["threads"] == "1"


@pytest.mark.parametrize("enabled", [False, True])
def test_system_metrics_are_logged_when_switched_on(
    enabled: bool, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from pipeline.infra.tracking import tracked_run

    # MLflow samples every 10 s and logs after 1 sample by default: make a short run long enough.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    cfg = settings("debug=fast", f"tracking.uri={store}", f"tracking.system_metrics={enabled}")
    with isolated_mlflow(tmp_path), tracked_run(cfg, "train", SHA):
        time.sleep(1.5)
    [run] = runs(store)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    if enabled:
        assert {
            "system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes",
        } <= system
    else:
        assert not system


def _run_that_raises(uri: str, cwd: Path, error: BaseException) -> None:
    from pipeline.infra.tracking import tracked_run

    with isolated_mlflow(cwd), tracked_run(four_epochs(uri), "train", SHA):
        raise error


def _stage_terminated() -> BaseException:
    from pipeline.infra.stage import Terminated

    return Terminated("received signal 15")


def _interrupt_replaced_by_library() -> BaseException:
    """What TensorFlow raises when Ctrl-C lands inside fit(): its own error, the interrupt kept
    only as context."""
    try:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("Exiting device scope without proper scope nesting")
    except RuntimeError as err:
        return err


@pytest.mark.parametrize(
    ("make_error", "status"),
    [
        (lambda: Boom("fit failed"), "FAILED"),
        (lambda: KeyboardInterrupt(), "KILLED"),
        (_stage_terminated, "KILLED"),
        (_interrupt_replaced_by_library, "KILLED"),
    ],
    ids=["error", "ctrl-c", "sigterm", "ctrl-c-inside-tensorflow"],
)
def test_a_run_that_raises_is_ended_and_the_error_propagates(
    store: str, tmp_path: Path, make_error, status: str
):
    import mlflow

    error = make_error()
    with pytest.raises(type(error)):
        _run_that_raises(store, tmp_path, error)
    assert mlflow.active_run() is None
    [found] = runs(store)
    assert found.info.status == status
    assert found.info.end_time is not None
    assert found.data.params["epochs"] == "4"  # the run had started and logged its config


def test_a_failing_fold_fails_its_child_run_and_the_parent(store: str, tmp_path: Path):
    import mlflow

    from pipeline.infra.tracking import child_run, tracked_run

    started = {}
    with (
        pytest.raises(Boom),
        isolated_mlflow(tmp_path),
        tracked_run(four_epochs(store), "crossval", SHA) as parent,
    ):
        with child_run("fold 1", {"fold": "1"}) as first:
            mlflow.log_metric("fold_accuracy", 0.5)
        with child_run("fold 2", {"fold": "2"}) as second:
            started["second"] = second.info.run_id
            raise Boom("fold 2 failed")
    assert mlflow.active_run() is None
    by_id = {r.info.run_id: r for r in runs(store)}
    assert len(by_id) == 3
    assert by_id.pop(parent.info.run_id).info.status == "FAILED"
    assert by_id.pop(first.info.run_id).info.status == "FINISHED"
    second = by_id.pop(started["second"])
    assert not by_id
    assert second.data.tags["fold"] == "2"
    assert second.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert second.info.status == "FAILED"


def test_an_unreachable_tracking_server_fails_before_a_run_starts(tmp_path: Path):
    from pipeline.infra.errors import TrackingError
    from pipeline.infra.tracking import tracked_run

    cfg = four_epochs(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    entered = False
    with (
        pytest.raises(TrackingError, match="unreachable"),
        isolated_mlflow(tmp_path),
        tracked_run(cfg, "train", SHA),
    ):
        entered = True
    assert not entered


# --------------------------------------------------------------------------- SIGTERM, for real


def _wait_for_training(uri: str, process, deadline: float):
    """The run once it is RUNNING and has logged its first epoch; fails if the process exits."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the training process exited early with {process.returncode}")
        found = runs(uri)
        running = [r for r in found if r.info.status == "RUNNING"]
        if running and history(uri, running[0].info.run_id, "train_loss"):
            return running[0]
        time.sleep(0.5)
    pytest.fail("no RUNNING run with a logged epoch appeared in time")


def test_sigterm_kills_the_run_and_keeps_no_outputs(tmp_path, tmp_path_factory):
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    uri = new_store(tmp_path_factory, project)  # made beforehand: polling never races migrations
    process = start_cli(
        project, "pipeline.train", "dataset=digits", "epochs=200", f"tracking.uri={uri}"
    )
    with reaped(process):
        run = _wait_for_training(uri, process, time.monotonic() + 90)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
    log = (project / "cli.log").read_text()
    assert returncode == 143, log
    assert "interrupted" in log
    [found] = runs(uri)
    assert found.info.run_id == run.info.run_id
    assert found.info.status == "KILLED"
    assert found.info.end_time is not None
    epochs_done = len(history(uri, run.info.run_id, "train_loss"))
    assert 1 <= epochs_done < 200
    assert not (project / "models" / "model.keras").exists()
    assert not (project / "metrics" / "train.json").exists()
    assert not (project / "runs" / "train.json").exists()
    leftovers = [p for p in project.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
