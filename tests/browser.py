"""Browser test tooling: Debian's Chromium, headless, driven by Playwright, and the dashboard's sign-in step.

It never downloads browsers and never skips: a missing Chromium or Playwright is an error that says how to install it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
# Tests run as root in containers: Chromium's sandbox needs a user namespace there, and /dev/shm is often tiny.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage"]
SETTLED_STATES = ("ready", "error")


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A fresh page in a headless Chromium that is closed afterwards."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium`.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise RuntimeError(
            "Playwright is not importable: `pip install playwright==1.65.2` into this venv "
            "(no `playwright install`: the tests use /usr/bin/chromium)."
        ) from error
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_context().new_page()
        finally:
            browser.close()


def body_state(page: Page) -> str:
    return str(page.evaluate("() => document.body.dataset.state"))


def wait_for_state(page: Page, states: tuple[str, ...], timeout_ms: float = 10_000) -> str:
    """Waits until body[data-state] is one of ``states`` and returns it."""
    page.wait_for_function(
        "states => states.includes(document.body.dataset.state)", arg=list(states), timeout=timeout_ms
    )
    return body_state(page)


def sign_in(page: Page, base_url: str, key: str, timeout_ms: float = 10_000) -> None:
    """Opens the dashboard, signs in with ``key`` and waits until it is ready; raises with the page's error if not."""
    page.goto(f"{base_url}/dashboard")
    # A key remembered by this tab loads at once; sign out first so this sign-in is the one that counts.
    if wait_for_state(page, ("signed-out", *SETTLED_STATES), timeout_ms) != "signed-out":
        page.click("#sign-out")
        wait_for_state(page, ("signed-out",), timeout_ms)
    page.fill("#api-key", key)
    page.click("#sign-in")
    if wait_for_state(page, SETTLED_STATES, timeout_ms) == "error":
        raise RuntimeError(f"dashboard sign-in failed: {page.text_content('#error')!r}")
