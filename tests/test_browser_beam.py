"""The chat page's beam search in headless chromium (Debian's /usr/bin/chromium through playwright):
the live SVG tree grows step by step, the reranked candidates are listed, a pick is recorded in the
JSONL export and becomes the answer the chat continues from; stop works over SSE. The app runs
in-process on a threaded Werkzeug server over the scripted beam engine of test_webapp_beam.py
(the real BeamSearch over seeded fake logprobs, one step per delay), with the real MiniLM reranker."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_browser import ARTIFACTS, CHROMIUM, browser, new_page, serve_in_thread  # noqa: F401 (fixture)
from tests.test_webapp_beam import ScriptedBeamEngine, records
from webapp import create_app

pytestmark = pytest.mark.browser

if not os.path.exists(CHROMIUM):
    print(f"test_browser_beam: skipped: {CHROMIUM} is absent (`make browser` installs Debian's chromium)")
    pytest.skip(f"{CHROMIUM} is absent; `make browser` installs it", allow_module_level=True)

QUESTION = "Tell me about the sea at night."


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    export = tmp_path_factory.mktemp("beam_site") / "beam_choices.jsonl"
    engine = ScriptedBeamEngine(delay_s=0.1)
    engine.eos_slope = 0.22          # about 30 steps before four beams finish
    app = create_app({"TESTING": True, "MODEL_NAME": "scripted-beam", "BEAM_EXPORT_PATH": str(export)},
                     engine=engine)
    with serve_in_thread(app) as url:
        yield url, engine, export


@pytest.fixture
def page(browser):
    with new_page(browser, 900) as pg:
        yield pg


def set_beam_settings(page, width: int, max_tokens: int) -> None:
    page.click("#toggle-settings")
    page.eval_on_selector("input[name='beam_width']",
                          "(el, w) => { el.value = w; el.dispatchEvent(new Event('input', {bubbles: true})); }",
                          width)
    page.fill("input[name='beam_max_tokens']", str(max_tokens))
    assert page.is_visible("input[name='rerank']") and page.is_checked("input[name='rerank']")
    page.click("#close-settings")


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


NODES = ".msg.assistant:last-of-type .beam-tree .bn"


def test_beam_tree_grows_then_a_pick_is_recorded_and_continues_the_chat(site, page):
    base, engine, export = site
    page.goto(base + "/")
    page.wait_for_selector("#status-dot[data-state='ready']")
    set_beam_settings(page, 4, 32)
    assert "width 4" in page.inner_text("#composer-hint")
    send(page, QUESTION)

    # the tree's SVG nodes grow over several updates while the search streams
    page.wait_for_function(f"() => document.querySelectorAll({NODES!r}).length > 1")
    counts = []
    for _ in range(6):
        counts.append(page.locator(NODES).count())
        page.wait_for_timeout(220)
    assert len(set(counts)) >= 4 and counts == sorted(counts), counts
    assert page.locator(".msg.assistant .msg-body").last.text_content() != ""  # the best running beam

    # the search ends: four candidates in reranked order, one per finished leaf
    page.wait_for_selector(".msg.assistant .beam-cands .cand >> nth=3", timeout=30_000)
    cands = page.locator(".beam-cands .cand")
    assert cands.count() == 4
    scores = [float(t.split()[1]) for t in page.locator(".cand-chips .chip.accent").all_inner_texts()]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert page.locator(".beam-tree .bn.finished").count() >= 4
    assert page.locator(".beam-tree .bn.pruned").count() > 0 and page.locator(".beam-tree .edge").count() > 50
    steps = page.locator(".beam-tree .bn text").all_text_contents()
    assert steps[0] == "prompt" and all(s for s in steps)
    first_answer = page.locator(".msg.assistant .msg-body").last.text_content()
    assert first_answer == cands.nth(0).locator(".cand-text").text_content()

    # hovering a node shows its token, logprob and cumulative score
    page.locator(".beam-tree .bn.kept").nth(3).hover()
    tip = page.locator(".beam-tip")
    assert tip.is_visible() and "logprob" in tip.text_content() and "cumulative score" in tip.text_content()

    # pick the second candidate: the server records it, the page shows it as chosen and as the answer
    with page.expect_response(lambda r: r.url.endswith("/beam_choice")) as info:
        cands.nth(1).locator(".cand-pick").click()
    sent = json.loads(info.value.request.post_data)
    assert info.value.status == 200 and sent["chosen"] == 1
    page.wait_for_selector(".cand.chosen")
    chosen_text = cands.nth(1).locator(".cand-text").text_content()
    assert page.locator(".msg.assistant .msg-body").last.text_content() == chosen_text
    [rec] = [r for r in records(export) if r["id"] == sent["record_id"]]
    assert rec["chosen"] == 1 and rec["prompt"] == QUESTION and rec["candidates"][1]["text"] == chosen_text
    assert page.locator(".beam-tree .bn.chosen").count() >= 2
    page.locator(".msg.assistant .beam").last.scroll_into_view_if_needed()
    page.locator(".beam-tree .bn.chosen.finished").first.hover()
    assert "finished" in tip.text_content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "beam_tree.png"))
    page.click(".beam-fit")  # zoom to fit: the whole tree in the answer's width
    assert page.inner_text(".beam-fit") == "Actual size"
    box = page.locator(".beam-tree").bounding_box()
    assert box["width"] <= page.locator(".beam-scroll").bounding_box()["width"]
    page.screenshot(path=str(ARTIFACTS / "beam_tree_fit.png"))

    # the chat continues from the chosen candidate
    send(page, "And in the morning?")
    page.wait_for_selector(".msg.assistant >> nth=1")
    assert f"<assistant>{chosen_text}\n<user>And in the morning?" in engine.prompts[-1]
    page.wait_for_selector(".msg.assistant:last-of-type .beam-cands .cand", timeout=30_000)

    # after a reload the tree, the candidates and the pick are back
    num_nodes = page.locator(".msg.assistant").first.locator(".beam-tree .bn").count()
    page.reload()
    page.wait_for_selector(".beam-cands .cand.chosen")
    first = page.locator(".msg.assistant").first
    assert first.locator(".beam-tree .bn").count() == num_nodes > 100
    assert first.locator(".cand.chosen .cand-text").text_content() == chosen_text
    assert first.locator(".msg-body").text_content() == chosen_text
    assert page.errors == []


def test_beam_over_sse_stops_on_the_server(site, page):
    base, engine, export = site
    page.goto(base + "/?transport=sse")
    page.wait_for_selector("#status-dot[data-state='ready']")
    assert page.inner_text("#transport-name") == "SSE"
    set_beam_settings(page, 3, 200)
    page.click("#toggle-settings")
    page.uncheck("input[name='early_stopping']")
    page.click("#close-settings")
    aborted_before = len(engine.aborted)
    send(page, "A long one, please.")
    page.wait_for_function(f"() => document.querySelectorAll({NODES!r}).length > 20")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .chip.stopped")
    for _ in range(100):
        if len(engine.aborted) > aborted_before:
            break
        page.wait_for_timeout(50)
    assert len(engine.aborted) == aborted_before + 1
    assert "stopped" in page.inner_text(".beam-status") and page.locator(".beam-cands .cand").count() == 0
    assert page.is_visible("#send") and page.errors == []
