"""The page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven
through selenium answers as ``memplan plan --json`` does, and shows the CLI's one-line error."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
WAIT_S = 120


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,800")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _answered(driver: Any, verdict: str) -> Any:
    """The verdict element once the page has answered with ``verdict``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d: Any) -> Any:
        if d.find_element(By.TAG_NAME, "body").get_attribute("data-state") != "answered":
            return False
        element = d.find_element(By.ID, "verdict")
        return element if element.get_attribute("data-verdict") == verdict else False

    return WebDriverWait(driver, WAIT_S).until(done)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:,.2f}"


def test_the_page_answers_as_the_cli_does(
    browser: Any, server: Server, run_cli: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gpu option")) > 2
    )
    model = browser.find_element(By.ID, "model")
    model.clear()
    model.send_keys("llama-65b")
    Select(browser.find_element(By.ID, "method")).select_by_value("qlora")
    Select(browser.find_element(By.ID, "gpu")).select_by_value("rtx-a6000")

    expected = run_cli("plan", "llama-65b", "--method", "qlora", "--gpu", "rtx-a6000", "--json")
    cli = expected.json()
    verdict = _answered(browser, cli["verdict"])
    device, capacity = _gib(cli["device_bytes"]), _gib(cli["gpu_capacity_bytes"])
    assert verdict.text.startswith(f"{cli['verdict'].upper()} on rtx-a6000: {device} of {capacity}")
    # The breakdown bar shows the same device total.
    assert f"device total {device} GiB" in browser.find_element(By.ID, "bar").text
    assumptions = browser.find_elements(By.CSS_SELECTOR, "#assumptions li")
    assert [a.text for a in assumptions] == cli["assumptions"]

    Select(browser.find_element(By.ID, "gpu")).select_by_value("rtx-4090")
    verdict = _answered(browser, "does not fit")
    assert verdict.text.startswith("DOES NOT FIT on rtx-4090: needs")
    assert browser.find_element(By.ID, "fixes-box").is_displayed()

    # A malformed config.json: the CLI's one line for the same file, next to the upload.
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 4096,,}')
    monkeypatch.chdir(tmp_path)
    message = run_cli("plan", "config.json").err.strip().removeprefix("memplan: error: ")
    assert "malformed JSON" in message
    browser.find_element(By.ID, "config").send_keys(str(bad))
    error = WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '.error[data-for="config"]').text or False
    )
    assert error == message

    # Nothing was refused by the page's Content-Security-Policy or fetched from elsewhere.
    logs = browser.get_log("browser")
    assert [e for e in logs if "Content Security Policy" in e["message"]] == []
    assert [e for e in logs if server.url not in e["message"]] == []
