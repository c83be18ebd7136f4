"""The page in a real browser: Chromium from the OS packages, driven by Playwright (no browser download).

Skips, saying why, where Chromium or Playwright is missing (CI installs both: .ci/run).
"""
import shutil
import signal

import pytest

from tests.helpers import PALETTE, make_video

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


def test_search_cards_timeline_and_playback_from_the_highlight(cli, tmp_path, browser):
    from tests.serve.conftest import Server

    library = tmp_path / "webm"            # VP9 in WebM: a codec the browser plays
    for i in range(3):
        make_video(library / f"clip{i}.webm", [PALETTE[i], PALETTE[i + 1], PALETTE[i + 2], PALETTE[i]],
                   seconds_per_color=2.0, codec="libvpx-vp9", size=(128, 64))
    assert cli.ingest(library)[0] == 0
    server = Server(cli.index, tmp_path / "home")
    try:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url("/"))
        page.fill("#q", "a green screen")
        page.press("#q", "Enter")
        page.wait_for_selector(".card")
        cards = page.locator(".card")
        assert cards.count() == 3
        assert "videos in" in page.inner_text("#status")
        first = cards.nth(0)
        assert first.locator("img").evaluate("img => img.complete && img.naturalWidth > 0 || new Promise(r => "
                                             "img.onload = () => r(img.naturalWidth > 0))")
        ranges = first.locator(".timeline .range")
        assert ranges.count() >= 1
        start = float(first.get_attribute("data-start"))
        spans = [(float(r.get_attribute("data-start")), float(r.get_attribute("data-end")))
                 for r in ranges.all()]
        width = ranges.nth(0).evaluate("el => el.getBoundingClientRect().width")
        assert width > 0 and start == spans[0][0]
        first.click()
        page.wait_for_function("() => { const v = document.getElementById('video'); "
                               "return v.readyState >= 1 && !v.seeking && v.currentTime > 0 || "
                               f"(v.readyState >= 1 && {start} === 0); }}", timeout=30000)
        now = page.evaluate("() => document.getElementById('video').currentTime")
        lo, hi = spans[0]
        assert lo - 0.05 <= now <= hi + 0.5, (now, spans)   # playing from the highlight's start
        assert not errors, errors
    finally:
        server.stop(signal.SIGTERM)
