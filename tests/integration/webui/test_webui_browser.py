"""The web demo in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) opens the page served on a free local port with two tiny models side by side, uploads a
PNG, sends a message, reads the streamed answers from the page and checks them against the
library's greedy answers; then an empty message's error line, and Reset."""

from __future__ import annotations

import shutil
import socket

import pytest

from webui_helpers import MAX_NEW, QUESTION, library_answer

from vlmalign.rollout.generate import SamplingConfig

pytest.importorskip("gradio", reason="the webui extra (gradio) is not installed: pip install -e '.[dev]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
if BROWSER is None or DRIVER is None:
    pytest.skip(f"no {'chromium' if BROWSER is None else 'chromedriver'} on PATH: install Debian's chromium and "
                "chromium-driver (scripts/install_browser.sh)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tiny):
    from vlmalign.webui import ChatModel, WebChat
    from vlmalign.webui.app import launch
    chat = WebChat([ChatModel(d, ad) for d, ad in zip(tiny.dirs, tiny.adapters)],
                   SamplingConfig(max_new_tokens=MAX_NEW))
    port = _free_port()
    demo = launch(chat, "127.0.0.1", port)
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"), "the page to load")
        yield driver
    finally:
        driver.quit()
        demo.close()


def _wait(driver, until, what: str):
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(until)
    except TimeoutException:
        raise AssertionError(f"waited {WAIT_S}s for {what}; the panes show {_panes(driver)}, the status "
                             f"line {_status(driver)!r}") from None


def _panes(driver) -> list[list[tuple[str, str]]]:
    """Each pane's messages as (user|bot, text), read in one script (the panes re-render as tokens come)."""
    return [[tuple(m) for m in driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), m => [m.dataset.testid, m.innerText.trim()]);",
        f"#chat-{i} [data-testid=user], #chat-{i} [data-testid=bot]")] for i in range(2)]


def _answers(driver) -> list[str | None]:
    return [next((t for who, t in reversed(p) if who == "bot"), None) for p in _panes(driver)]


def _status(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value")


def _send(driver, text: str):
    box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#send").click()


def test_upload_send_and_read_the_streamed_answers(page, tiny):
    expected = [library_answer(ad, tiny.image, QUESTION) for ad in tiny.adapters]
    page.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(tiny.image)
    _wait(page, lambda d: any("gradio_api/file=" in (img.get_attribute("src") or "")
                              for img in d.find_elements(By.CSS_SELECTOR, "#image img")), "the upload")
    _send(page, QUESTION)
    _wait(page, lambda d: _answers(d) == expected, f"the answers {expected}")
    assert _status(page) == ""
    assert page.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value") == ""   # sent: cleared
    for pane in range(2):   # the image and the question are shown in both panes
        assert page.find_elements(By.CSS_SELECTOR, f"#chat-{pane} [data-testid=user] img")
        assert (("user", QUESTION) in _panes(page)[pane])


def test_an_empty_message_is_an_error_line_then_reset_clears(page):
    _send(page, "")
    _wait(page, lambda d: _status(d).startswith("error: type a message"), "the error line")
    assert all(_answers(page))   # the conversation is still there
    page.find_element(By.CSS_SELECTOR, "#reset").click()
    _wait(page, lambda d: _panes(d) == [[], []] and _status(d) == "conversation reset", "the reset")
    _send(page, "Hello")   # and the page goes on working
    _wait(page, lambda d: all(a is not None for a in _answers(d)) and len(_panes(d)[1]) == 2, "the answers")
