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
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.helpers.image_site import PNG
from tests.helpers.metrics import scrape, status_counts
from tests.helpers.models import LABELS, build_model
from tests.helpers.repository import NAME, add_version
from tests.helpers.server import ROOT, Server, message_is, run_server

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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # _script_errors reads it
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


def _drop(browser: WebDriver, *paths: Path) -> None:
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))


def _script_errors(browser: WebDriver) -> list[dict[str, object]]:
    """The console's errors since the last call, but for refused requests (logged under
    "network"): an uncaught exception or promise rejection is one."""
    entries = browser.get_log("browser")  # type: ignore[attr-defined]  # Chrome's own
    return [e for e in entries if e["level"] == "SEVERE" and e["source"] != "network"]


def _similar(card: WebElement) -> list[tuple[str | None, str]]:
    items = card.find_elements(By.CSS_SELECTOR, ".similar li")
    return [
        (item.get_attribute("data-filename"), item.find_element(By.CLASS_NAME, "value").text)
        for item in items
    ]


def _nearest(url: str, paths: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """Each file's other files by cosine similarity, best first, from /embed."""
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    results = httpx.post(f"{url}/embed", files=files, timeout=30).json()["results"]
    vectors = {r["filename"]: r["embedding"] for r in results}
    nearest = {}
    for name, mine in vectors.items():
        others = [
            (other, sum(a * b for a, b in zip(mine, theirs, strict=True)))
            for other, theirs in vectors.items()
            if other != name
        ]
        others.sort(key=lambda pair: -pair[1])
        nearest[name] = [(other, f"{similarity:.2f}") for other, similarity in others[:3]]
    return nearest


def _all_list(browser: WebDriver, cards: int, similar: int) -> bool:
    shown = _cards(browser, "ok").values()
    return len(shown) == cards and all(len(_similar(c)) == similar for c in shown)  # type: ignore[arg-type]


def _requests(url: str) -> dict[str, float]:
    return {
        path: sum(status_counts(scrape(url), path).values()) for path in ("/predict", "/explain")
    }


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


def test_the_model_card_shows_the_rollout(browser: WebDriver, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    add_version(repository, 1, labels=LABELS)
    with run_server(None, model_repository=str(repository)) as served:
        served.wait_for_log(message_is("serving"))
        add_version(repository, 2, labels=LABELS)
        plan = {"candidate": "2", "mode": "canary", "percent": 50}
        url = f"{served.url}/v2/repository/models/{NAME}/rollout"
        assert httpx.put(url, json=plan, timeout=60).status_code == 200
        browser.get(f"{served.url}/")
        card = browser.find_element(By.ID, "model-card")
        _until(browser, lambda: "canary of version 2 (50%) against 1: running" in card.text)


def test_with_several_models_and_no_default_the_page_picks_one(
    browser: WebDriver, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    for model in (NAME, "letters"):
        add_version(repository, 1, model=model)
    with run_server(None, model_repository=str(repository)) as served:
        served.wait_for_log(message_is("ready"))
        browser.get(f"{served.url}/")
        picker = Select(browser.find_element(By.ID, "model-choice"))
        _until(browser, lambda: len(picker.options) == 3)
        _until(browser, lambda: "build-1" in browser.find_element(By.ID, "model-card").text)
        chosen = picker.first_selected_option.get_attribute("value")
        unnamed = picker.options[0]
        browser.find_element(By.ID, "files").send_keys(str(EXAMPLES[0]))
        _until(browser, lambda: _cards(browser, "ok"))
    assert chosen == f"{NAME}@1"  # the first listed: a request that names none would be refused
    assert unnamed.get_attribute("disabled") is not None
    assert not _script_errors(browser)


def test_heatmaps_lie_over_each_image_and_each_lists_its_most_similar(
    browser: WebDriver, server: Server
) -> None:
    browser.get(f"{server.url}/")
    _until(browser, lambda: "tiny-test" in browser.find_element(By.ID, "model-card").text)
    _script_errors(browser)
    first, second, third, fourth = EXAMPLES[:4]

    _drop(browser, first, second)
    _until(browser, lambda: _all_list(browser, 2, 1))
    cards = _cards(browser, "ok")
    assert _similar(cards[first.name])[0][0] == second.name  # type: ignore[arg-type]
    assert _similar(cards[second.name])[0][0] == first.name  # type: ignore[arg-type]

    # Recomputed as images come: each lists the other two, nearest first, as /embed ranks them.
    _drop(browser, third)
    _until(browser, lambda: _all_list(browser, 3, 2))
    nearest = _nearest(server.url, [first, second, third])
    for name, card in _cards(browser, "ok").items():
        assert _similar(card) == nearest[str(name)], name  # type: ignore[arg-type]

    toggle = browser.find_element(By.ID, "heatmap")
    toggle.click()

    def overlays() -> dict[str | None, WebElement]:
        return {
            name: card.find_element(By.CSS_SELECTOR, ".thumb .heatmap")  # type: ignore[attr-defined]
            for name, card in _cards(browser, "ok").items()
            if card.find_elements(By.CSS_SELECTOR, ".thumb .heatmap")  # type: ignore[attr-defined]
        }

    _until(browser, lambda: len(overlays()) == 3)
    for name, overlay in overlays().items():
        path = ROOT / "examples" / str(name)
        files = {"files": (path.name, path.read_bytes(), "image/png")}
        heatmap = httpx.post(f"{server.url}/explain", files=files, timeout=30).json()["results"][0]
        assert overlay.get_attribute("src") == f"data:image/png;base64,{heatmap['heatmap']['png']}"
        card = _cards(browser, "ok")[name]
        image = card.find_element(By.CSS_SELECTOR, ".thumb img:not(.heatmap)")  # type: ignore[attr-defined]
        assert overlay.rect == image.rect
        caption = card.find_element(By.CLASS_NAME, "heatmap-of")  # type: ignore[attr-defined]
        assert caption.is_displayed()
        assert caption.text == f"heatmap of {heatmap['heatmap']['label']}"
        assert card.get_attribute("data-top1") in card.find_element(By.CLASS_NAME, "meta").text  # type: ignore[attr-defined]

    slider = browser.find_element(By.ID, "heatmap-opacity")
    slider.send_keys(Keys.HOME)
    assert {o.value_of_css_property("opacity") for o in overlays().values()} == {"0"}
    assert browser.find_element(By.ID, "heatmap-opacity-value").text == "0%"
    slider.send_keys(Keys.END)
    assert {o.value_of_css_property("opacity") for o in overlays().values()} == {"1"}

    # With heatmaps on, /explain answers in place of /predict.
    before = _requests(server.url)
    _drop(browser, fourth)
    _until(browser, lambda: len(overlays()) == 4)
    _until(browser, lambda: _all_list(browser, 4, 3))
    after = _requests(server.url)
    assert {path: after[path] - before[path] for path in after} == {"/predict": 0, "/explain": 1}
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-heatmaps.png"))

    toggle.click()
    assert not any(o.is_displayed() for o in overlays().values())
    assert _script_errors(browser) == []


def test_a_model_without_heatmaps_or_embeddings_still_classifies(
    browser: WebDriver, tmp_path: Path
) -> None:
    old = build_model(tmp_path / "old.onnx", extras=False)
    with run_server(old) as served:
        served.wait_for_log(message_is("ready"))
        browser.get(f"{served.url}/")
        _until(browser, lambda: "tiny-test" in browser.find_element(By.ID, "model-card").text)
        _script_errors(browser)
        notes = browser.find_element(By.ID, "model-notes")

        _drop(browser, EXAMPLES[0])  # heatmaps off: /predict, then /embed refused
        _until(browser, lambda: "no embeddings" in notes.text)
        browser.find_element(By.ID, "heatmap").click()  # the card's /explain refused
        _until(browser, lambda: "no heatmaps" in notes.text)
        _drop(browser, EXAMPLES[1])  # heatmaps on: known missing, so /predict
        _until(browser, lambda: len(_cards(browser, "ok")) == 2)

        for name, card in _cards(browser, "ok").items():
            files = {"files": (str(name), (ROOT / "examples" / str(name)).read_bytes())}
            answer = httpx.post(f"{served.url}/predict", files=files, timeout=30).json()
            top1 = answer["results"][0]["predictions"][0]["label"]
            assert card.get_attribute("data-top1") == top1  # type: ignore[attr-defined]
            assert not card.find_elements(By.CSS_SELECTOR, ".heatmap, .similar, .detail")  # type: ignore[attr-defined]
        assert notes.text == (
            "This model has no heatmaps: its file was exported before them. "
            "This model has no embeddings, so similar images are not shown."
        )
        assert not _cards(browser, "error")
        # Asked once, for the first card: the second, dropped with heatmaps on, went to /predict.
        assert status_counts(scrape(served.url), "/explain") == {"400": 1}
        assert _script_errors(browser) == []
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page-no-extras.png"))


def _paste(browser: WebDriver, url: str) -> None:
    field = browser.find_element(By.ID, "image-url")
    field.send_keys(url)
    field.send_keys(Keys.ENTER)


def _each(browser: WebDriver, state: str, name: str) -> list[WebElement]:
    """Every card of ``state`` for ``name``, newest first (the same URL may be sent again)."""
    cards = browser.find_elements(By.CSS_SELECTOR, f"#results .card.{state}")
    return [card for card in cards if card.get_attribute("data-filename") == name]


def test_without_url_allow_the_page_offers_no_url_field(browser: WebDriver, server: Server) -> None:
    browser.get(f"{server.url}/")
    _until(browser, lambda: "tiny-test" in browser.find_element(By.ID, "model-card").text)
    assert not browser.find_element(By.ID, "url-form").is_displayed()


def test_an_image_by_url_classifies_and_a_cached_answer_says_so(
    browser: WebDriver, model_path: Path, images: str, tmp_path: Path
) -> None:
    settings = {"url_allow": '["127.0.0.1"]', "cache_bytes": "1000000"}
    with run_server(model_path, **settings) as served:
        served.wait_for_log(message_is("ready"))
        browser.get(f"{served.url}/")
        _until(browser, lambda: browser.find_element(By.ID, "url-form").is_displayed())
        _until(browser, lambda: "tiny-test" in browser.find_element(By.ID, "model-card").text)
        _script_errors(browser)

        digit = f"{images}/digit.png"
        _paste(browser, digit)
        _until(browser, lambda: len(_each(browser, "ok", digit)) == 1)
        _paste(browser, digit)  # the same image again: answered from the cache
        _until(browser, lambda: len(_each(browser, "ok", digit)) == 2)
        again, first = _each(browser, "ok", digit)
        upload = tmp_path / "digit.png"  # the same bytes as a file: the same answer, cached
        upload.write_bytes(PNG)
        _drop(browser, upload)
        _until(browser, lambda: "digit.png" in _cards(browser, "ok"))
        uploaded = _cards(browser, "ok")["digit.png"]

        files = {"files": ("digit.png", PNG, "image/png")}
        answer = httpx.post(f"{served.url}/predict", files=files, timeout=30).json()
        top1 = answer["results"][0]["predictions"][0]["label"]
        for card in (first, again, uploaded):
            assert card.get_attribute("data-top1") == top1  # type: ignore[attr-defined]
        assert first.get_attribute("data-cache") is None
        assert not first.find_elements(By.CLASS_NAME, "badge")
        for card in (again, uploaded):
            assert card.get_attribute("data-cache") == "hit"  # type: ignore[attr-defined]
            badge = card.find_element(By.CLASS_NAME, "badge")  # type: ignore[attr-defined]
            assert (badge.text, badge.is_displayed()) == ("cached", True)

        # Refused URLs read as any refused file: the status, the plain words, the code.
        port = images.rsplit(":", 1)[1]
        refusals = {
            f"http://localhost:{port}/digit.png": ("403", "url_not_allowed", "does not fetch"),
            f"{images}/gone.png": ("422", "url_fetch_failed", "could not fetch an image"),
        }
        for url in refusals:
            _paste(browser, url)
        _until(browser, lambda: all(_each(browser, "error", url) for url in refusals))
        for url, (status, code, words) in refusals.items():
            (card,) = _each(browser, "error", url)
            assert card.get_attribute("data-error") == code
            assert f"HTTP {status}" in card.text
            assert words in card.text
        assert _script_errors(browser) == []
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page-urls.png"))
