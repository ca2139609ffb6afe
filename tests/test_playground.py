"""The playground page at / in a real headless browser (Debian's chromium, driven by selenium through
Debian's chromedriver): type a prompt, press the button, watch the completion stream in."""

from __future__ import annotations

import itertools
import shutil
import time

import pytest

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams

from .server_process import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("the playground test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    s = Server(serve_checkpoint, "--max-batch", "2")
    yield s
    s.stop()


def test_typed_prompt_streams_its_completion_into_the_page(browser, server, serve_checkpoint):
    from selenium.webdriver.common.by import By

    prompt = "def greet(name):\n"
    browser.get(server.url + "/")
    assert "codegen-lm playground" in browser.title
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    for field, value in (("max_tokens", "300"), ("temperature", "0")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.execute_script("document.getElementById('stop').value = ''")
    browser.find_element(By.ID, "generate").click()
    seen, deadline = [], time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        text = browser.find_element(By.ID, "output").text
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        status = browser.find_element(By.ID, "status").text
        if status.startswith("finished"):
            break
        time.sleep(0.02)
    assert status.startswith("finished"), (status, browser.find_element(By.ID, "error").text)
    assert len(seen) >= 3  # the text grew in steps while it was generated, not all at once
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen))
    engine = Engine(CodeGenForCausalLM.from_pretrained(serve_checkpoint),
                    CodeGenTokenizerFast.from_pretrained(serve_checkpoint))
    want = engine.submit(prompt, GenerationParams(max_new_tokens=300, temperature=0, top_p=0.95)).result()
    final = browser.execute_script("return document.getElementById('output').textContent")
    assert final == want.outputs[0].text
    assert browser.find_element(By.ID, "error").text == ""


def test_errors_show_in_the_page(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    element = browser.find_element(By.ID, "temperature")
    element.clear()
    element.send_keys("5")
    browser.find_element(By.ID, "generate").click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not browser.find_element(By.ID, "error").text:
        time.sleep(0.05)
    assert "temperature" in browser.find_element(By.ID, "error").text
