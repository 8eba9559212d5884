"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
type a story, press Generate, watch the frames arrive one by one over the SSE stream."""

from __future__ import annotations

import shutil
import time

import pytest

from test_serve import free_port, served_config

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def web_server(ray_local, repo, tiny_work, tmp_path_factory):
    from ray import serve

    from serving.app import build_app
    from serving.command import start

    cfg = served_config(repo, tiny_work, tmp_path_factory.mktemp("web-work"))
    url = start(build_app(cfg), "127.0.0.1", free_port(), ray_init=False)
    yield url
    serve.shutdown()


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_type_a_story_generate_and_watch_frames_appear(web_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    captions = ["Emma waves hello in the forest.", "Later, she sits down with Bruno.",
                "They are eating lunch.", "Bruno walks home."]
    browser.get(web_server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert browser.title == "StoryGPT-V"

    # clear the example story down to one row, then type ours row by row
    while len(browser.find_elements(By.CSS_SELECTOR, "#captions .caption-row")) > 1:
        browser.find_elements(By.CSS_SELECTOR, "#captions .remove")[-1].click()
    for i, caption in enumerate(captions):
        if i:
            browser.find_element(By.ID, "add").click()
        box = browser.find_elements(By.CSS_SELECTOR, "#captions input.caption")[i]
        box.clear()
        box.send_keys(caption)
    assert [b.get_attribute("value") for b in browser.find_elements(By.CSS_SELECTOR, "#captions input.caption")] == captions
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "steps").send_keys("8")  # frames slow enough to watch them arrive

    browser.find_element(By.ID, "generate").click()
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        done = "Done" in browser.find_element(By.ID, "status").text
        count = len(browser.find_elements(By.CSS_SELECTOR, "#frames figure img"))
        if not seen or count != seen[-1]:
            seen.append(count)
        if done:
            break
        time.sleep(0.05)
    status = browser.find_element(By.ID, "status").text
    assert "Done" in status, status
    assert seen[-1] == len(captions)
    assert any(0 < c < len(captions) for c in seen), seen  # they arrived one by one, not all at the end
    shown = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#frames figcaption")]
    assert shown == [f"{i + 1}. {c}" for i, c in enumerate(captions)]
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#frames img')].every(i => i.complete && i.naturalWidth > 0)")
    assert loaded
    assert browser.find_element(By.ID, "download").is_enabled()
    browser.find_element(By.ID, "download").click()  # composes the grid on a canvas
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def test_the_page_reports_a_refusal(web_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(web_server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "steps").send_keys("100000")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: "steps" in d.find_element(By.ID, "status").text)
    assert "422" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, "#frames figure") == []
