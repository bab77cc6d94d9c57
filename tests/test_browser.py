"""The chat page in headless chromium (Debian's /usr/bin/chromium through playwright): streaming,
stop, output shown as text, SSE fallback, localStorage. The app runs in-process on a threaded
Werkzeug server over a scripted engine, so the model output can be forced to contain HTML."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from tests.test_webapp import ScriptedEngine
from webapp import create_app

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
XSS = ['Here you go: ', '<script>window.__pwned = "script"</script>', ' and ',
       '<img src=x onerror="window.__pwned = \'img\'">', ' done.']
pytestmark = pytest.mark.browser

if not os.path.exists(CHROMIUM):
    print(f"test_browser: skipped: {CHROMIUM} is absent (`make browser` installs Debian's chromium)")
    pytest.skip(f"{CHROMIUM} is absent; `make browser` installs it", allow_module_level=True)


@contextmanager
def serve_in_thread(app):
    """The app on a threaded Werkzeug server on a free loopback port; yields its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def answer(prompt: str) -> list[str]:
    """Slow story pieces by default; HTML-looking pieces when the last user turn asks for them."""
    last_turn = prompt.rsplit("<user>", 1)[-1]
    if "html please" in last_turn:
        return XSS
    if "short" in last_turn:
        return ["Short", " answer", "."]
    return [f"word{i} " for i in range(400)]


@pytest.fixture(scope="module")
def site():
    engine = ScriptedEngine(answer=answer, delay_s=0.03)
    app = create_app({"TESTING": True, "MODEL_NAME": "scripted-model"}, engine=engine)
    with serve_in_thread(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@contextmanager
def new_page(browser, height: int):
    """A fresh browser context and page whose uncaught script errors collect in page.errors."""
    context = browser.new_context(viewport={"width": 1280, "height": height})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.errors = errors
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture
def page(browser):
    with new_page(browser, 820) as pg:
        yield pg


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator(".msg.assistant .msg-body").last


def test_streams_stops_and_renders_output_as_text(site, page):
    base, engine = site
    page.goto(base + "/")
    page.wait_for_selector("#status-dot[data-state='ready']")
    assert "scripted-model" in page.inner_text("#model-name")
    assert page.inner_text("#transport-name") == "WebSocket"

    # the answer grows over several updates
    send(page, "Tell me a long story")
    body = last_answer(page)
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .msg-body')[0].textContent.length > 0")
    lengths = []
    for _ in range(6):
        lengths.append(len(body.text_content()))
        page.wait_for_timeout(120)
    assert len(set(lengths)) >= 4 and lengths == sorted(lengths), lengths

    # stop aborts it on the server and the page says so
    aborted_before = len(engine.aborted)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .chip.stopped")
    assert len(engine.aborted) == aborted_before + 1
    stopped_at = len(body.text_content())
    page.wait_for_timeout(300)
    assert len(body.text_content()) == stopped_at < len("".join(answer("")))
    assert page.is_visible("#send") and not page.is_visible("#stop")

    # model output that looks like HTML is shown as text and runs nothing
    send(page, "html please")
    page.wait_for_selector(".msg.assistant:last-of-type .msg-stats .chip")
    html_answer = last_answer(page)
    assert html_answer.text_content() == "".join(XSS)
    assert html_answer.locator("script, img").count() == 0
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("img").count() == 0 and page.errors == []
    chips = page.locator(".msg.assistant").last.locator(".chip").all_inner_texts()
    assert any(c.startswith("TTFT") for c in chips) and any(c.endswith("tok/s") for c in chips), chips

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"))

    # the conversation survives a reload (localStorage)
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user .msg-body").all_inner_texts() == ["Tell me a long story", "html please"]
    assert page.locator(".conv").count() == 1


def test_sse_fallback_and_settings(site, page):
    base, engine = site
    page.goto(base + "/?transport=sse")
    page.wait_for_selector("#status-dot[data-state='ready']")
    assert page.inner_text("#transport-name") == "SSE"
    page.click("#toggle-settings")
    page.fill("#settings-form textarea[name='system']", "Be brief.")
    page.fill("#settings-form input[name='max_tokens']", "2")
    send(page, "short please")
    page.wait_for_selector(".msg.assistant .chip")
    assert last_answer(page).text_content() == "Short answer"  # max_tokens 2 reached the server
    assert engine.prompts[-1].startswith("<system>Be brief.\n<user>short please")
    page.fill("#settings-form input[name='max_tokens']", "300")
    send(page, "Tell me a long story")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .msg-body')[1].textContent.length > 20")
    aborted_before = len(engine.aborted)
    page.click("#stop")  # SSE: the fetch is aborted, the server sees the client go and aborts
    page.wait_for_selector(".msg.assistant:last-of-type .chip.stopped")
    for _ in range(100):
        if len(engine.aborted) > aborted_before:
            break
        page.wait_for_timeout(50)
    assert len(engine.aborted) == aborted_before + 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.set_viewport_size({"width": 420, "height": 820})
    page.screenshot(path=str(ARTIFACTS / "chat_page_mobile.png"))
