"""The reading-room page in a real browser (headless Debian Chromium through chromedriver): upload an image,
type a reason, click Generate, and the findings that appear are infer.py's output; pointing at a sentence
then shows that sentence's overlay (llavarad.explain.relevance.explain's, pixel for pixel) in place of the picture,
and leaving it restores the picture; a file that is not an image shows the server's own message. Screenshots are saved and their paths printed (pytest -s)."""

import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _infer_fixtures import shared_tiny_release, write_images
from _serve_fixtures import chat_body, infer_stdout, png_pixels, shared_server

from llavarad.explain.relevance import explain
from llavarad.infer.images import load_image
from llavarad.model.weights import load_llavarad

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
REASON = "Shortness of breath.\nEvaluate for pneumonia."


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    folder = tmp_path_factory.mktemp("page")
    image = folder / write_images(folder, 2, seed=11)[1]
    return tiny, shared_server(tiny), image, folder


def wait_until(driver, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.1)


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).get_property("textContent")


def screenshot(driver, folder: Path, name: str) -> Path:
    path = Path(os.environ.get("LLAVARAD_SCREENSHOTS", folder)) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    assert "research use only" in text_of(driver, "research-only").lower()
    assert not driver.find_element(By.ID, "key-row").is_displayed()  # no key on this server


def test_findings_stream_into_the_page(browser, setup):
    tiny, server, image, folder = setup
    expected = infer_stdout(tiny.release, tiny.base, image, REASON, max_new_tokens=32)  # the server's default max_tokens
    open_page(browser, server.url)
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait_until(browser, lambda: browser.find_element(By.ID, "generate").is_enabled())
    browser.find_element(By.ID, "reason").send_keys(REASON)
    browser.find_element(By.ID, "generate").click()
    wait_until(browser, lambda: text_of(browser, "stats") or text_of(browser, "error"))
    assert text_of(browser, "error") == ""
    assert text_of(browser, "findings") == expected
    assert "time to first token" in text_of(browser, "stats") and "tokens/s" in text_of(browser, "stats")
    assert browser.find_element(By.ID, "copy").is_enabled()
    assert browser.find_element(By.ID, "preview").get_property("naturalWidth") > 0  # the picked image is shown
    assert screenshot(browser, folder, "serve_page_findings.png").stat().st_size > 10_000


def test_pointing_at_a_sentence_shows_its_overlay(browser, setup, one_thread):
    """Runs after the test above, on the page it left: the report is there, its maps are being computed."""
    tiny, server, image, folder = setup
    findings = infer_stdout(tiny.release, tiny.base, image, REASON, max_new_tokens=32)
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, torch.device("cpu"), None)
    expected = explain(model, tokenizer, load_image(str(image)), REASON, findings)
    assert expected.sentences
    wait_until(browser, lambda: "Point at a sentence" in text_of(browser, "explain-status") or "No maps" in text_of(browser, "explain-status"))
    assert "not a diagnosis" in text_of(browser, "explain-note")
    assert text_of(browser, "findings") == findings  # the sentences are marked, the text is unchanged
    preview = browser.find_element(By.ID, "preview")
    picture = preview.get_property("src")
    spans = browser.find_elements(By.CSS_SELECTOR, "#findings .sentence")
    assert [s.get_property("textContent") for s in spans] == [s.text for s in expected.sentences]
    k = len(spans) - 1  # the last sentence: its map differs from the first's
    ActionChains(browser).move_to_element(spans[k]).perform()
    wait_until(browser, lambda: preview.get_property("src") != picture, timeout=10)
    np.testing.assert_array_equal(png_pixels(preview.get_property("src")), png_pixels(expected.sentences[k].overlay))
    screenshot(browser, folder, "serve_page_overlay.png")
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "research-only")).perform()
    wait_until(browser, lambda: preview.get_property("src") == picture, timeout=10)


def test_a_file_that_is_not_an_image_shows_the_servers_message(browser, setup):
    tiny, server, _, folder = setup
    notes = folder / "notes.png"
    notes.write_text("Patient notes, not a picture.\n" * 20)
    expected = httpx.post(server.url + "/v1/chat/completions", json=chat_body(notes, stream=True), timeout=60).json()["error"]["message"]
    assert "cannot read image" in expected
    open_page(browser, server.url)
    browser.find_element(By.ID, "file").send_keys(str(notes))
    wait_until(browser, lambda: browser.find_element(By.ID, "generate").is_enabled())
    browser.find_element(By.ID, "generate").click()
    wait_until(browser, lambda: text_of(browser, "error"))
    assert text_of(browser, "error") == expected
    assert text_of(browser, "findings") == ""
    screenshot(browser, folder, "serve_page_error.png")
