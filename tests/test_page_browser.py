"""The web page in a real headless browser (Debian's chromium driven by chromedriver)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from testkit.artifacts import CLASSES, free_port, image_bytes, make_ensemble, make_run, start_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
TRICKY = ["<b>bold</b> & co", "plain rose", "lily", "tulip"]  # a class name that is markup if not escaped
CV = {"folds": 5, "seed": 0, "blend": {"macro_f1": 0.8419, "macro_f1_std": 0.0315, "accuracy": 0.84, "log_loss": 0.55},
      "members": {"m32": {"macro_f1": 0.8070, "macro_f1_std": 0.03}, "m48": {"macro_f1": 0.7606, "macro_f1_std": 0.01}}}


def _repository(root: Path) -> Path:
    """flowers/1: the test ensemble (m32, m48) with a CV score; tricky/3: one run whose classes include markup."""
    ensemble = json.loads((make_ensemble(root / "artifacts") / "ensemble.json").read_text())
    for member in ensemble["members"]:
        member["path"] = str(root / "artifacts" / "runs" / member["name"])
    (root / "repo" / "flowers" / "1").mkdir(parents=True)
    (root / "repo" / "flowers" / "1" / "ensemble.json").write_text(json.dumps({**ensemble, "cv": CV}))
    run = make_run(root / "repo" / "tricky", "3", 32, seed=4, classes=TRICKY)
    member = json.loads((run / "member.json").read_text())
    (run / "member.json").write_text(json.dumps({**member, "name": "odd", "metrics": {"val_macro_f1": 0.6543}}))
    return root / "repo"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    repository = _repository(tmp_path_factory.mktemp("page"))
    process = start_server(["--model-repository", str(repository), "--poll-seconds", "0"], port)
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


def _texts(browser, css: str) -> list[str]:
    """The text content of every element matching `css` (hidden or cut off, as the DOM holds it)."""
    from selenium.webdriver.common.by import By

    return [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, css)]


def test_before_any_upload_the_page_shows_the_served_model(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#member-table tr.member"))
    assert browser.find_element(By.ID, "model-title").text == "Model flowers, version 1"
    members = [[td.text for td in row.find_elements(By.TAG_NAME, "td")]
               for row in browser.find_elements(By.CSS_SELECTOR, "#member-table tr.member")]
    assert members == [["m32", "32 px", "crop", "0.30", "0.807 (CV)"], ["m48", "48 px", "crop", "0.70", "0.761 (CV)"]]
    assert browser.find_element(By.ID, "score").text == "Cross-validated macro F1: 0.842 ± 0.032 (5 folds)"
    assert "blend: weighted" in browser.find_element(By.ID, "serving").text
    assert "none (1 pass)" in browser.find_element(By.ID, "serving").text
    classes = browser.find_elements(By.CSS_SELECTOR, "#class-list li")
    assert [c.text for c in classes] == CLASSES and classes[0].is_displayed()  # a short list starts open
    assert browser.find_element(By.ID, "picker").is_displayed()  # two models: the user picks one
    assert browser.find_elements(By.CSS_SELECTOR, "#bars .row") == []


def test_a_picked_model_is_shown_escaped_and_answers_the_predictions(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#member-table tr.member"))
    assert [o.text for o in Select(browser.find_element(By.ID, "model-select")).options] == ["flowers", "tricky"]
    Select(browser.find_element(By.ID, "model-select")).select_by_value("tricky")
    WebDriverWait(browser, 10).until(lambda d: "tricky" in d.find_element(By.ID, "model-title").text)
    assert browser.find_element(By.ID, "model-title").text == "Model tricky, version 3"
    assert browser.find_element(By.ID, "score").text == "Validation macro F1: 0.654 (one run, no cross-validated score)"
    assert _texts(browser, "#member-table tr.member td")[:2] == ["odd", "32 px"]
    assert _texts(browser, "#class-list li") == TRICKY
    assert browser.find_elements(By.CSS_SELECTOR, "#served b") == []  # the class name is text, not markup
    photo = tmp_path / "flower.png"
    photo.write_bytes(image_bytes("PNG", size=(40, 40), seed=3))
    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .row")) == len(TRICKY))
    assert browser.find_element(By.ID, "status").text == "answered by model tricky, version 3"
    assert sorted(_texts(browser, "#bars .name")) == sorted(TRICKY)
    assert [v.split(":")[0] for v in _texts(browser, "#members li")] == ["odd"]
    assert browser.find_elements(By.CSS_SELECTOR, "#bars b, #members b") == []
