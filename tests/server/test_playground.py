"""The playground and the dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright).

The browser is the system's: playwright is told its path, so nothing is downloaded. The pages run under
their own Content-Security-Policy, as a user's browser would run them. The server is the shared live one
(the default model, API keys required), so every page first asks for a key.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time

import httpx
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    """$ROOFLINE_CHROMIUM, else the first Chromium on PATH."""
    if os.environ.get("ROOFLINE_CHROMIUM"):
        path = os.environ["ROOFLINE_CHROMIUM"]
        return path if os.path.isfile(path) else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary found (apt-get install chromium, or set $ROOFLINE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _open(browser, server, path: str):
    """A fresh tab on `path`, with the API key typed into the dialog the page opens on its first 401."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.requests = []  # every URL the page asks for: only this server (or inline data:) is allowed
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(server.base_url + path)
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", server.api_keys[0])
    page.click("#key-submit")
    page.wait_for_selector(f"#model-name:has-text('{server.model}')")
    page.errors = errors
    return page


@pytest.fixture
def playground(browser, server):
    """The playground, key entered; checks that no script error happened and the engine is idle after."""
    page = _open(browser, server, "/")
    yield page
    assert page.errors == []
    assert page.requests and all(url.startswith((server.base_url + "/", "data:")) for url in page.requests)
    page.close()
    server.wait_idle()


def _visible(text: str) -> str:
    """A token as the info panel shows it: spaces, newlines and tabs made visible."""
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "(empty)"


def _settings(page, mode: str = "chat", max_tokens: int = 12, temperature: float = 0.7, seed: int = 3,
              top_logprobs: int = 5, ignore_eos: bool = False) -> None:
    page.check(f"#mode-{mode}")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#seed", str(seed))
    page.fill("#top-logprobs", str(top_logprobs))
    page.set_checked("#ignore-eos", ignore_eos)


def test_a_chat_streams_tokens_and_hover_shows_alternatives(playground):
    page = playground
    _settings(page, max_tokens=12, ignore_eos=True)
    page.fill("#system", "You are a terse assistant.")
    page.fill("#prompt", "Name a colour.")
    page.click("#send")
    page.wait_for_selector(".turn.assistant .tok")  # tokens arrive while the stream runs
    page.wait_for_selector("#stop:disabled")
    status = page.inner_text(".turn.assistant .status")
    assert "finished: length" in status and "12 tokens" in status
    tokens = page.locator(".turn.assistant .tok")
    assert tokens.count() == 12
    assert page.locator(".turn.assistant .tok[tabindex='0']").count() == 1  # one tab stop; arrows move within
    label = tokens.nth(1).get_attribute("aria-label")
    assert re.search(r"probability [\d.e+-]+%, logprob -?\d+\.\d{3}", label)
    assert tokens.nth(1).evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    tokens.nth(1).hover()
    info = page.locator("#token-info")
    assert info.is_visible()
    rows = info.locator("tr.alt")
    assert rows.count() == 5  # top_logprobs alternatives, most likely first
    probabilities = [float(rows.nth(i).locator("td").nth(3).inner_text()) for i in range(5)]
    assert probabilities == sorted(probabilities, reverse=True)
    chosen = tokens.nth(1).text_content()
    assert info.locator("h2 code").inner_text() == _visible(chosen)
    assert info.locator("tr.chosen").count() <= 1  # the sampled token, highlighted when among the top 5


def test_keyboard_focus_walks_tokens_and_shows_each(playground):
    page = playground
    _settings(page, max_tokens=6, temperature=0, ignore_eos=True)
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_selector("#stop:disabled")
    first = page.locator(".turn.assistant .tok[tabindex='0']")
    first.focus()
    tokens = page.locator(".turn.assistant .tok")
    assert page.inner_text("#token-info h2 code") == _visible(tokens.nth(0).text_content())
    page.keyboard.press("ArrowRight")
    focused = page.locator(".turn.assistant .tok:focus")
    assert focused.count() == 1 and focused.get_attribute("tabindex") == "0"
    assert page.locator(".turn.assistant .tok[tabindex='0']").count() == 1  # the tab stop moved along
    assert page.inner_text("#token-info h2 code") == _visible(tokens.nth(1).text_content())
    page.keyboard.press("End")
    assert page.inner_text("#token-info h2 code") == _visible(tokens.nth(5).text_content())
    page.keyboard.press("Escape")
    assert page.is_hidden("#token-info")


def test_chat_prompt_logprobs_score_the_rendered_template(playground, server):
    page = playground
    _settings(page, max_tokens=3, temperature=0, top_logprobs=2)
    page.fill("#system", "Be brief.")
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_selector("#stop:disabled")
    page.click(".turn.user .prompt-logprobs")
    page.wait_for_selector(".turn.user .tok")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    with server.client() as c:
        rendered = c.post("/tokenize", json={"messages": messages, "add_generation_prompt": True}).json()
        text = c.post("/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    tokens = page.locator(".turn.user .tok")
    assert tokens.count() == rendered["count"]  # the chat template's tokens, as the chat route sent them
    assert "".join(tokens.all_text_contents()) == text and text.startswith("<|im_start|>system")


def test_completion_prompt_logprobs_on_demand(playground, server):
    page = playground
    _settings(page, mode="completion", max_tokens=4, temperature=0, top_logprobs=3)
    prompt = "The capital of France is"
    page.fill("#prompt", prompt)
    page.click("#send")
    page.wait_for_selector("#stop:disabled")
    assert page.locator(".turn.completion .tok").count() >= 1
    page.click(".turn.prompt .prompt-logprobs")
    page.wait_for_selector(".turn.prompt .tok")
    with server.client() as c:
        num_prompt_tokens = c.post("/tokenize", json={"prompt": prompt}).json()["count"]
    prompt_tokens = page.locator(".turn.prompt .tok")
    assert prompt_tokens.count() == num_prompt_tokens
    assert "no logprob" in prompt_tokens.nth(0).get_attribute("aria-label")  # the first token has no context
    assert "probability" in prompt_tokens.nth(1).get_attribute("aria-label")
    prompt_tokens.nth(1).hover()
    assert page.locator("#token-info tr.alt").count() >= 3  # the top 3, plus the prompt's own token if not among them


def test_stop_ends_the_generation_on_the_server(playground, server):
    page = playground
    _settings(page, mode="completion", max_tokens=2000, temperature=1.0, ignore_eos=True)
    page.fill("#prompt", "Once upon a time")
    page.click("#send")
    page.wait_for_selector(".turn.completion .tok")
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_selector("#stop:disabled")
    assert page.inner_text(".turn.completion .status").startswith("stopped")
    server.wait_idle(timeout=5)  # the disconnect aborted the request and freed its KV blocks
    stats = server.ctx.engine.stats()
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    assert page.locator(".turn.completion .tok").count() < 2000


def _load(server, num_requests: int, max_tokens: int) -> threading.Thread:
    def run() -> None:
        def one(i: int) -> None:
            with server.client() as c:
                c.post("/v1/completions", json={"prompt": f"Story {i}:", "max_tokens": max_tokens,
                                                "ignore_eos": True, "temperature": 0})

        workers = [threading.Thread(target=one, args=(i,)) for i in range(num_requests)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_dashboard_moves_under_load(browser, server):
    page = _open(browser, server, "/dashboard")
    page.wait_for_selector("#stat-gen-total[data-value]")
    before = int(page.get_attribute("#stat-gen-total", "data-value"))
    load = _load(server, num_requests=3, max_tokens=40)

    def is_moving() -> bool:  # more tokens than before, and a sample with a rate above 0
        total = int(page.get_attribute("#stat-gen-total", "data-value"))
        return total > before and float(page.get_attribute("#stat-gen-tps", "data-peak") or 0) > 0

    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not is_moving():
        assert time.monotonic() < deadline, "the dashboard did not move under load"
        page.wait_for_timeout(100)
    page.wait_for_selector("#roofline-summary:has-text('this hardware allows')")
    summary = page.inner_text("#roofline-summary")
    assert re.search(r"batch \d+ at \d+ tokens of context: this hardware allows [\d.k]+ tok/s, the engine runs", summary)
    assert "preset" in page.inner_text("#roofline-basis")
    load.join(60)
    total = server.ctx.engine.stats().num_generated_tokens
    assert total >= before + 3 * 40
    page.wait_for_selector(f"#stat-gen-total[data-value='{total}']")  # the next poll shows the load's tokens
    assert page.errors == []
    page.close()
    server.wait_idle()


def test_a_wrong_key_is_asked_again(browser, server):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.base_url + "/dashboard")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "not-the-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-message:has-text('refused')")
    page.fill("#key-input", server.api_keys[0])
    page.click("#key-submit")
    page.wait_for_selector(f"#model-name:has-text('{server.model}')")
    page.reload()  # the key is kept for the tab (sessionStorage): no dialog this time
    page.wait_for_selector(f"#model-name:has-text('{server.model}')")
    assert not page.is_visible("#key-dialog")
    with httpx.Client(base_url=server.base_url) as c:
        assert c.get("/dashboard/stats").status_code == 401  # the page holds the key; the route still wants it
    page.close()


def test_a_refused_request_shows_the_servers_message(playground):
    page = playground
    _settings(page, max_tokens=4, temperature=3)  # the server allows temperature up to 2
    page.fill("#prompt", "Hi")
    page.click("#send")
    page.wait_for_selector("#error:has-text('temperature')")
    assert page.inner_text(".turn.assistant .status") == "failed"
    assert page.is_disabled("#stop") and page.is_enabled("#send")
