"""End to end with the real tools: `dvc repro`, `dvc metrics/plots show` and `dvc exp run -S` on
a throw-away copy of the project (its own git repository) set to the test-size preset
(conf/debug/fast.yaml: the offline digits dataset, a tiny model, one epoch, two folds).

One copy serves the whole module, in this order: the first `dvc repro` (all five stages), checks
of what it wrote, a second `dvc repro` (nothing to do), an edit of the image grids' code (only
preprocess and report are stale), an epochs change in conf/ (only train, crossval and report
re-run), then `dvc exp run -S epochs=3` (DVC recomposes params.yaml from conf/ and the training
really uses 3 epochs), then the promotion loop (`dvc exp apply`, `python -m pipeline.params
--promote`, commit: up to date). Between the second repro and the epochs change, invalid params
(`-S +epoch=3`, a hand-edited params.yaml) are refused before any output is touched and the
project is put back as it was. Each later step is a module fixture that builds on the earlier
ones, so any single test can also be run alone.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from run_helpers import (
    DVC_STAGES,
    EXPERIMENT,
    REPORT_SECTIONS,
    STAGES,
    DvcProject,
    assert_one_line_error,
    dvc_project,
    read_only,
    run_module,
)

pytestmark = pytest.mark.slow

FIGURES_IN_REPORT = 6  # samples, history, confusion, misclassified, fold curves, fold boxplot


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    """A committed copy of the project set to the test-size preset, after one `dvc repro`."""
    proj = dvc_project(tmp_path_factory.mktemp("dvc-project"))
    assert not (proj.root / "data").exists() and not (proj.root / "dvc.lock").exists()

    proj.python("-m", "pipeline.params")  # the copy's own pipeline package (cwd comes first)
    params = proj.params()
    assert params["dataset"]["name"] == "digits"
    assert (params["epochs"], params["folds"]) == (1, 2)  # what the tests below count on
    proj.python("-m", "pipeline.params", "--check")

    proj.git("init", "-q")
    proj.git("add", "-A")
    proj.git("commit", "-q", "-m", "tiny digits pipeline")
    proj.first_repro = proj.dvc("repro").stdout
    return proj


@pytest.fixture(scope="module")
def second_repro(project: DvcProject) -> str:
    return project.dvc("repro").stdout


@pytest.fixture(scope="module")
def epochs_changed(project: DvcProject, second_repro: str) -> str:
    """conf/ epochs 1 -> 2 (in the preset, which overrides config.yaml), params.yaml
    regenerated, `dvc repro`: its stdout."""
    project.set_conf(r"^epochs: \d+$", "epochs: 2", "debug/fast.yaml")
    project.python("-m", "pipeline.params")
    assert project.params()["epochs"] == 2
    return project.dvc("repro").stdout


@pytest.fixture(scope="module")
def experiment(project: DvcProject, epochs_changed: str) -> str:
    """Commit the epochs-2 baseline, then `dvc exp run -S epochs=3`: its stdout."""
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "epochs 2")
    return project.dvc("exp", "run", "-S", "epochs=3").stdout


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"^Running stage '(\w+)'", stdout, flags=re.M))


def _skipped(stdout: str) -> set[str]:
    return set(re.findall(r"^Stage '(\w+)' didn't change, skipping", stdout, flags=re.M))


# --------------------------------------------------------------------------- first dvc repro


def test_first_repro_runs_every_stage_in_order(project: DvcProject) -> None:
    out = project.first_repro
    positions = [out.index(f"Running stage '{stage}'") for stage in DVC_STAGES]
    assert positions == sorted(positions), "stages ran out of dependency order"
    assert "> python -m pipeline.params --validate" in out
    for stage in STAGES:
        assert f"> python -m pipeline.{stage} --config-dir . --config-name params" in out
    assert not _skipped(out)


def test_outputs_exist(project: DvcProject) -> None:
    root = project.root
    raw = sorted(p.name for p in (root / "data/raw/digits").glob("*.gz"))
    assert raw == sorted(
        [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ]
    )
    for name in (
        "data/prepared/train.npz",
        "data/prepared/test.npz",
        "models/model.keras",
        "metrics/train.json",
        "metrics/crossval.json",
        "plots/train/history.csv",
        "plots/crossval/boxplot.png",
        "runs/train.json",
        "runs/crossval.json",
        "reports/report.html",
        "reports/report.md",
        "dvc.lock",
    ):
        assert (root / name).is_file(), name
        assert (root / name).stat().st_size > 0, name
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    assert set(lock["stages"]) == set(DVC_STAGES)


def test_report_is_complete_and_self_contained(project: DvcProject) -> None:
    page = (project.root / "reports/report.html").read_text(encoding="utf-8")
    headings = re.findall(r"<h2>([^<]*)</h2>", page)
    for section in REPORT_SECTIONS:
        assert any(h.startswith(section) for h in headings), (section, headings)
    run_id = json.loads((project.root / "runs/train.json").read_text("utf-8"))["run_id"]
    assert run_id in page
    assert page.count("data:image/png;base64,") >= FIGURES_IN_REPORT
    assert page.count("<img") == page.count('src="data:image/png;base64,')
    for external in ('src="http', 'src="file', "<link", "<script"):
        assert external not in page
    assert "digits" in page
    markdown = (project.root / "reports/report.md").read_text(encoding="utf-8")
    assert "**Test accuracy" in markdown
    assert "| fold1 |" in markdown and "| fold2 |" in markdown


# --------------------------------------------------------------------------- a read-only project

EROFS = "read-only file system (EROFS)"


def test_a_read_only_project_gives_one_line_for_every_stage_and_command(
    project: DvcProject, tmp_path: Path
) -> None:
    """The whole copy read-only, after the first repro (a read-only bind mount: chmod stops no
    root). Each stage as DVC runs it fails in one line naming EROFS, at Hydra's set-up of its
    run folder (outputs/...) and, with that folder elsewhere, in its own body; so does each
    command that writes (compare's reports, compare's and registry's store writes, params.yaml).
    predict and `runs close-dead` (nothing to close) only read, and still work."""
    image = tmp_path / "digit.png"
    one = np.zeros((28, 28), np.uint8)
    one[6:22, 13:15] = 255  # a "1", light on dark
    Image.fromarray(one).save(image)
    stages = {stage: ("--config-dir", ".", "--config-name", "params") for stage in STAGES}
    failing = {
        **{f"{s} (Hydra set-up)": (f"pipeline.{s}", *args) for s, args in stages.items()},
        **{
            s: (f"pipeline.{s}", *args, f"hydra.run.dir={tmp_path / s}")
            for s, args in stages.items()
        },
        "compare": ("pipeline.compare", "--experiment", EXPERIMENT),
        "compare's log": (
            "pipeline.compare", "--experiment", EXPERIMENT, "--output", str(tmp_path / "c.md")
        ),
        "registry": ("pipeline.registry",),
        "params": ("pipeline.params", "epochs=3"),
    }  # fmt: skip
    working = {
        "predict": ("pipeline.predict", str(image)),
        "runs": ("pipeline.runs", "close-dead"),
    }

    def run(args: tuple[str, ...]):
        return run_module(*args, cwd=project.root, env=project.env)

    commands = {**failing, **working}
    with read_only(project.root), ThreadPoolExecutor(4) as pool:
        done = dict(zip(commands, pool.map(run, commands.values()), strict=True))
    for name in failing:
        line = assert_one_line_error(done[name])
        # sqlite cannot tell a read-only file system from a missing permission: it names both.
        assert EROFS in line, (name, line)
    for name in working:
        assert done[name].returncode == 0, (name, done[name].stderr)
        assert "Traceback" not in done[name].stderr, (name, done[name].stderr)


# --------------------------------------------------------------------------- DVC's views


def test_second_repro_has_nothing_to_do(second_repro: str) -> None:
    assert "Data and pipelines are up to date" in second_repro
    assert not _ran(second_repro)
    assert _skipped(second_repro) == set(DVC_STAGES)


def test_an_unchanged_project_is_up_to_date(project: DvcProject, second_repro: str) -> None:
    """The params check re-runs only when params.yaml (or the schema) changes."""
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."


def test_editing_the_image_grids_stales_only_the_stages_that_draw_them(
    project: DvcProject, second_repro: str
) -> None:
    """pipeline/core/grids.py draws the sample grid (preprocess) and the misclassified gallery
    (report): an edit to it makes those two stale, never the training stages."""
    grids = project.root / "pipeline" / "core" / "grids.py"
    original = grids.read_text(encoding="utf-8")
    grids.write_text(original + "# an edit\n", encoding="utf-8")
    try:
        status = json.loads(project.dvc("status", "--json").stdout)
    finally:
        grids.write_text(original, encoding="utf-8")
    assert set(status) == {"preprocess", "report"}, status
    for stage in ("preprocess", "report"):
        assert {"changed deps": {"pipeline/core/grids.py": "modified"}} in status[stage], status
    assert json.loads(project.dvc("status", "--json").stdout) == {}  # back as it was


def test_metrics_show(project: DvcProject) -> None:
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)
    metrics = shown[""]["data"]
    train = metrics["metrics/train.json"]["data"]
    crossval = metrics["metrics/crossval.json"]["data"]
    assert 0.0 <= train["test_accuracy"] <= 1.0
    assert 0.0 <= crossval["accuracy_mean"] <= 1.0
    assert set(crossval["fold_accuracy"]) == {"fold1", "fold2"}


def test_plots_show(project: DvcProject, tmp_path: Path) -> None:
    out = tmp_path / "dvc_plots"
    project.dvc("plots", "show", "-o", str(out))
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "training history" in index
    assert "confusion matrix" in index
    for image in ("samples.png", "curves.png", "boxplot.png"):
        assert image in index


def test_git_ignores_every_output(project: DvcProject, second_repro: str) -> None:
    """Outputs, the MLflow store (and its lock), Hydra run folders and DVC's cache never show up
    as untracked files: only dvc.lock, which is meant to be committed."""
    status = project.git("status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    untracked = sorted(line[3:] for line in status if line.startswith("??"))
    assert untracked in ([], ["dvc.lock"]), untracked
    ignored = project.git("status", "--porcelain", "--ignored").stdout
    for path in ("data/", "models/", "metrics/", "plots/", "runs/", "reports/", "mlflow.db"):
        assert f"!! {path}" in ignored, path
    assert "!! outputs/" in ignored  # the stages' Hydra run folders


def test_mlflow_runs_of_the_stages_all_finished(project: DvcProject, second_repro: str) -> None:
    runs = project.mlflow_runs()
    stages = [r.data.tags.get("stage") for r in runs]
    assert stages.count("train") >= 1
    assert stages.count("crossval") >= 1
    assert stages.count("crossval-fold") == 2 * stages.count("crossval")
    assert {r.info.status for r in runs} == {"FINISHED"}


# --------------------------------------------------------------------------- invalid params

# What a refused run must leave as it was (DVC would remove a stage's outputs before running it).
KEPT = (
    "models/model.keras",
    "metrics/train.json",
    "metrics/crossval.json",
    "runs/train.json",
    "runs/crossval.json",
    "reports/report.html",
    "data/prepared/train.npz",
)


def _kept(project: DvcProject) -> dict[str, bytes]:
    return {name: (project.root / name).read_bytes() for name in KEPT}


def _experiments(project: DvcProject) -> str:
    return project.dvc("exp", "list", "--all-commits").stdout


def _error_lines(done) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def refused(project: DvcProject, second_repro: str) -> dict:
    """`dvc exp run -S +epoch=3` and `-S +anything=1`, `dvc repro` with `epochs: -1` written into
    params.yaml by hand, and `dvc repro -s train` (past the params check) with it; after each,
    the outputs and experiments as they then were. params.yaml is regenerated after each (DVC
    leaves the refused one in the workspace) and `dvc checkout train` restores what `-s train`
    removed, so the project ends as it began."""
    found: dict = {"before": (_kept(project), _experiments(project))}
    for override in ("+epoch=3", "+anything=1"):
        done = project.fails("dvc", "exp", "run", "-S", override)
        found[override] = (done, _kept(project), _experiments(project))
        project.python("-m", "pipeline.params")
    params = project.root / "params.yaml"
    text = params.read_text(encoding="utf-8")
    params.write_text(re.sub(r"^epochs: \d+$", "epochs: -1", text, flags=re.M), encoding="utf-8")
    done = project.fails("dvc", "repro")
    found["repro"] = (done, _kept(project), _experiments(project))
    done = project.fails("dvc", "repro", "-s", "train")
    found["repro -s train"] = (done, (project.root / "models/model.keras").exists())
    params.write_text(text, encoding="utf-8")
    project.dvc("checkout", "train")
    found["after"] = (_kept(project), project.dvc("status").stdout)
    return found


@pytest.mark.parametrize("override", ["+epoch=3", "+anything=1"])
def test_exp_run_with_an_unknown_key_is_refused_and_records_nothing(
    refused: dict, override: str
) -> None:
    """Every other stage is cached (none lists the new key), yet the params check stops the run
    in one line naming the key, before any output is touched; no experiment is recorded."""
    done, kept, experiments = refused[override]
    [line] = _error_lines(done)
    key = override.removeprefix("+").split("=")[0]
    assert f"'{key}'" in line and "No stage ran and no output was touched" in line, line
    if key == "epoch":
        assert "(did you mean 'epochs'?)" in line, line
    assert "failed to reproduce 'params'" in done.stderr
    assert not _ran(done.stdout) - {"params"}, done.stdout
    assert (kept, experiments) == refused["before"]


def test_an_invalid_params_yaml_under_repro_is_refused_before_any_output_is_removed(
    refused: dict,
) -> None:
    done, kept, experiments = refused["repro"]
    [line] = _error_lines(done)
    assert "epochs=-1 is invalid" in line and "dvc checkout" not in line, line
    assert _ran(done.stdout) == {"params"}, done.stdout
    assert (kept, experiments) == refused["before"]


def test_a_stage_refusal_under_dvc_names_dvc_checkout(refused: dict) -> None:
    """Past the params check (`dvc repro -s train`), DVC removes train's outputs before the stage
    refuses the value: the one line says so and how to get them back, which works."""
    done, model_left = refused["repro -s train"]
    [line] = _error_lines(done)
    assert "epochs=-1 is invalid" in line and "`dvc checkout train` restores them" in line, line
    assert not model_left
    kept, status = refused["after"]
    assert kept == refused["before"][0]
    assert status.strip() == "Data and pipelines are up to date."


# --------------------------------------------------------------------------- changing params


def test_epochs_change_reruns_only_what_depends_on_it(epochs_changed: str) -> None:
    assert _ran(epochs_changed) == {"params", "train", "crossval", "report"}
    assert _skipped(epochs_changed) == {"fetch", "preprocess"}


def test_epochs_change_reaches_the_training(project: DvcProject, epochs_changed: str) -> None:
    used = json.loads((project.root / "runs/train.json").read_text("utf-8"))["config"]
    assert used["epochs"] == 2
    history = (project.root / "plots/train/history.csv").read_text("utf-8").splitlines()
    assert len(history) == 1 + 2  # header + one row per epoch


def test_exp_run_set_param_reaches_training_through_hydra(
    project: DvcProject, experiment: str
) -> None:
    assert "Ran experiment(s)" in experiment
    assert _ran(experiment) == {"params", "train", "crossval", "report"}
    assert _skipped(experiment) == {"fetch", "preprocess"}
    # DVC recomposed params.yaml from conf/ + the override; conf/ itself is unchanged
    assert project.params()["epochs"] == 3
    assert re.search(r"^epochs: 2$", (project.root / "conf/debug/fast.yaml").read_text(), re.M)
    # the stage read it through Hydra and trained with it
    used = json.loads((project.root / "runs/train.json").read_text("utf-8"))["config"]
    assert used["epochs"] == 3
    newest_train = next(r for r in project.mlflow_runs() if r.data.tags.get("stage") == "train")
    assert newest_train.data.params["epochs"] == "3"
    assert newest_train.info.status == "FINISHED"
    assert (
        newest_train.info.run_id
        == json.loads((project.root / "runs/train.json").read_text("utf-8"))["run_id"]
    )
    # and DVC recorded the experiment
    assert project.dvc("exp", "list", "--name-only").stdout.split()


def test_all_mlflow_runs_finished_after_the_experiment(
    project: DvcProject, experiment: str
) -> None:
    runs = project.mlflow_runs()
    trains = [r for r in runs if r.data.tags.get("stage") == "train"]
    assert [r.data.params["epochs"] for r in trains] == ["3", "2", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}


# --------------------------------------------------------------------------- promotion loop


@pytest.fixture(scope="module")
def promoted(project: DvcProject, experiment: str) -> dict:
    """The promotion loop: `dvc exp run -n stratified -S crossval.stratified=true` (a key the
    test-size preset leaves alone, which a preset can therefore set; train comes from DVC's run
    cache), back to the committed baseline, `dvc exp apply stratified`, `--check` (fails naming
    the key), `--promote stratified`, `--check`, commit; then `dvc status` and `dvc repro`."""
    project.dvc("exp", "run", "-n", "stratified", "-S", "crossval.stratified=true")
    metrics = (project.root / "metrics/crossval.json").read_bytes()
    project.git("checkout", "--", "params.yaml", "dvc.lock")
    project.dvc("checkout")
    project.python("-m", "pipeline.params", "--check")  # the baseline agrees with conf/
    project.dvc("exp", "apply", "stratified")
    stale = project.fails(sys.executable, "-m", "pipeline.params", "--check")
    project.python("-m", "pipeline.params", "--promote", "stratified")
    project.python("-m", "pipeline.params", "--check")
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "promote stratified")
    return {
        "stale": stale,
        "metrics": (metrics, (project.root / "metrics/crossval.json").read_bytes()),
        "preset": yaml.safe_load((project.root / "conf/experiment/stratified.yaml").read_text()),
        "status": project.dvc("status").stdout,
        "repro": project.dvc("repro").stdout,
        "git": project.git("status", "--porcelain").stdout,
    }


def test_check_names_the_keys_an_applied_experiment_changed(promoted: dict) -> None:
    [line] = _error_lines(promoted["stale"])
    assert "crossval.stratified=True (conf/: False)" in line and "--promote NAME" in line, line


def test_a_promoted_experiment_is_the_committed_project(promoted: dict) -> None:
    """conf/experiment/stratified.yaml holds the experiment's one change; once committed, the
    project is that experiment: nothing to re-run, its metrics in the workspace."""
    assert promoted["preset"] == {"crossval": {"stratified": True}}
    assert promoted["status"].strip() == "Data and pipelines are up to date."
    assert "Data and pipelines are up to date" in promoted["repro"]
    assert not _ran(promoted["repro"])
    assert promoted["metrics"][0] == promoted["metrics"][1]
    assert promoted["git"] == ""
