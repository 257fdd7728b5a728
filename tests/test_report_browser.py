"""The tiny demo's report.html in headless Chromium with the network cut off.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the Python package
``selenium``. Without them the test is skipped, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from tests.test_pipeline import shared_tiny_demo

pytestmark = pytest.mark.browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_PATHS = ("/usr/bin/chromedriver",)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")

# No proxy listens on port 9 and every host name fails to resolve, so any request that
# tries to leave the machine fails.
OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--window-size=1280,1600",
)


def _missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser test (install chromium chromium-driver)")
    pytest.skip(reason)


def _chromium() -> tuple[str, str]:
    binary = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    driver = next((p for p in DRIVER_PATHS if Path(p).is_file()), shutil.which("chromedriver"))
    if binary is None or driver is None:
        _missing("headless Chromium and chromedriver are not installed")
    return binary, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install selenium)")
    binary, driver_path = _chromium()

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in OFFLINE_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def loaded_report(browser, tmp_path_factory):
    from selenium.webdriver.support.ui import WebDriverWait

    report = shared_tiny_demo(tmp_path_factory) / "report.html"
    browser.get(report.resolve().as_uri())
    WebDriverWait(browser, 60).until(
        lambda driver: driver.execute_script(
            "const root = document.getElementById('circuitsvis-neurons');"
            "return root !== null && root.children.length > 0;"
        )
    )

    # A full-page screenshot, kept next to the demo output for a person to look at.
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
    )
    path = tmp_path_factory.mktemp("screenshots") / "report.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return browser, path


def test_neuron_view_renders(loaded_report):
    driver, _ = loaded_report
    children = driver.execute_script(
        "return document.getElementById('circuitsvis-neurons').querySelectorAll('*').length"
    )
    assert children > 10
    # Each token is a span with the token's text; the redacted PII shows as placeholders.
    text = driver.execute_script("return document.getElementById('circuitsvis-neurons').innerText")
    assert "[EMAIL]" in text or "[NAME]" in text


def test_plots_render(loaded_report):
    driver, _ = loaded_report
    widths = driver.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
    )
    assert len(widths) >= 2
    assert all(width > 0 for width in widths)


def test_page_makes_no_network_request(loaded_report):
    import json

    driver, _ = loaded_report
    requested = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
    assert requested, "the performance log recorded no request at all"
    remote = [url for url in requested if not url.startswith(LOCAL_SCHEMES)]
    assert remote == []


def test_page_has_no_script_error(loaded_report):
    driver, _ = loaded_report
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_screenshot_is_written(loaded_report):
    _, path = loaded_report
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank page compresses to a few KiB; the rendered report is far larger.
    assert len(data) > 50_000
