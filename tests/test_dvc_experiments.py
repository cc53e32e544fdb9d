"""DVC's experiment workflows land every run in the project's own MLflow store, with provenance.

`dvc exp run --temp` and `dvc exp run --queue` + `dvc queue start` run the stages in a temporary
copy of the repository under .dvc/tmp/exps/ that DVC deletes afterwards; the runs must still land
in the project's store (resolved from DVC_ROOT), FINISHED, tagged with the DVC experiment's name
and baseline revision, and `dvc exp apply` then `registry` and `predict --model runs:/...` must
find them. Real DVC in a throw-away git repository on the test-size preset (digits, offline).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from run_helpers import (
    PROJECT_ROOT,
    DvcProject,
    cli_env,
    client,
    dvc_project,
    isolated_mlflow,
    new_store,
    prepared_digits,
    project_copy,
    render,
    run_module,
    settings,
    sqlite_uri,
)

STORE = "mlflow.db"
QUEUE_DEADLINE_S = 900  # a queued experiment: the whole pipeline plus DVC's worker start-up


# --------------------------------------------------------------------------- where the store is


def test_the_project_store_is_resolved_from_dvc_root(tmp_path: Path, monkeypatch) -> None:
    """A stage DVC runs in a temporary copy (DVC_ROOT names the real repository) logs to the
    real repository's mlflow.db, not to one in the copy."""
    from pipeline.infra.tracking import store_uri

    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert store_uri() == sqlite_uri(tmp_path / "repo" / STORE)
    monkeypatch.delenv("DVC_ROOT")
    assert store_uri() == sqlite_uri(copy / STORE)  # no DVC: the working directory


# --------------------------------------------------------------------------- one rule for the store


def test_stages_and_commands_follow_one_rule_for_the_store(tmp_path: Path, monkeypatch) -> None:
    """tracking.uri (or a command's --tracking-uri) if given, else MLFLOW_TRACKING_URI, else the
    project's mlflow.db: a stage (its Config) and a command (no Config) agree in every case."""
    from pipeline.infra.tracking import store_uri, tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = settings("debug=fast")
    assert tracking_uri(default) == store_uri() == sqlite_uri(tmp_path / STORE)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")  # relative: the project's
    assert tracking_uri(default) == store_uri() == sqlite_uri(tmp_path / "team.db")

    mine = sqlite_uri(tmp_path / "mine.db")
    assert tracking_uri(settings("debug=fast", f"tracking.uri={mine}")) == store_uri(mine) == mine
    assert tracking_uri(settings("tracking=server")) == "http://127.0.0.1:5000"


def test_nothing_found_messages_name_the_store(tmp_path_factory, tmp_path: Path) -> None:
    from pipeline.core.comparison import CompareError
    from pipeline.infra.runs import load_runs, open_store, resolve_sweep

    uri, store = open_store(new_store(tmp_path_factory, tmp_path))
    with pytest.raises(CompareError, match=f"no crossval sweep in {re.escape(uri)}"):
        resolve_sweep(store, "latest")
    with pytest.raises(CompareError, match=f"no run in {re.escape(uri)} has that sweep tag"):
        resolve_sweep(store, "multirun/nope")
    with pytest.raises(CompareError, match=f"experiments in {re.escape(uri)}: "):
        load_runs(store, experiment="nope")
    store.create_experiment("empty")
    with pytest.raises(CompareError, match=f"no crossval runs in empty of {re.escape(uri)}"):
        load_runs(store, experiment="empty")


@pytest.mark.slow
def test_an_exported_tracking_uri_is_where_a_stage_logs_and_commands_read(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """With MLFLOW_TRACKING_URI exported, the train stage (default tracking=local) logs there,
    leaves no ./mlflow.db, and registry and compare read the same store."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    uri = new_store(tmp_path_factory, tmp_path / "shared")
    env = {**cli_env(), "MLFLOW_TRACKING_URI": uri}
    trained = run_module("pipeline.train", "debug=fast", cwd=project, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert not (project / STORE).exists(), "the stage logged to the project store, not the variable"
    record = json.loads((project / "runs" / "train.json").read_text(encoding="utf-8"))
    assert record["tracking_uri"] == uri
    [run] = client(uri).search_runs(
        [client(uri).get_experiment_by_name("digits-digits").experiment_id]
    )
    assert run.info.run_id == record["run_id"]

    registered = run_module("pipeline.registry", cwd=project, env=env)
    assert registered.returncode == 0, registered.stderr
    compared = run_module("pipeline.compare", "--sweep", "latest", "--no-log", cwd=project, env=env)
    assert compared.returncode == 1
    assert f"no crossval sweep in {uri}" in compared.stderr


# --------------------------------------------------------------------------- provenance checked

OUTPUT_DIRS = ("models", "metrics", "plots", "runs", "reports")


@pytest.mark.parametrize("stage", ["train", "crossval", "report"])
def test_a_stage_refuses_prepared_data_of_another_dataset(
    stage: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Digits prepared, MNIST configured: one line naming both and the fix, before any output
    is written or any store opened."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    done = run_module(f"pipeline.{stage}", "dataset=mnist", "threads=1", cwd=project)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in done.stderr
    assert "'digits'" in line and "dataset=mnist" in line and "Fix: " in line
    assert "python -m pipeline.preprocess dataset=mnist" in line and "dataset=digits" in line
    assert not [d for d in OUTPUT_DIRS if (project / d).exists()]
    assert not list(project.rglob("mlflow.db*")) and not (project / "mlartifacts").exists()


def test_a_run_records_its_dataset_as_an_mlflow_dataset_input(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The UI's Dataset column: name, digest (of the prepared data's sha256), source."""
    from pipeline.infra.tracking import DIGEST_CHARS, tracked_run

    prepared = prepared_digits(tmp_path_factory)
    sha = json.loads((prepared / "summary.json").read_text(encoding="utf-8"))["sha256"]
    uri = new_store(tmp_path_factory, tmp_path)
    with (
        isolated_mlflow(tmp_path),
        tracked_run(settings("debug=fast", f"tracking.uri={uri}"), "train", sha, prepared) as run,
    ):
        pass
    [found] = client(uri).get_run(run.info.run_id).inputs.dataset_inputs
    assert found.dataset.name == "digits"
    assert found.dataset.digest == sha[:DIGEST_CHARS]
    assert json.loads(found.dataset.source) == {"uri": str(prepared.resolve())}
    assert {t.key: t.value for t in found.tags}["mlflow.data.context"] == "train"


# --------------------------------------------------------------------------- hydra.job.chdir


@pytest.mark.parametrize("sweep", [(), ("-m",)], ids=["run", "sweep"])
def test_hydra_job_chdir_is_refused_up_front(
    sweep: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Hydra's old default (chdir into the run folder) would make every project path relative
    to outputs/...: refused in one line, with no store created anywhere."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path / "project")
    done = run_module("pipeline.train", *sweep, "debug=fast", "hydra.job.chdir=true", cwd=project)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "hydra.job.chdir" in line]
    assert len(errors) == 1 and "Fix: " in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not list(project.rglob("mlflow.db*")) and not list(project.rglob("mlartifacts"))
    assert not [d for d in OUTPUT_DIRS if (project / d).exists()]


# --------------------------------------------------------------------------- what re-runs fetch


@pytest.mark.slow
def test_fetch_depends_on_what_defines_the_data_not_on_where_it_comes_from(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """After `dvc repro fetch`, other mirrors, timeout and retries leave fetch up to date (DVC
    would empty data/raw and download again); another split seed makes it stale."""
    proj = dvc_project(tmp_path_factory.mktemp("dvc-fetch-params"))
    proj.python("-m", "pipeline.params")
    proj.git("init", "-q")
    proj.git("add", "-A")
    proj.git("commit", "-q", "-m", "tiny digits pipeline")
    proj.dvc("repro", "fetch")

    proj.set_conf(
        r"^mirrors: \[\]$",
        "mirrors: [https://mirror.example.invalid/digits/]",
        "dataset/digits.yaml",
    )
    proj.set_conf(r"^timeout: \d+$", "timeout: 5", "dataset/digits.yaml")
    proj.set_conf(r"^retries: \d+$", "retries: 0", "dataset/digits.yaml")
    proj.python("-m", "pipeline.params")
    assert proj.params()["dataset"]["mirrors"] == ["https://mirror.example.invalid/digits/"]
    status = proj.dvc("status", "fetch").stdout
    assert "fetch" not in status, status

    proj.set_conf(r"^split_seed: \d+$", "split_seed: 1", "dataset/digits.yaml")
    proj.python("-m", "pipeline.params")
    status = proj.dvc("status", "fetch").stdout
    assert "fetch:" in status and "dataset.split_seed" in status, status


# --------------------------------------------------------------------------- real DVC experiments

TEMP_EXP, QUEUED = "temp-exp", {"queued-16": "width=16", "queued-24": "width=24"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    """A committed copy of the project on the test-size preset; nothing run yet."""
    proj = dvc_project(tmp_path_factory.mktemp("dvc-experiments"))
    proj.python("-m", "pipeline.params")
    proj.git("init", "-q")
    proj.git("add", "-A")
    proj.git("commit", "-q", "-m", "tiny digits pipeline")
    return proj


def _queue_done(project: DvcProject, names: list[str]) -> bool:
    """True once every named queued experiment has ended (Success or Failed)."""
    status = project.dvc("queue", "status").stdout
    ended = {
        name
        for name in names
        if re.search(rf"^\S+\s+{re.escape(name)}\s.*\b(Success|Failed)\b", status, flags=re.M)
    }
    return ended == set(names)


@pytest.fixture(scope="module")
def experiments(project: DvcProject) -> Iterator[dict[str, str]]:
    """One `dvc exp run --temp`, and two queued experiments run by `dvc queue start -j 2` (two
    workers logging to one store at once); yields {experiment name: baseline rev}. The queue's
    workers are stopped on the way out."""
    baseline = project.git("rev-parse", "HEAD").stdout.strip()
    project.dvc("exp", "run", "--temp", "-n", TEMP_EXP, "-S", "epochs=2")
    for name, override in QUEUED.items():
        project.dvc("exp", "run", "--queue", "-n", name, "-S", override)
    try:
        project.dvc("queue", "start", "-j", "2")
        deadline = time.monotonic() + QUEUE_DEADLINE_S
        while not _queue_done(project, list(QUEUED)):
            assert time.monotonic() < deadline, project.dvc("queue", "status").stdout
            time.sleep(5)
        status = project.dvc("queue", "status").stdout
        for name in QUEUED:
            ok = re.search(rf"^\S+\s+{name}\s.*\bSuccess\b", status, flags=re.M)
            assert ok, f"{status}\n{project.run('dvc', 'queue', 'logs', name).stdout[-4000:]}"
        yield dict.fromkeys([TEMP_EXP, *QUEUED], baseline)
    finally:
        project.run("dvc", "queue", "stop", "--kill", timeout=120)


def _store_runs(project: DvcProject) -> list:
    """Every run in the project's own store, across experiments, oldest first."""
    store = project.root / STORE
    assert store.is_file(), f"no MLflow store at {store}: the runs went elsewhere"
    mlflow_client = client(sqlite_uri(store))
    ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    return mlflow_client.search_runs(ids, order_by=["attribute.start_time ASC"], max_results=1000)


@pytest.mark.slow
def test_temp_and_queued_experiments_log_to_the_project_store(
    project: DvcProject, experiments: dict[str, str]
) -> None:
    found = _store_runs(project)
    for name, baseline in experiments.items():
        mine = [r for r in found if r.data.tags.get("dvc.exp_name") == name]
        stages = sorted(r.data.tags["stage"] for r in mine)
        assert stages == ["crossval", "crossval-fold", "crossval-fold", "train"], (name, stages)
        assert {r.info.status for r in mine} == {"FINISHED"}, name
        assert {r.data.tags["dvc.baseline_rev"] for r in mine} == {baseline}
        assert {r.data.tags.get("git_commit") for r in mine if "git_commit" in r.data.tags} <= {
            baseline
        }
        [train] = [r for r in mine if r.data.tags["stage"] == "train"]
        assert [d.dataset.name for d in train.inputs.dataset_inputs] == ["digits"]
        # Named after the experiment, not all "train" / "crossval".
        assert train.info.run_name == f"train {name}"
    assert not list((project.root / ".dvc" / "tmp").rglob(STORE)), "a store left in a temp copy"


def _readme_exp_show() -> list[str]:
    """The compact `dvc exp show` command the README's experiment loop gives."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    [line] = [x for x in readme.splitlines() if x.startswith("dvc exp show --only-changed")]
    return shlex.split(line.split("  #")[0])


@pytest.mark.slow
def test_exp_show_fits_120_columns_with_the_knobs_and_accuracies(
    project: DvcProject, experiments: dict[str, str]
) -> None:
    """The README's `dvc exp show` in a 120-column terminal: every experiment, the knobs they
    vary (epochs, width) and the accuracies, nothing cut off; and what defines no result
    (timing, where runs are logged, threads, mirrors) is no column of `--param-deps`."""
    env = {**project.env, "COLUMNS": "120"}
    shown = project.run(*_readme_exp_show(), "--no-pager", env=env).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120, shown
    assert "…" not in shown, f"a column was cut off:\n{shown}"
    header = next(x.split() for x in lines if "Experiment" in x)
    assert header == ["Experiment", "test_accuracy", "accuracy_mean", "accuracy_std", "epochs",
                      "width"], shown  # fmt: skip
    assert all(any(name in x for x in lines) for name in experiments), shown

    # The baseline commit has no dvc.lock, so DVC shows all of its params.yaml; an experiment
    # shows its DVC params only.
    every = project.run("dvc", "exp", "show", "--param-deps", "--csv", env=env).stdout
    rows = [r for r in csv.DictReader(io.StringIO(every)) if r["Experiment"] in experiments]
    assert len(rows) == len(experiments), every
    assert {"test_accuracy", "accuracy_mean", "epochs", "batch_size", "folds", "width"} <= set(
        rows[0]
    )
    assert not {"fit_seconds", "seconds_per_epoch"} & set(rows[0])
    for row in rows:
        assert row["test_accuracy"] not in ("", "!") and row["epochs"] != "", row
    # The params stage tracks all of params.yaml, so plumbing keys are DVC params too: the
    # README's view drops them by name (its header, checked above, has none of them).


@pytest.mark.slow
def test_applied_experiment_registers_and_predicts_from_the_project_store(
    project: DvcProject, experiments: dict[str, str]
) -> None:
    project.dvc("exp", "apply", TEMP_EXP)
    record = json.loads((project.root / "runs" / "train.json").read_text(encoding="utf-8"))
    assert record["tracking_uri"] == sqlite_uri(project.root / STORE)
    [run] = [r for r in _store_runs(project) if r.info.run_id == record["run_id"]]
    assert run.data.tags["dvc.exp_name"] == TEMP_EXP
    assert run.data.params["epochs"] == "2"  # the experiment's own -S value

    registered = project.python("-m", "pipeline.registry").stdout
    assert f"registered runs:/{record['run_id']}/model as digit-classifier" in registered
    # The version says how good the model is, cross-validated too (the experiment's crossval
    # run: same data and params).
    registry_client = client(sqlite_uri(project.root / STORE))
    version = registry_client.get_model_version_by_alias("digit-classifier", "champion")
    [crossval] = [
        r for r in _store_runs(project)
        if r.data.tags.get("stage") == "crossval" and r.data.tags.get("dvc.exp_name") == TEMP_EXP
    ]  # fmt: skip
    assert version.tags["cv_accuracy_mean"] == f"{crossval.data.metrics['accuracy_mean']:.4f}"
    assert "cross-validated" in version.description

    from pipeline.core.data import load_split

    test = load_split(project.root / "data" / "prepared" / "test.npz")
    image = render(test.images[0], "dark-on-light.png", project.root / "digit.png")
    done = project.python(
        "-m", "pipeline.predict", "--model", f"runs:/{record['run_id']}/model", str(image), "--json"
    )
    [answer] = json.loads(done.stdout)
    assert 0 <= answer["digit"] <= 9 and np.isclose(sum(answer["probabilities"]), 1, atol=1e-3)
