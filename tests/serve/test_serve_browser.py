"""The page in a real browser (headless Chromium through Selenium) on a toy run: type a prompt, generate, see the
images appear with progress, check that the command the page shows for an image (built from its PNG parameters)
redraws it through txt2img.py pixel for pixel, and that a bad upload is refused on the page while it keeps working.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them). Without them
the test is skipped, unless ``LDM_REQUIRE_BROWSER=1`` (set by CI) makes their absence a failure.
``LDM_SCREENSHOT=docs/images/serve.png`` also saves the page at the end of the generation there (README's picture).
"""

import io
import json
import os
import shlex
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.serve.adapter import ModelAdapter, ModelSource
from ldm.serve.app import create_app
from ldm.serve.server import Server
from tests.scripts import load_script

pytestmark = pytest.mark.slow  # starts a browser

TIMEOUT_S = 120
WINDOW = "1280,860"
PROMPT = "a red circle on a blue background"


def chromium_driver():
    """A headless Chromium driven by Selenium (skip, or fail under CI, when it is not installed)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (binary and driver_path):
        if os.environ.get("LDM_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("chromium / chromedriver not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={WINDOW}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def served(tiny_ldm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser-out")
    app = create_app(ModelAdapter(ModelSource(run=str(tiny_ldm_run), device="cpu")), out=out)
    server = Server(app, port=0).start()
    yield server, out
    server.stop()


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver()
    driver.set_page_load_timeout(TIMEOUT_S)
    yield driver
    driver.quit()


def set_value(element, value: str) -> None:
    element.clear()
    element.send_keys(value)


def test_generate_in_the_browser_and_redraw_with_txt2img(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    server, _ = served
    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(server.url + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 1)  # the model's description came
    assert browser.find_element(By.ID, "class-row").get_attribute("hidden") is not None  # a text model: no class
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    set_value(browser.find_element(By.ID, "steps"), "3")
    set_value(browser.find_element(By.ID, "n"), "4")
    set_value(browser.find_element(By.ID, "seed"), "21")
    Select(browser.find_element(By.ID, "sampler")).select_by_value("ddim")
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status-text"), "done: 4 image(s)"))
    images = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert len(images) == 4
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im) == 16
               for im in images)  # loaded and decoded by the browser
    if os.environ.get("LDM_SCREENSHOT"):
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.environ["LDM_SCREENSHOT"])

    first = browser.find_elements(By.CSS_SELECTOR, "#gallery figure")[0]
    png = requests.get(first.find_element(By.TAG_NAME, "img").get_attribute("src"), timeout=TIMEOUT_S).content
    shown = Image.open(io.BytesIO(png))
    params = json.loads(shown.text["ldm"])
    assert params["prompt"] == PROMPT and params["seed"] == 21 and params["steps"] == 3
    assert first.find_element(By.TAG_NAME, "a").get_attribute("download").endswith(".png")
    command = shlex.split(first.find_element(By.TAG_NAME, "code").get_attribute("textContent"))
    assert command[:2] == ["python", "scripts/txt2img.py"] and "--seed" in command
    assert load_script("txt2img").main([*command[2:], "--out", str(tmp_path)]) == 0
    redrawn = Image.open(next(tmp_path.glob("0*.png")))
    assert np.array_equal(np.asarray(redrawn), np.asarray(shown.convert("RGB")))


def test_a_bad_upload_is_refused_on_the_page(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, out = served
    not_image = tmp_path / "evil name.png"
    not_image.write_text("this is text, not a picture")
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, TIMEOUT_S)
    wait.until(lambda d: d.find_element(By.ID, "steps").get_attribute("value"))
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    set_value(browser.find_element(By.ID, "steps"), "2")
    browser.find_element(By.ID, "init").send_keys(str(not_image))
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.visibility_of_element_located((By.ID, "message")))
    assert "the init image is not an image" in browser.find_element(By.ID, "message").text
    assert not any("evil" in p.name for p in out.iterdir())  # the browser's file name is never used
    browser.find_element(By.ID, "init").clear()
    browser.find_element(By.ID, "generate").click()  # the page and the server go on
    wait.until(ec.text_to_be_present_in_element((By.ID, "status-text"), "done: 1 image(s)"))
