"""The reading-room page in a real browser (headless Debian Chromium through chromedriver, a 1280 x 720
window): upload an image, type a reason, click Generate (in view without scrolling), and the findings that
appear are infer.py's output; pointing at a sentence then draws that sentence's map (from the grid that
llavarad.explain.relevance.explain gives, pixel for pixel) over the picture, in the same box, and leaving
it fades the map out; the picture itself never changes. The file label gives the size in bytes for a
small file; a file that is not an image shows the server's own message; the console has no error (no
404 for the favicon). Screenshots are saved and their paths printed (pytest -s)."""

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

from llavarad.explain.overlay import layer
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
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,720", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
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
    wait_until(browser, lambda: browser.find_element(By.ID, "preview").get_property("naturalWidth") > 0)
    assert browser.execute_script("return document.getElementById('generate').getBoundingClientRect().bottom") \
        <= browser.execute_script("return window.innerHeight")  # in view at 1280 x 720, with the picture shown
    screenshot(browser, folder, "serve_page_picked.png")
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # e.g. a 404 for /favicon.ico
    browser.find_element(By.ID, "reason").send_keys(REASON)
    browser.find_element(By.ID, "generate").click()
    wait_until(browser, lambda: text_of(browser, "stats") or text_of(browser, "error"))
    assert text_of(browser, "error") == ""
    assert text_of(browser, "findings") == expected
    assert "time to first token" in text_of(browser, "stats") and "tokens/s" in text_of(browser, "stats")
    assert browser.find_element(By.ID, "copy").is_enabled()
    assert browser.find_element(By.ID, "preview").get_property("naturalWidth") > 0  # the picked image is shown
    assert screenshot(browser, folder, "serve_page_findings.png").stat().st_size > 10_000


def rect(driver, element_id: str) -> dict:
    return driver.execute_script(f"const r = document.getElementById('{element_id}').getBoundingClientRect();"
                                 "return {x: r.x, y: r.y, w: r.width, h: r.height};")


def opacity(driver) -> float:
    return float(driver.execute_script("return getComputedStyle(document.getElementById('map')).opacity"))


def test_pointing_at_a_sentence_draws_its_map_over_the_picture(browser, setup, one_thread):
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
    shown = rect(browser, "preview")
    k = len(spans) - 1  # the last sentence: its map differs from the first's
    ActionChains(browser).move_to_element(spans[k]).perform()
    wait_until(browser, lambda: opacity(browser) == 1.0, timeout=10)
    mapped = browser.find_element(By.ID, "map")
    want = layer(expected.sentences[k].relevance, *expected.image_size, 28)  # the map alone, no caption
    np.testing.assert_array_equal(png_pixels(mapped.get_property("src"), "RGBA"), np.asarray(want))
    assert rect(browser, "map") == shown == rect(browser, "preview")  # the same box: the picture did not move or shrink
    w, h = (mapped.get_property(n) for n in ("naturalWidth", "naturalHeight"))
    assert (w, h) == want.size and abs(w / h - preview.get_property("naturalWidth") / preview.get_property("naturalHeight")) < 0.02
    assert preview.get_property("src") == picture  # drawn over the picture, not in its place
    screenshot(browser, folder, "serve_page_map.png")
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "research-only")).perform()
    assert browser.execute_script("return getComputedStyle(document.getElementById('map')).transitionDuration") != "0s"  # it fades
    wait_until(browser, lambda: opacity(browser) == 0.0, timeout=10)
    assert preview.get_property("src") == picture


def test_a_file_that_is_not_an_image_shows_the_servers_message(browser, setup):
    tiny, server, _, folder = setup
    notes = folder / "notes.png"
    notes.write_text("Patient notes, not a picture.\n" * 20)
    expected = httpx.post(server.url + "/v1/chat/completions", json=chat_body(notes, stream=True), timeout=60).json()["error"]["message"]
    assert "cannot read image" in expected
    open_page(browser, server.url)
    browser.find_element(By.ID, "file").send_keys(str(notes))
    wait_until(browser, lambda: browser.find_element(By.ID, "generate").is_enabled())
    assert text_of(browser, "file-name") == f"notes.png ({notes.stat().st_size} B)"  # not "(1 KiB)"
    browser.find_element(By.ID, "generate").click()
    wait_until(browser, lambda: text_of(browser, "error"))
    assert text_of(browser, "error") == expected
    assert text_of(browser, "findings") == ""
    screenshot(browser, folder, "serve_page_error.png")
