"""Regenerate docs/figures/serve.png: the ``memplan serve`` page at 1280x800 in headless Chromium.

    python scripts/serve_screenshot.py               # writes docs/figures/serve.png
    python scripts/serve_screenshot.py --out /tmp/page.png

Needs the web extra, selenium (dev extra) and Debian's chromium and chromium-driver. The page
shows LLaMA-65B with QLoRA on an RTX A6000, the README's first example.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "serve.png"
WIDTH, HEIGHT = 1280, 800


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"memplan serve ended with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit("memplan serve did not answer within 120 s")


def screenshot(out: Path) -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        sys.exit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "-m", "memplan.cli", "serve", "--port", str(port)])
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        _wait_for(url + "api/choices", server)
        # The viewport itself 1280x800 (a window size would include the browser's frame).
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.get(url)
        WebDriverWait(driver, 60).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gpu option")) > 2
        )
        model = driver.find_element(By.ID, "model")
        model.clear()
        model.send_keys("llama-65b")
        Select(driver.find_element(By.ID, "method")).select_by_value("qlora")
        Select(driver.find_element(By.ID, "gpu")).select_by_value("rtx-a6000")
        WebDriverWait(driver, 120).until(
            lambda d: (
                d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "answered"
                and d.find_element(By.ID, "verdict").get_attribute("data-verdict") == "borderline"
            )
        )
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"PNG to write (default {OUT})")
    screenshot(parser.parse_args().out)


if __name__ == "__main__":
    main()
