"""The MLflow UI, in a real browser: `mlflow server` on 127.0.0.1 over a real sqlite store filled
by a Hydra train sweep and a crossval run, opened in headless Chromium driven by Selenium.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver; .ci/run
installs them); skips without them. Selenium Manager never runs: the driver path is explicit.

`DOCS_SCREENSHOTS=1` trains a little longer (so the numbers look like a result) and writes the
screenshots and crossval figures into docs/img/ for the README; otherwise they stay in tmp.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from run_helpers import (
    EXPERIMENT,
    PROJECT_ROOT,
    assert_png,
    cli_env,
    client,
    free_port,
    isolated_mlflow,
    prepared_digits,
    project_copy,
    run_cli,
    runs,
    sqlite_uri,
)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
_missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
if _missing:
    pytest.skip(
        f"MLflow UI test needs {' and '.join(_missing)} "
        "(Debian: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
pytest.importorskip("selenium", reason="the MLflow UI test needs selenium (the dev extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

DOCS = os.environ.get("DOCS_SCREENSHOTS") == "1"
DOCS_IMG = PROJECT_ROOT / "docs" / "img"
EPOCHS = (10, 20) if DOCS else (1, 2)
WIDTH = 64 if DOCS else 16
FOLDS = 3 if DOCS else 2
WAIT_S = 60  # every wait for the React app is bounded by this
START_S = 180  # the server's start (migrations, workers) on a loaded machine
COLUMNS = ("test_accuracy", "epochs")  # a metric and a param, added to the runs table


def _run_stage(project: Path, *args: str) -> None:
    returncode, log = run_cli(project, *args)
    assert returncode == 0, log


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project whose store holds a 2-job train sweep and a crossval run (parent + folds), and
    a report built from the longer sweep job plus the crossval outputs."""
    project = project_copy(prepared_digits(tmp_path_factory), tmp_path_factory.mktemp("ui"))
    uri = sqlite_uri(project / "mlflow.db")
    common = ("debug=fast", f"width={WIDTH}", f"tracking.uri={uri}")
    epochs = ",".join(map(str, EPOCHS))
    sweep_dir = project / "multirun"
    _run_stage(project, "pipeline.train", "-m", f"epochs={epochs}", *common,
               f"hydra.sweep.dir={sweep_dir}")  # fmt: skip
    train_log = (project / "cli.log").read_text(encoding="utf-8")
    # A crossval sweep of one job, so its runs carry a `sweep` tag to filter on.
    cv_dir = project / "multirun-cv"
    _run_stage(project, "pipeline.crossval", "-m", f"folds={FOLDS}", f"epochs={EPOCHS[-1]}",
               *common, f"hydra.sweep.dir={cv_dir}")  # fmt: skip

    # The report reads the outputs from the project root: take the last train job's.
    for job_dir, names in (
        (sweep_dir / str(len(EPOCHS) - 1), ("metrics", "runs", "plots", "models")),
        (cv_dir / "0", ("metrics", "runs", "plots")),
    ):
        for name in names:
            shutil.copytree(job_dir / name, project / name, dirs_exist_ok=True)
    from pipeline.report import report

    with isolated_mlflow(project):
        html = report(project, project / "reports")

    found = runs(uri)
    train = [r for r in found if r.data.tags.get("stage") == "train"]
    parents = [r for r in found if r.data.tags.get("stage") == "crossval"]
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert len(train) == len(EPOCHS) and len(parents) == 1, [r.info.run_name for r in found]
    folds = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(folds) == FOLDS
    experiment_id = client(uri).get_experiment_by_name(EXPERIMENT).experiment_id
    links = re.findall(r"MLflow run (\S+)", train_log)
    assert len(links) == len(EPOCHS), train_log
    return {"project": project, "uri": uri, "experiment_id": experiment_id, "train": train,
            "crossval": parents[0], "folds": folds, "report": html, "links": links}  # fmt: skip


@pytest.fixture(scope="module")
def server(tracked: dict[str, Any]) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (a free port, one worker) over the store; its base URL."""
    project: Path = tracked["project"]
    port = free_port()
    log = open(project / "server.log", "w", encoding="utf-8")  # noqa: SIM115  # closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracked["uri"],
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=project, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert process.poll() is None, (project / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (project / "server.log").read_text()
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1600,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver) -> WebDriverWait:
    return WebDriverWait(driver, WAIT_S)


def cell(row_id: str, column: str) -> tuple[str, str]:
    """A runs-table cell: ag-grid rows carry the run id, cells the column id."""
    return By.CSS_SELECTOR, f'[role=row][row-id="{row_id}"] [col-id="{column}"]'


def name_link(row_id: str) -> tuple[str, str]:
    """The run-name link in a runs-table row (the cell also holds the run's colour swatch)."""
    by, selector = cell(row_id, "attributes.`Run Name`")
    return by, f"{selector} a"


def open_runs_table(driver: WebDriver, server: str, tracked: dict[str, Any]) -> None:
    """Open the experiment's runs table, close the assistant panel, show COLUMNS."""
    from pipeline.infra.tracking import ui_link

    driver.get(ui_link(server, tracked["experiment_id"]))
    for run in tracked["train"]:
        wait(driver).until(ec.presence_of_element_located(name_link(run.info.run_id)))
    for button in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):
        if button.is_displayed():  # the "MLflow Assistant" side panel
            button.click()
    headers = {e.get_attribute("col-id") for e in driver.find_elements(By.CSS_SELECTOR, "[col-id]")}
    wanted = [c for c in COLUMNS if not ({f"metrics.`{c}`", f"params.`{c}`"} & headers)]
    if wanted:
        driver.find_element(By.CSS_SELECTOR, "[data-testid=column-selection-dropdown]").click()
        for key in wanted:
            item = f"//span[@title='{key}' and contains(@class, 'tree-node-content-wrapper')]"
            wait(driver).until(ec.element_to_be_clickable((By.XPATH, item))).click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)


def screenshot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert_png(path)
    if DOCS:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMG / name)


def test_experiment_page_lists_sweep_runs_with_params_and_metrics(browser, server, tracked):
    open_runs_table(browser, server, tracked)
    for run in tracked["train"]:
        run_id = run.info.run_id
        name = browser.find_element(*name_link(run_id)).text
        assert name == run.info.run_name
        assert name.startswith("train ") and f"epochs={run.data.params['epochs']}" in name
        accuracy = wait(browser).until(
            ec.visibility_of_element_located(cell(run_id, "metrics.`test_accuracy`"))
        )
        assert float(accuracy.text) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
        epochs = browser.find_element(*cell(run_id, "params.`epochs`"))
        assert epochs.text == run.data.params["epochs"]


def test_fold_runs_are_nested_under_the_crossval_run(browser, server, tracked, tmp_path):
    open_runs_table(browser, server, tracked)
    parent_id = tracked["crossval"].info.run_id
    fold_ids = {r.info.run_id for r in tracked["folds"]}
    parent = wait(browser).until(ec.presence_of_element_located(name_link(parent_id)))
    assert parent.text == tracked["crossval"].info.run_name
    row_ids = {
        e.get_attribute("row-id") for e in browser.find_elements(By.CSS_SELECTOR, "[row-id]")
    }
    assert not fold_ids & row_ids, "fold runs should be collapsed under their parent"

    expand = f'[role=row][row-id="{parent_id}"] button[data-component-id*="runnamecellrenderer"]'
    browser.find_element(By.CSS_SELECTOR, expand).click()
    for fold_id in fold_ids:
        wait(browser).until(ec.visibility_of_element_located(name_link(fold_id)))
    # Children sit directly below the parent, and their names are "fold <k>".
    index = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "[role=row][row-id][row-index]"):
        index[row.get_attribute("row-id")] = int(row.get_attribute("row-index"))
    below = {index[parent_id] + k for k in range(1, len(fold_ids) + 1)}
    assert {index[f] for f in fold_ids} == below
    names = {browser.find_element(*name_link(f)).text for f in fold_ids}
    assert names == {f"fold {k}" for k in range(1, FOLDS + 1)}
    wait(browser).until(ec.visibility_of_element_located(cell(parent_id, "params.`epochs`")))
    screenshot(browser, tmp_path, "mlflow-ui.png")


def test_report_renders_in_the_browser(browser, tracked, tmp_path):
    browser.get(Path(tracked["report"]).resolve().as_uri())
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert "Test result" in headings and "Cross-validation" in headings
    images = browser.find_elements(By.TAG_NAME, "img")
    assert images
    loaded = browser.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded, "an image in report.html did not load"
    screenshot(browser, tmp_path, "report.png")
    if DOCS:
        for name in ("boxplot.png", "curves.png"):
            shutil.copyfile(tracked["project"] / "plots" / "crossval" / name, DOCS_IMG / name)


def test_a_new_user_follows_the_printed_link_to_the_run(browser, server, tracked):
    """The link train logs opens the run's page in the model-training view, even in a browser
    whose MLflow setting is the default (GenAI: its traces overview)."""
    from pipeline.infra.tracking import DEFAULT_UI

    browser.get(server)
    browser.execute_script("window.localStorage.clear()")  # a browser that never chose a view
    link = tracked["links"][-1]
    assert link.startswith(DEFAULT_UI) and "workflowType=machine_learning" in link
    browser.get(server + link[len(DEFAULT_UI) :])  # the test's server is not on port 5000
    [run] = [r for r in tracked["train"] if f"/runs/{r.info.run_id}?" in link]
    wait(browser).until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), run.info.run_name))
    assert f"/runs/{run.info.run_id}" in browser.current_url
    assert "workflowType=machine_learning" in browser.current_url
    assert "/overview" not in browser.current_url


def test_a_sweep_filter_keeps_the_folds_under_their_crossval_run(browser, server, tracked):
    sweep = tracked["crossval"].data.tags["sweep"]
    folds = tracked["folds"]
    assert {f.data.tags.get("sweep") for f in folds} == {sweep}
    open_runs_table(browser, server, tracked)
    box = wait(browser).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=search-box] input, "
                                    "input[placeholder*='metrics']"))
    )  # fmt: skip
    box.send_keys(f'tags.sweep = "{sweep}"', Keys.ENTER)
    parent_id = tracked["crossval"].info.run_id
    wait(browser).until(
        ec.invisibility_of_element_located(name_link(tracked["train"][0].info.run_id))
    )
    expand = f'[role=row][row-id="{parent_id}"] button[data-component-id*="runnamecellrenderer"]'
    wait(browser).until(ec.element_to_be_clickable((By.CSS_SELECTOR, expand))).click()
    for fold in folds:
        wait(browser).until(ec.visibility_of_element_located(name_link(fold.info.run_id)))
        shown = wait(browser).until(
            ec.visibility_of_element_located(cell(fold.info.run_id, "params.`epochs`"))
        )
        assert shown.text == str(EPOCHS[-1])
