"""The gallery in a real browser: Debian's headless Chromium driven by Playwright (the system
browser as its executable: `make install` installs it where apt and root are available). A job
submitted from the page shows its progress, its image appears in the grid, the prompt filter
narrows the grid, the detail view shows the command line and runs the output again with an
edited prompt, an audio output plays, and a prompt holding <script> stays text."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = next((p for p in (os.environ.get("STUDIO_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)
if CHROMIUM is None:
    pytest.skip("no chromium: `make install` installs Debian's (apt-get install chromium) where apt and root exist",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "gallery.png"


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny):
    """A server on a free loopback port over a gallery folder holding a hum (WAV) and an image
    whose prompt is an XSS attempt."""
    from studio.outputs import OutputWriter, Result
    from studio.server.app import Background, Server, create_app
    from studio.server.security import Policy

    folder = tmp_path_factory.mktemp("browser-gallery")
    t = np.linspace(0, 2, 16000, dtype=np.float32)
    OutputWriter(folder, task="music-audio").write(Result(
        kind="audio", value=(0.4 * np.sin(2 * np.pi * 330 * t) * np.minimum(1, 4 * t), 8000),
        params={"prompt": "a calm hum in A", "seed": 4}, extra={"model": {"name": "musicgen-tiny"}}))
    from PIL import Image

    OutputWriter(folder, task="image").write(Result(
        kind="image", value=Image.new("RGB", (64, 64), (200, 40, 40)),
        params={"prompt": "<script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>", "seed": 9},
        extra={"model": {"name": "tiny-sd"}}))
    server = Server(Policy(roots=[folder]))
    with Background(create_app(server)) as url:
        yield url, str(tiny("sd")), folder


@pytest.fixture(scope="module")
def page(site):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox"])
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        tab = context.new_page()
        tab.dialogs = []
        tab.on("dialog", lambda d: (tab.dialogs.append(d.message), d.dismiss()))
        tab.console_errors = []
        tab.on("console", lambda m: tab.console_errors.append(m.text) if m.type == "error" else None)
        tab.goto(site[0] + "/")
        yield tab
        browser.close()


def cards(page):
    return page.locator("#grid figure.card")


def test_submit_from_the_page_watch_progress_and_see_the_image(site, page):
    url, model, folder = site
    sync_api.expect(cards(page)).to_have_count(2)
    page.fill("#new-prompt", "a yellow star")
    page.fill("#new-model", model)
    page.fill("#new-steps", "3")
    page.click("#new-submit")
    job = page.locator("#jobs .job").first
    sync_api.expect(job).to_be_visible()
    # the bar fills as the denoising steps come in, then the row says done
    sync_api.expect(job.locator(".job-status")).to_have_text("done: 1 output(s)", timeout=120_000)
    assert job.locator("progress").evaluate("p => [p.value, p.max]") == [3, 3]
    sync_api.expect(cards(page)).to_have_count(3)
    first = cards(page).first
    sync_api.expect(first.locator(".prompt")).to_have_text("a yellow star")
    page.wait_for_function("() => { const img = document.querySelector('#grid figure.card img');"
                           " return img.complete && img.naturalWidth > 0; }", timeout=15_000)
    assert first.locator("img").evaluate("img => img.naturalWidth") == 192  # the 64 px image, 3x in whole pixels
    assert len(list(folder.glob("*a-yellow-star.png"))) == 1


def test_filter_by_prompt(site, page):
    page.fill("#filter-q", "yellow")
    sync_api.expect(cards(page)).to_have_count(1)
    sync_api.expect(cards(page).first.locator(".prompt")).to_have_text("a yellow star")
    page.fill("#filter-q", "no such prompt")
    sync_api.expect(cards(page)).to_have_count(0)
    page.fill("#filter-q", "")
    page.select_option("#filter-task", "music-audio")
    sync_api.expect(cards(page)).to_have_count(1)
    page.select_option("#filter-task", "")
    sync_api.expect(cards(page)).to_have_count(3)


def test_detail_view_and_run_again_with_an_edited_prompt(site, page):
    page.locator("#grid figure.card", has_text="a yellow star").click()
    dialog = page.locator("#detail")
    sync_api.expect(dialog).to_be_visible()
    command = page.locator("#detail-command").text_content()
    assert command.startswith("studio image 'a yellow star' --model ") and "--steps 3" in command
    assert '"seed"' in page.locator("#detail-meta").text_content()
    page.click("#detail-copy")
    sync_api.expect(page.locator("#copied")).to_be_visible()
    page.fill("#again-fields textarea[name=prompt]", "a yellow star, again")
    page.click("#again-submit")
    status = page.locator("#again-progress .job-status")
    sync_api.expect(status).to_have_text("done: 1 output(s)", timeout=120_000)
    page.click("#detail-close")
    sync_api.expect(cards(page)).to_have_count(4)
    sync_api.expect(cards(page).first.locator(".prompt")).to_have_text("a yellow star, again")


def test_a_bad_job_from_the_page_shows_the_error_line_and_hint(site, page):
    page.fill("#new-prompt", "x")
    page.fill("#new-model", site[1])
    page.fill("#new-steps", "0")
    page.click("#new-submit")
    sync_api.expect(page.locator("#error")).to_have_text("error: --steps 0 must be at least 1\nhint: e.g. --steps 20 (turbo models: 1-4)")


def test_audio_plays_in_the_detail_view(site, page):
    page.locator("#grid figure.card", has_text="a calm hum").click()
    audio = page.locator("#detail-media audio")
    sync_api.expect(audio).to_be_visible()
    page.wait_for_function("() => document.querySelector('#detail-media audio').readyState >= 2", timeout=15_000)
    assert audio.evaluate("a => a.duration") == pytest.approx(2.0, abs=0.05)
    audio.evaluate("a => a.play()")
    page.wait_for_function("() => document.querySelector('#detail-media audio').currentTime > 0.2", timeout=15_000)
    assert audio.evaluate("a => !a.paused")
    audio.evaluate("a => a.pause()")
    assert page.locator("#detail-media img.wave").evaluate("img => img.naturalWidth") == 256
    page.click("#detail-close")


def test_a_prompt_holding_script_is_shown_as_text(site, page):
    card = page.locator("#grid figure.card", has_text="<script>")
    sync_api.expect(card).to_have_count(1)
    assert "<script>window.__pwned = 1</script>" in card.locator(".prompt").text_content()
    card.click()
    sync_api.expect(page.locator("#detail-title")).to_contain_text("<img src=x onerror")
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("#detail script, #grid script, #detail-title img").count() == 0
    assert page.dialogs == []
    page.click("#detail-close")
    assert not [e for e in page.console_errors if "Content Security Policy" in e]


def test_screenshot_for_the_readme(site, page):
    """The README's picture of the gallery, taken by this browser (written only when asked:
    STUDIO_SCREENSHOT=1, so a test run leaves the repository alone)."""
    page.fill("#filter-q", "")
    page.wait_for_timeout(300)
    shot = page.screenshot(full_page=False)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    if os.environ.get("STUDIO_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(shot)
