"""A real Hydra sweep of the train stage (`python -m pipeline.train -m ...`): one MLflow run per
job in a real sqlite store, grouped by a shared `sweep` tag, each job writing its own outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from run_helpers import (
    finished_runs_by_job,
    history,
    prepared_digits,
    project_copy,
    run_cli,
    runs,
    sqlite_uri,
)

EPOCHS = (1, 2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("sweep"))
    uri = sqlite_uri(project / "mlflow.db")  # the first job creates the store
    sweep_dir = project / "multirun"
    returncode, log = run_cli(
        project,
        "pipeline.train",
        "-m",
        f"epochs={','.join(map(str, EPOCHS))}",
        "debug=fast",
        "width=16",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert returncode == 0, log
    found = runs(uri)
    return {"project": project, "uri": uri, "dir": sweep_dir, "runs": found, "log": log}


def by_job(sweep: dict[str, Any]) -> dict[int, Any]:
    return finished_runs_by_job(sweep["runs"], len(EPOCHS), sweep["log"])


def test_one_finished_run_per_job(sweep):
    by_job(sweep)  # finished_runs_by_job asserts it


def test_run_names_lead_with_what_the_sweep_varies(sweep):
    """The overrides every job shares (debug=fast width=16 tracking.uri=...) would push the
    varying part out of the runs table's name column and the chart legends."""
    names = {run.info.run_name for run in sweep["runs"]}
    assert names == {f"train epochs={epochs}" for epochs in EPOCHS}


def test_each_jobs_log_lines_say_which_job_and_config_they_belong_to(sweep):
    """Parallel jobs (hydra/launcher=joblib) print to one terminal, interleaved."""
    for job, epochs in enumerate(EPOCHS):
        assert re.search(rf"\[job {job} epochs={epochs}\] test accuracy [0-9.]+", sweep["log"])
    # Hydra's own line launching job 1 runs after job 0 ended: no job's label.
    assert re.search(r"\[HYDRA\]\s+#1 : epochs=2", sweep["log"]), sweep["log"]


def test_runs_share_one_sweep_tag(sweep):
    tags = {r.data.tags.get("sweep") for r in sweep["runs"]}
    assert tags == {str(sweep["dir"])}


def test_each_run_trained_with_its_own_epochs(sweep):
    for job, run in by_job(sweep).items():
        epochs = EPOCHS[job]
        assert run.data.params["epochs"] == str(epochs)
        assert run.data.params["width"] == "16"
        assert f"epochs={epochs}" in run.data.tags["hydra_overrides"].split()
        steps = [step for step, _ in history(sweep["uri"], run.info.run_id, "train_loss")]
        assert steps == list(range(1, epochs + 1))


def test_each_job_writes_its_outputs_into_its_own_folder(sweep):
    project: Path = sweep["project"]
    for job, run in by_job(sweep).items():
        job_dir = sweep["dir"] / str(job)
        metrics = json.loads((job_dir / "metrics" / "train.json").read_text())
        assert metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
        assert (job_dir / "models" / "model.keras").is_file()
        record = json.loads((job_dir / "runs" / "train.json").read_text())
        assert record["run_id"] == run.info.run_id
        assert record["config"]["epochs"] == EPOCHS[job]
    for name in ("metrics", "models", "runs", "plots"):
        assert not (project / name).exists(), f"a sweep job wrote into the project's {name}/"
