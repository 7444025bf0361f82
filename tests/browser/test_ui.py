"""What a user sees, in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
log in to Airflow and find both DAGs and a successful optimize_model run; open MLflow as the reviewer
and find the registered model with its `champion` alias. Screenshots go to test-artifacts/browser/.

Runs in `make test-slow` (it starts the whole stack and trains a tiny model through the scheduler,
about four minutes here); `make browser-deps` installs the browser.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from tests.stack_env import stack_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO_ROOT = Path(__file__).resolve().parents[2]
SHOTS = REPO_ROOT / "test-artifacts" / "browser"
RUN_ID = "browser_test_run"
RECONCILE_INTERVAL_S = 5.0


def run_conf(tiny_model, labelled_csv, **extra) -> dict:
    return {"data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0, "learning_rate": 5e-3,
            "max_length": 32, "student_layers": 1, "distill_epochs": 3.0, **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model, labelled_csv):
    """The local stack with a champion promoted by a real optimize_model run through the scheduler."""
    from opsctl.airflow_api import AirflowApi
    from opsctl.services import LocalStack
    from opsctl.settings import StackSettings

    home = tmp_path_factory.mktemp("browser-stack")
    env = stack_env(home, {"PIPELINE_RECONCILE_INTERVAL_S": str(RECONCILE_INTERVAL_S)})
    # The waiting approval task checks the registry every 5 s here (60 s by default).
    local = LocalStack(StackSettings.from_env(env), inherited_env=dict(os.environ, PIPELINE_APPROVAL_CHECK_S="5"))
    local.up(progress=lambda _: None)
    try:
        api = AirflowApi(local.settings.airflow_url, "admin", local.airflow_admin_password())
        for dag_id in ("optimize_model", "monitor_serving"):
            api.wait_for_dag(dag_id)
        api.unpause("optimize_model")
        api.trigger("optimize_model", run_conf(tiny_model, labelled_csv), run_id=RUN_ID)
        deadline = time.monotonic() + 900
        while api.run_state("optimize_model", RUN_ID) not in ("success", "failed") and time.monotonic() < deadline:
            time.sleep(3)
        assert api.run_state("optimize_model", RUN_ID) == "success", api.task_states("optimize_model", RUN_ID)
        yield local
    finally:
        local.down(progress=lambda _: None)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "headless Chromium is missing: `make browser-deps` installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield chrome
    chrome.quit()


def _wait_for_text(browser, *texts: str, timeout_s: float = 60.0) -> str:
    """Wait until the rendered page shows every text (the UIs are single-page apps)."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = browser.execute_script("return document.body ? document.body.innerText : ''") or ""
        if all(text in body for text in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"page {browser.current_url} never showed {texts}; it showed:\n{body[:2000]}")


def _shot(browser, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def _log_in_to_airflow(browser, url: str, password: str) -> None:
    """The simple auth manager's sign-in form, as a user fills it in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{url}/")
    _wait_for_text(browser, "Sign into Airflow")
    _shot(browser, "airflow-login")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(password, Keys.ENTER)
    deadline = time.monotonic() + 60
    while "/auth/login" in browser.current_url:
        assert time.monotonic() < deadline, "the Airflow sign-in did not succeed"
        time.sleep(0.5)


def test_airflow_shows_both_dags_and_the_successful_run(stack, browser):
    settings = stack.settings
    _log_in_to_airflow(browser, settings.airflow_url, stack.airflow_admin_password())
    browser.get(f"{settings.airflow_url}/dags")
    _wait_for_text(browser, "optimize_model", "monitor_serving")
    _shot(browser, "airflow-dags")
    browser.get(f"{settings.airflow_url}/dags/optimize_model/runs/{RUN_ID}")
    page = _wait_for_text(browser, RUN_ID, "Success", "promote", "Task Instances")
    assert "Failed" not in page
    _shot(browser, "airflow-optimize-model-run")


def _sign_in_to_mlflow_as_reviewer(browser, stack) -> None:
    """MLflow runs with authentication: the browser signs in as the reviewer (HTTP basic auth on every
    request, as the browser's own prompt would send it)."""
    import base64

    token = base64.b64encode(f"reviewer:{stack.mlflow_password('reviewer')}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def test_mlflow_shows_the_registered_model_with_the_champion_alias(stack, browser):
    settings = stack.settings
    _sign_in_to_mlflow_as_reviewer(browser, stack)
    browser.get(f"{settings.mlflow_url}/#/models/text-classifier")
    page = _wait_for_text(browser, "text-classifier", "champion", "Version 1")
    assert "candidate" in page  # the version's lineage tags are on the page
    _shot(browser, "mlflow-registered-model")


def _set_alias_in_the_ui(browser, mlflow_url: str, model: str, version: str, alias: str = "champion") -> None:
    """What a reviewer does: the version's page, Aliases > Add, type the alias, Save aliases."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    browser.get(f"{mlflow_url}/#/models/{model}/versions/{version}")
    _wait_for_text(browser, f"Version {version}", "Aliases")
    # MLflow 3's alias editor: "Add" on a version without aliases (_29), the pencil "Edit aliases" on one
    # that has some (_37; the challenger has its alias, the version before has previous_champion).
    editor = ("[data-component-id$='modelversionviewaliaseditor.tsx_29'], "
              "[data-component-id$='modelversionviewaliaseditor.tsx_37']")
    WebDriverWait(browser, 30).until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, editor))).click()
    dialog = browser.find_element(By.CSS_SELECTOR, "[role=dialog]")
    box = dialog.find_element(By.CSS_SELECTOR, "input[role=combobox]")
    box.send_keys(alias)
    time.sleep(0.5)
    box.send_keys(Keys.ENTER)
    _wait_for_text(browser, f"Add/Edit alias for model version {version}")
    _shot(browser, f"mlflow-set-{alias}-on-v{version}")
    dialog.find_element(By.CSS_SELECTOR, "[data-component-id='mlflow.edit-aliases-modal.save-button']").click()


def _served_registered_version(triton, repository: Path, served: str) -> str | None:
    """The MLflow version whose files Triton's newest ready version holds."""
    from serving import model_repository as repo

    ready = triton.ready_versions(served)
    found = repo.registered_version(repository, served, ready[-1]) if ready else None
    return found[1] if found else None


def _until(condition, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held (AssertionError naming ``what`` after ``timeout_s``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_a_reviewer_approves_in_the_mlflow_ui_and_moves_the_alias_back(stack, browser, tiny_model, labelled_csv,
                                                                       monkeypatch):
    """approval=manual: the run waits (deferred) with the winner as 'challenger'; pointing 'champion' at it in
    the MLflow UI serves it within the reconcile interval with no failed request, and the run ends approved;
    pointing 'champion' back at the version before serves that one again."""
    from opsctl.airflow_api import AirflowApi
    from serving.triton_client import TritonClient
    from tasks import model_aliases
    from tests.integration.test_registry_and_promotion import RequestStream

    settings, model, served = stack.settings, "text-classifier", "text_classifier"
    # This process reads the registry as the pipeline account (anonymous requests are refused).
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.mlflow_password("pipeline"))
    api = AirflowApi(settings.airflow_url, "admin", stack.airflow_admin_password())
    before = model_aliases.alias_version(settings.mlflow_url, model, "champion")
    run_id = "browser_approval_run"
    api.trigger("optimize_model", run_conf(tiny_model, labelled_csv, approval="manual", force_retrain=True),
                run_id=run_id)
    # promote_winner makes the winner the challenger; await_approval starts after it and defers.
    _until(lambda: api.task_states("optimize_model", run_id).get("await_approval") == "deferred"
           or api.run_state("optimize_model", run_id) in ("success", "failed"), 900, "await_approval deferred")
    assert api.task_states("optimize_model", run_id)["await_approval"] == "deferred"
    challenger = model_aliases.alias_version(settings.mlflow_url, model, "challenger")
    assert challenger and challenger != before, api.task_states("optimize_model", run_id)
    triton = TritonClient(settings.triton_http_url)
    assert _served_registered_version(triton, settings.triton_model_repository, served) == before

    _sign_in_to_mlflow_as_reviewer(browser, stack)
    with RequestStream(settings.triton_http_url, served) as approving:
        _set_alias_in_the_ui(browser, settings.mlflow_url, model, challenger)
        took = _until(lambda: _served_registered_version(triton, settings.triton_model_repository, served)
                      == challenger, 120, f"Triton serving the approved v{challenger}")
    print(f"approved v{challenger} served {took:.1f} s after Save (reconcile interval {RECONCILE_INTERVAL_S:g} s)")
    assert approving.failures == [] and approving.sent > 10
    _until(lambda: api.run_state("optimize_model", run_id) in ("success", "failed"), 180, "the run's end")
    assert api.run_state("optimize_model", run_id) == "success", api.task_states("optimize_model", run_id)
    tags = model_aliases.version_tags(settings.mlflow_url, model, challenger)
    assert tags["approval"].startswith("approved"), tags
    assert model_aliases.alias_version(settings.mlflow_url, model, "challenger") is None

    with RequestStream(settings.triton_http_url, served) as going_back:
        _set_alias_in_the_ui(browser, settings.mlflow_url, model, before)
        _until(lambda: _served_registered_version(triton, settings.triton_model_repository, served) == before,
               120, f"Triton serving v{before} again")
    assert going_back.failures == [] and going_back.sent > 10
    assert model_aliases.alias_version(settings.mlflow_url, model, "previous_champion") == challenger
    _shot(browser, "mlflow-champion-moved-back")
