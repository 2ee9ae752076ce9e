"""The web page in a real browser (Debian's headless Chromium through Playwright) against
the real stack: paste a token, upload a photo, watch it complete, see the image; then a
blocked render and its message."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import png_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium for the browser test: apt-get install chromium")
    pytest.skip("no chromium here: apt-get install chromium", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def page(tmp_path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser.new_page(viewport={"width": 1100, "height": 1300})
        browser.close()


def test_upload_watch_and_see_the_result_then_a_block(page, web_url, make_user, tmp_path):
    _, token = make_user(balance=5, locale="en")
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes((320, 200), "teal"))

    streams = []
    page.on("request", lambda request: streams.append(request.url) if request.url.endswith("/events") else None)
    page.goto(web_url + "/")
    page.fill("#token", token)
    page.click("#token-form button")
    expect(page.locator("#account")).to_contain_text("5 of 5 credits available")

    page.set_input_files("#file", str(photo))
    page.select_option("#style", "pixelate")
    page.fill("#prompt", "[fail:1]")
    page.click("#submit")
    expect(page.locator("#job-status")).to_contain_text("completed (succeeded)", timeout=30_000)
    expect(page.locator("#job-attempts")).to_have_text("2")
    result = page.locator("#job-result")
    expect(result).to_be_visible()
    assert page.evaluate("document.getElementById('job-result').naturalWidth") == 320
    expect(page.locator("#jobs tr")).to_have_count(1)
    expect(page.locator("#notifications li")).to_contain_text("succeeded")
    assert streams and page.locator("#job-card").get_attribute("data-live") == "events"  # live, not polled
    expect(page.locator("#notifications li a")).to_have_text("result")
    page.screenshot(path=str(tmp_path / "1-completed.png"), full_page=True)

    page.fill("#prompt", "[block:CONTENT_SAFETY_VIOLATION]")
    page.click("#submit")
    expect(page.locator("#job-status")).to_contain_text("completed (blocked)", timeout=30_000)
    expect(page.locator("#job-message")).to_have_text(
        "🚫 Sorry, this image cannot be processed for safety reasons. Please choose another photo.")
    expect(page.locator("#job-result")).to_be_hidden()
    expect(page.locator("#notifications li").first).to_contain_text("safety reasons")
    expect(page.locator("#jobs tr").first).to_contain_text("completed (blocked)")
    # the sign is drawn, not left to an emoji font this machine lacks
    assert page.evaluate("getComputedStyle(document.querySelector('#job-message .no-entry')).borderTopStyle") == "solid"
    expect(page.locator("#account")).to_contain_text("4 of 4 credits available")  # the block cost nothing
    page.screenshot(path=str(tmp_path / "2-blocked.png"), full_page=True)

    page.reload()  # the token was kept in localStorage
    expect(page.locator("#account")).to_contain_text("credits available")
    expect(page.locator("#jobs tr")).to_have_count(2)
