"""The map page in headless Chromium: sample capture → ellipse, point and receivers drawn."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.ray

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
N_RECEIVERS = 7
SVG_NS = "http://www.w3.org/2000/svg"
WAIT_S = 60


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through the Debian chromedriver; skipped when either is absent."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("chromium / chromium-driver not installed (apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never looks for (or downloads) a driver.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_map_assets_are_served_locally(app_url):
    page = httpx.get(app_url + "/map", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    texts = [page.text]
    for name, kind in (("map.js", "javascript"), ("map.css", "text/css")):
        r = httpx.get(f"{app_url}/map/static/{name}", timeout=30)
        assert r.status_code == 200 and kind in r.headers["content-type"], name
        texts.append(r.text)
    # Nothing from outside: the only URL anywhere is the SVG namespace name (never fetched).
    urls = {u for t in texts for u in re.findall(r"https?://[^\s'\"()<>]+", t)}
    assert urls <= {SVG_NS}, urls
    assert httpx.get(app_url + "/map/static/..%2Fsettings.py", timeout=30).status_code == 404
    sample = httpx.get(app_url + "/map/sample", timeout=60).json()
    assert len(sample["request"]["receivers"]) == N_RECEIVERS
    assert {"latitude", "longitude"} <= set(sample["truth"])
    again = httpx.get(app_url + "/map/sample", timeout=60).json()
    assert again == sample  # fixed seed, cached per replica


def test_map_page_draws_sample_prediction(app_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(app_url + "/map")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#receivers .receiver"))
               == N_RECEIVERS)
    wait.until(ec.element_to_be_clickable((By.ID, "sample-btn"))).click()
    ellipse = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "svg#map #ellipse")))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Localized"))

    points = ellipse.get_attribute("points").split()
    assert len(points) > 10, points
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    assert max(xs) - min(xs) > 5 and max(ys) - min(ys) > 5  # a visible polygon, not a dot
    assert browser.find_element(By.CSS_SELECTOR, "svg#map #position").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, "svg#map #truth")
    markers = browser.find_elements(By.CSS_SELECTOR, "#receivers .receiver")
    assert sorted(m.get_attribute("data-id") for m in markers) == sorted(
        r["id"] for r in httpx.get(app_url + "/receivers", timeout=30).json()["receivers"])
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".rx-labels text")]
    assert "Torino" in labels and len(labels) == N_RECEIVERS

    # The model version and the timings of the answer are on the page.
    served = httpx.get(app_url + "/health", timeout=30).json()["model"]
    assert browser.find_element(By.ID, "m-version").text == str(served["version"])
    timings = browser.find_element(By.ID, "timings").text
    for key in ("preprocess", "inference", "postprocess", "total"):
        assert key in timings, timings
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None

    # Every resource the page loaded came from the app itself (it must work offline).
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(app_url))
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(origin) for u in urls), urls
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "map.png"))


def test_map_page_shows_refused_capture(app_url, browser, tmp_path):
    """A capture file the service refuses shows the error naming the field."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    sample = httpx.get(app_url + "/map/sample", timeout=60).json()["request"]
    bad = tmp_path / "two_receivers.json"
    bad.write_text(json.dumps({**sample, "receivers": sample["receivers"][:2]}))
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(app_url + "/map")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#receivers .receiver"))
               == N_RECEIVERS)
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert error.text.startswith("422: receivers"), error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#ellipse")
