"""Debian's chromium under Playwright, for the console's browser tests (never a browser Playwright downloads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"

expect.set_options(timeout=60_000)  # generations on a shared 2-core CPU


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Debian chromium; `make install` installs it (apt package chromium)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make install` (Debian package chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def console_page(browser: Browser, base_url: str) -> Iterator[Page]:
    """A new browser session (no key kept) on `base_url`; fails on any script error or CSP violation in the page."""
    context: BrowserContext = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base_url)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield page
    finally:
        context.close()
    assert not problems


def sign_in(page: Page, key: str, at: str = "") -> None:
    """Open the console at `at` (a #/route) and give it `key`."""
    page.goto(f"/console/{at}")
    page.fill("#api-key", key)
    page.click("#login button[type=submit]")
    expect(page.locator("#nav")).to_be_visible()
