"""The live page (``/``, service/api/static/index.html) in headless Debian Chromium driven by
Playwright against a real uvicorn serving the bundled char LM; and the offline ``/docs``.

Chromium is the system's ``/usr/bin/chromium`` (``make system-deps`` installs it), never a
browser downloaded by ``playwright install``. ``CARRYOVER_PAGE_SCREENSHOT=docs/page.png`` makes the
first test write the README's screenshot there (otherwise it goes to a temporary folder).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from model_export.verify import unpadded_run
from service.config import BUNDLED_MODEL
from service.engine.model import RecurrentModel
from service.keys import key_line, new_key
from tests.live_server import LiveServer, live_server
from tests.redis_fixture import RedisServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOP_K = 8  # rows the page shows


@pytest.fixture(scope="module")
def charlm() -> RecurrentModel:
    return RecurrentModel(BUNDLED_MODEL, name="charlm")


@pytest.fixture(scope="module")
def page_server(
    redis_server: RedisServer, charlm: RecurrentModel, loaded: dict[str, RecurrentModel]
) -> Iterator[LiveServer]:
    """The char LM (default) and a features model the page must pass over."""
    with live_server(redis_server.url, {"charlm": charlm, "gru": loaded["gru_stacked"]}) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run `make system-deps` (installs Debian's chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 660})
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# -- helpers ------------------------------------------------------------------------------------------
def expected_top(model: RecurrentModel, text: str) -> list[tuple[str, float]]:
    """The page's predictions computed offline: softmax of the last logits row of ``text`` run
    alone from the initial state, top ``TOP_K``."""
    vocab = model.contract.vocab
    assert vocab is not None
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index.get(c, model.contract.unk_id) for c in text], np.int64)
    logits = unpadded_run(model, {"tokens": ids})[0]["logits"][-1].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    best = np.argsort(-p, kind="stable")[:TOP_K]
    return [(vocab[i], float(p[i])) for i in best]


def shown_top(page: Page) -> list[tuple[str, float]]:
    rows: list[list[Any]] = page.eval_on_selector_all(
        "#predictions tr", "rows => rows.map(r => [r.dataset.char, Number(r.dataset.p)])"
    )
    return [(str(c), float(p)) for c, p in rows]


def assert_predictions(page: Page, model: RecurrentModel, text: str) -> None:
    expect(page.locator("#step")).to_have_text(str(len(text)))
    expect(page.locator("#predictions tr")).to_have_count(TOP_K)
    shown, expected = shown_top(page), expected_top(model, text)
    assert [c for c, _ in shown] == [c for c, _ in expected], (shown, expected)
    np.testing.assert_allclose([p for _, p in shown], [p for _, p in expected], atol=1e-4)


def open_page(page: Page, server: LiveServer) -> str:
    page.goto(server.url + "/")
    expect(page.locator("#connection")).to_have_text("open")
    expect(page.locator("#model")).to_have_text("charlm")
    session_id = page.locator("#session-id").inner_text()
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", session_id), session_id
    return session_id


def server_step(server: LiveServer, session_id: str) -> int:
    return int(httpx.get(f"{server.url}/v1/sessions/{session_id}").json()["step"])


# -- the page -----------------------------------------------------------------------------------------
def test_type_edit_reload_reset_new_session(
    page: Page, page_server: LiveServer, charlm: RecurrentModel, tmp_path: Path
) -> None:
    session_id = open_page(page, page_server)
    editor = page.locator("#editor")

    # typing: one chunk per keystroke; the predictions are the model's for the prefix
    text = "def fib(n):\n    if n < 2"
    editor.press_sequentially(text)
    assert_predictions(page, charlm, text)
    assert server_step(page_server, session_id) == len(text)
    page.screenshot(path=os.environ.get("CARRYOVER_PAGE_SCREENSHOT") or str(tmp_path / "page.png"))

    # an edit in the middle resets the session and feeds the whole text again
    editor.press("Home")
    editor.press("Delete")
    edited = text.replace("    if", "   if")
    expect(editor).to_have_value(edited)
    assert_predictions(page, charlm, edited)
    assert server_step(page_server, session_id) == len(edited)

    # reload keeps the session (id in localStorage, state in Redis): same id, same step, and
    # typing goes on from the state carried over
    page.reload()
    assert open_page(page, page_server) == session_id
    expect(editor).to_have_value(edited)
    assert_predictions(page, charlm, edited)
    editor.press("End")
    editor.press_sequentially(":\n        return")
    assert_predictions(page, charlm, edited + ":\n        return")

    # reset: step 0 on the server too, and the next text is read from the initial state
    page.click("#reset")
    expect(page.locator("#step")).to_have_text("0")
    expect(editor).to_have_value("")
    assert server_step(page_server, session_id) == 0
    editor.press_sequentially("import")
    assert_predictions(page, charlm, "import")

    # new session: another id, from step 0
    page.click("#new-session")
    expect(page.locator("#session-id")).not_to_have_text(session_id)
    expect(page.locator("#step")).to_have_text("0")
    other = page.locator("#session-id").inner_text()
    editor.press_sequentially("class")
    assert_predictions(page, charlm, "class")
    assert server_step(page_server, other) == 5 and server_step(page_server, session_id) == len("import")


def test_expired_session_starts_a_new_one(page: Page, page_server: LiveServer, charlm: RecurrentModel) -> None:
    session_id = open_page(page, page_server)
    page.locator("#editor").press_sequentially("x = 1")
    assert_predictions(page, charlm, "x = 1")
    assert httpx.delete(f"{page_server.url}/v1/sessions/{session_id}").status_code == 204  # as if expired
    page.reload()
    expect(page.locator("#session-id")).not_to_have_text(session_id)
    expect(page.locator("#connection")).to_have_text("open")
    page.locator("#editor").press_sequentially("y")
    assert_predictions(page, charlm, "y")


def test_continue_streams_a_generation(page: Page, page_server: LiveServer, charlm: RecurrentModel) -> None:
    session_id = open_page(page, page_server)
    prompt, tokens = "for i in range(", 12
    page.locator("#editor").press_sequentially(prompt)
    assert_predictions(page, charlm, prompt)
    page.fill("#max-tokens", str(tokens))
    page.fill("#temperature", "0")
    page.click("#continue")
    expect(page.locator("#step")).to_have_text(str(len(prompt) + tokens))
    expect(page.locator("#continue")).to_be_enabled()
    text = prompt
    for _ in range(tokens):  # greedy, offline: the most likely character each time
        text += expected_top(charlm, text)[0][0]
    expect(page.locator("#editor")).to_have_value(text)
    assert server_step(page_server, session_id) == len(text)
    page.locator("#editor").press_sequentially(")")
    assert_predictions(page, charlm, text + ")")


def test_with_api_keys_the_page_asks_for_one(
    browser: Browser, redis_server: RedisServer, charlm: RecurrentModel, tmp_path: Path
) -> None:
    key = new_key()
    (tmp_path / "keys").write_text(key_line("browser", key) + "\n")
    with live_server(redis_server.url, {"charlm": charlm}, api_keys_file=tmp_path / "keys") as server:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(20_000)
        asked: list[str] = []

        def answer(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept(key)

        page.on("dialog", answer)
        try:
            session_id = open_page(page, server)
            page.locator("#editor").press_sequentially("print(")
            assert_predictions(page, charlm, "print(")
        finally:
            context.close()
        assert asked == ["This server needs an API key:"]
        url = f"{server.url}/v1/sessions/{session_id}"
        assert httpx.get(url).status_code == 401  # the page's session belongs to its key
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).json()["step"] == len("print(")


# -- /docs offline ------------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in {"src", "href"} and v]


@pytest.mark.parametrize(
    ("path", "assets"),
    [("/docs", {".js": "javascript", ".css": "text/css"}), ("/redoc", {".js": "javascript"})],
)
def test_docs_load_only_local_assets(page_server: LiveServer, path: str, assets: dict[str, str]) -> None:
    html = httpx.get(page_server.url + path)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    links = _Links()
    links.feed(html.text)
    assert "cdn" not in html.text and "fonts.googleapis" not in html.text
    for url in links.urls:
        assert url.startswith("/"), f"{path} loads {url} from elsewhere"
        reply = httpx.get(page_server.url + url)
        assert reply.status_code == 200, url
        for suffix, media_type in assets.items():
            if url.endswith(suffix):
                assert media_type in reply.headers["content-type"] and len(reply.content) > 10_000, url
    assert {s for s in assets if any(u.endswith(s) for u in links.urls)} == set(assets)
    assert httpx.get(page_server.url + "/openapi.json").json()["openapi"].startswith("3.")


def test_docs_render_offline(page: Page, page_server: LiveServer) -> None:
    """Swagger UI renders the schema with every request outside the server blocked."""
    page.route(re.compile(r"^(?!" + re.escape(page_server.url) + ").*"), lambda route: route.abort())
    page.goto(page_server.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("carryover")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()


def test_page_is_html_from_the_package(page_server: LiveServer) -> None:
    reply = httpx.get(page_server.url + "/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert "<script" in reply.text and "//cdn" not in reply.text and "https://" not in reply.text
