"""The page at ``/`` in headless Chromium (Debian's ``chromium``), served by real ``python -m app``.

Screenshots go to ``tests/artifacts/`` (not committed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.helpers.repository import NAME, add_version
from tests.helpers.server import ROOT, Server, run_server

EXAMPLES = sorted((ROOT / "examples").glob("digit-*.png"))
ARTIFACTS = ROOT / "tests" / "artifacts"
WAIT_S = 60


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    reason = "needs Debian's chromium and chromium-driver (apt-get install both)"
    if os.environ.get("CI"):
        pytest.fail(reason)  # .ci/run installs them: missing there is a broken CI script
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1100")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _until(browser: WebDriver, condition: object) -> object:
    # The live panel redraws its rows every second: a row read as it is replaced is stale, and
    # the condition is simply asked again.
    wait = WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda _: condition())  # type: ignore[operator]


def _cards(browser: WebDriver, state: str) -> dict[str | None, object]:
    cards = browser.find_elements(By.CSS_SELECTOR, f"#results .card.{state}")
    return {card.get_attribute("data-filename"): card for card in cards}


def test_uploads_show_the_servers_top1_and_errors_in_plain_words(
    browser: WebDriver, server: Server, tmp_path: Path
) -> None:
    assert len(EXAMPLES) == 10
    browser.get(f"{server.url}/")
    _until(browser, lambda: "tiny-test" in browser.find_element(By.ID, "model-card").text)

    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in EXAMPLES))
    _until(browser, lambda: len(_cards(browser, "ok")) == len(EXAMPLES))
    shown = {
        name: card.get_attribute("data-top1")  # type: ignore[attr-defined]
        for name, card in _cards(browser, "ok").items()
    }
    for path in EXAMPLES:
        files = {"file": (path.name, path.read_bytes(), "image/png")}
        answer = httpx.post(f"{server.url}/predict", files=files, timeout=30).json()
        assert shown[path.name] == answer["results"][0]["predictions"][0]["label"], path.name

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    browser.find_element(By.ID, "files").send_keys(str(text_file))
    _until(browser, lambda: "notes.txt" in _cards(browser, "error"))
    error = _cards(browser, "error")["notes.txt"]
    assert error.get_attribute("data-error") == "unsupported_media_type"  # type: ignore[attr-defined]
    assert "not an image the service reads" in error.text  # type: ignore[attr-defined]
    assert "HTTP 415" in error.text  # type: ignore[attr-defined]

    # The live panel reads /metrics: batches counted, and the latest /predict calls (the
    # 415 above among them) inside its 10 s window.
    def batches_counted() -> int:
        rows = browser.find_elements(By.CSS_SELECTOR, "#live-batches .value")
        return sum(int(row.text) for row in rows)

    _until(browser, lambda: batches_counted() >= 1)
    _until(browser, lambda: browser.find_element(By.ID, "live-p50").text.endswith("ms"))
    float(browser.find_element(By.ID, "live-throughput").text)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page.png"))


def test_swagger_ui_renders_with_no_network(browser: WebDriver, server: Server) -> None:
    browser.get(f"{server.url}/docs")
    _until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    assert "/predict" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs.png"))


def test_the_picked_model_version_classifies(browser: WebDriver, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    for version in (1, 2):
        add_version(repository, version)
    with run_server(None, model_repository=str(repository), version_policy="all") as served:
        served.wait_for_log(
            lambda entry: entry.get("message") == "serving" and entry.get("version") == "2"
        )
        browser.get(f"{served.url}/")
        picker = Select(browser.find_element(By.ID, "model-choice"))
        _until(browser, lambda: len(picker.options) == 3)  # the default, and each version
        picker.select_by_value(f"{NAME}@1")
        _until(browser, lambda: "build-1" in browser.find_element(By.ID, "model-card").text)
        browser.find_element(By.ID, "files").send_keys(str(EXAMPLES[0]))
        _until(browser, lambda: _cards(browser, "ok"))
        (card,) = _cards(browser, "ok").values()
        assert str(card.get_attribute("data-top1")).endswith("@v1")  # type: ignore[attr-defined]
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page-versions.png"))
