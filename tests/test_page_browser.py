"""The web page in a real headless browser (Debian's chromium driven by chromedriver)."""

from __future__ import annotations

import shutil

import pytest

from service.testing import CLASSES, free_port, image_bytes, make_ensemble, start_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    process = start_server(["--ensemble", str(make_ensemble(tmp_path_factory.mktemp("page")))], port)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_picking_a_photo_shows_the_top_classes_as_bars_with_member_votes(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "flower.jpg"
    photo.write_bytes(image_bytes("JPEG", size=(120, 90), seed=11))
    browser.get(server + "/")
    assert "Flower classifier" in browser.title
    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .row")) == len(CLASSES))
    rows = browser.find_elements(By.CSS_SELECTOR, "#bars .row")
    names = [r.find_element(By.CSS_SELECTOR, ".name").text for r in rows]
    assert sorted(names) == sorted(CLASSES)
    widths = [r.find_element(By.CSS_SELECTOR, ".bar").size["width"] for r in rows]
    assert widths == sorted(widths, reverse=True) and widths[0] > 2
    votes = WebDriverWait(browser, 5).until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#members li")))
    assert [v.text.split(":")[0] for v in votes] == ["m32", "m48"]
    assert browser.find_element(By.ID, "error").text == ""
    browser.save_screenshot(str(tmp_path / "page.png"))


def test_a_file_that_is_not_an_image_shows_the_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bogus = tmp_path / "notes.jpg"
    bogus.write_bytes(b"this is not a picture")
    browser.get(server + "/")
    browser.find_element(By.ID, "file").send_keys(str(bogus))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert "not an image" in browser.find_element(By.ID, "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "#bars .row") == []
