"""The web page of ``unigendet serve`` in a real headless browser (Debian's chromium through selenium) against the
service on loopback: the rendered result equals the API's answer for the same file, and a rejected upload shows
the API's message. Skipped where the browser is absent, unless UNIGENDET_REQUIRE_BROWSER=1 (CI), then failed."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import httpx
import pytest
from serving_data import Wrapped, image_set, load_spectral, png_bytes, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if absent:
        return f"no headless browser: {', '.join(absent)} not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("UNIGENDET_REQUIRE_BROWSER") == "1":
            pytest.fail(f"UNIGENDET_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_service(tmp_path_factory):
    from serving_data import save_tiny_spectral

    detector = Wrapped(load_spectral(save_tiny_spectral(tmp_path_factory.mktemp("page"))), staged=True)
    with serving(detector, name="cascade") as url:
        yield url


def upload(driver, url: str, path: Path) -> str:
    """Open the page, choose ``path`` in the file input, wait for the page to finish; its final state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "detector-name").text == "cascade")
    driver.find_element(By.ID, "file-input").send_keys(str(path))
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    return driver.find_element(By.ID, "status").get_attribute("data-state")


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).get_attribute("textContent")


def test_the_page_shows_what_the_api_answers(browser, page_service, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "upload.png"
    path.write_bytes(png_bytes(image_set(2, seed=5)[1]))
    api = httpx.post(f"{page_service}/detect?spectral_map=1",
                     files={"files": (path.name, path.read_bytes(), "image/png")}, timeout=30).json()["results"][0]
    assert upload(browser, page_service, path) == "done"
    shown = json.loads(text(browser, "result-json"))
    assert shown == {k: v for k, v in api.items() if k != "spectral_map_png"}
    assert text(browser, "result-id") == "upload.png" and text(browser, "result-label") == api["label"]
    p_fake = browser.find_element(By.ID, "result-p-fake")
    assert json.loads(p_fake.get_attribute("data-value")) == api["p_fake"]
    assert p_fake.text == f"{api['p_fake']:.4f}"
    assert text(browser, "result-decision") == api["decision"] and text(browser, "result-stage") == api["stage_exited"]
    assert text(browser, "result-explanation") == api["explanation"]
    picture = browser.find_element(By.ID, "spectral-map")
    assert picture.is_displayed() and picture.get_attribute("src") == "data:image/png;base64," + api["spectral_map_png"]
    assert browser.execute_script("return arguments[0].naturalWidth", picture) == 4
    assert base64.b64decode(api["spectral_map_png"]).startswith(b"\x89PNG")
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_a_rejected_upload_shows_the_api_message(browser, page_service, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "not-an-image.png"
    path.write_bytes(b"this is text, not a PNG")
    api = httpx.post(f"{page_service}/detect", files={"files": (path.name, path.read_bytes(), "image/png")})
    assert api.status_code == 422
    assert upload(browser, page_service, path) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text == f"Rejected (422): {api.json()['message']}"
    assert not browser.find_element(By.ID, "result").is_displayed()


DROP = """
const [name, data] = arguments;
const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/png" }));
document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true,
                                                                          cancelable: true }));
"""


def test_a_dropped_image_is_scored_like_a_chosen_one(browser, page_service):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = png_bytes(image_set(3, seed=6)[2])
    api = httpx.post(f"{page_service}/detect", files={"files": ("dropped.png", data, "image/png")}).json()
    browser.get(page_service)
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "detector-name").text == "cascade")
    browser.execute_script(DROP, "dropped.png", base64.b64encode(data).decode())
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done")
    assert json.loads(text(browser, "result-json")) == api["results"][0]


def test_an_absent_browser_is_named_in_the_skip_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    assert str(tmp_path / "no-chromium") in _browser_missing()
