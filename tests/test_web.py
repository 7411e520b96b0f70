"""The web page in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, via Selenium).

A real ``medrag serve`` process on loopback; the browser enters the API key, uploads an image,
picks an anatomy, and must see ranked cases with thumbnails and highlighted entities, then open
one. Set ``MEDRAG_SCREENSHOT=/path.png`` to keep a screenshot of the results.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from eval.synthetic import generate
from indexer.build import BuildConfig, build_index

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.integration  # a real ``medrag serve`` process, and Chromium for the page


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    manifest = generate(root / "synth", 40, seed=3, size=128)
    uri = f"qdrant+local:{root}/ix"
    build_index(manifest, uri, BuildConfig(encoder="pixels", conditioning=("left lung", "right lung", "heart")),
                progress=False)
    keys = root / "keys.json"
    from api.keys import add_key

    key = add_key(keys, "browser-test")
    from eval.load import start_server, stop_server

    proc, url = start_server(uri, keys)
    try:
        yield url, key, root / "synth", uri
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("MEDRAG_SKIP_BROWSER") == "1":
        pytest.skip("MEDRAG_SKIP_BROWSER=1")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the web test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; make test does this), or MEDRAG_SKIP_BROWSER=1")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield drv
    finally:
        drv.quit()


def test_upload_an_image_and_see_ranked_cases(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    url, key, synth, _ = server
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    assert "medrag" in browser.title
    browser.find_element(By.ID, "apikey").send_keys("mrk_not_a_key")
    browser.find_element(By.CSS_SELECTOR, "#keyform button").click()
    wait.until(lambda d: "rejected" in d.find_element(By.ID, "status").text)

    browser.find_element(By.ID, "apikey").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#keyform button").click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "anatomy")).options) > 1)
    Select(browser.find_element(By.ID, "anatomy")).select_by_visible_text("left lung")
    query = synth / "images" / "syn00005.png"
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(ec.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) >= 5)
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    # the query's own image (syn00005's pixels) is never a result of itself
    assert "syn00005" not in {c.get_attribute("data-study") for c in cards}
    assert "left lung" in browser.find_element(By.ID, "summary").text
    scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards]
    assert scores == sorted(scores, reverse=True)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card img[data-loaded='1']")) == len(cards))
    assert browser.find_elements(By.CSS_SELECTOR, "#results .card mark")  # entities highlighted
    out = os.environ.get("MEDRAG_SCREENSHOT") or str(tmp_path / "results.png")
    browser.save_screenshot(out)
    assert Path(out).stat().st_size > 10_000

    cards[1].click()
    wait.until(lambda d: d.find_element(By.ID, "case").get_attribute("open") is not None)
    assert browser.find_element(By.ID, "case-title").text.startswith("Study " + cards[1].get_attribute("data-study"))
    assert browser.find_element(By.ID, "case-report").text
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#case-images img").get_attribute("src").startswith("blob:"))


@pytest.fixture(scope="module")
def anonymous_native_server(tmp_path_factory):
    """An index built with (untrained) medrag-native, served with --allow-anonymous."""
    root = tmp_path_factory.mktemp("web_native")
    manifest = generate(root / "synth", 24, seed=4, size=96)
    uri = f"faiss:{root}/ix"
    build_index(manifest, uri, BuildConfig(encoder="medrag-native", allow_random_init=True, text_encoder=None,
                                           conditioning=("left lung", "heart")), progress=False)
    from eval.load import start_server, stop_server

    proc, url = start_server(uri, None)
    try:
        yield url, root / "synth"
    finally:
        stop_server(proc)


def test_anonymous_server_needs_no_key_and_shows_where_the_query_looked(anonymous_native_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    url, synth = anonymous_native_server
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    browser.execute_script("localStorage.removeItem('medrag-key')")
    browser.get(url + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "anatomy")).options) > 1)
    Select(browser.find_element(By.ID, "anatomy")).select_by_visible_text("left lung")
    browser.find_element(By.ID, "file").send_keys(str(synth / "images" / "syn00003.png"))
    # no key typed: the button is usable because the server allows anonymous use
    wait.until(ec.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) >= 5)
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card img.attention[data-loaded='1']"))
               == len(cards))  # a heat-map beside every hit


def test_load_benchmark_runs_bounded(server, tmp_path, capsys):
    from api.cli import main

    uri = server[3]
    assert main(["eval", "load", "--index", uri, "--out", str(tmp_path), "--requests", "12", "--concurrency", "2",
                 "--max-seconds", "30"]) == 0
    out = capsys.readouterr().out
    assert "search-by-vector" in out and "search-by-upload" in out
    import json

    r = json.loads((tmp_path / "load.json").read_text())
    for s in r["scenarios"].values():
        assert s["errors"] == 0 and 0 < s["requests"] <= 12 and s["p50_ms"] <= s["p99_ms"]
    assert r["server_counted"] >= 2  # the server's own /metrics saw both routes
