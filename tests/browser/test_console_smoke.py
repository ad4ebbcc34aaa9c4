"""The console starts, serves its assets itself, and shows the signed-in person."""

from __future__ import annotations

from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.conftest import ConsoleThread
from tests.conftest import ServerThread


def test_console_serves_its_pages_and_assets_without_internet(
    server: ServerThread, make_console: Callable[[ServerThread], ConsoleThread], page: Page
) -> None:
    console = make_console(server)
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(console.url) else outside.append(r.url))
    page.goto(console.url + "/")
    expect(page.locator("#signed-in-as")).to_contain_text("admin")
    assert outside == [], f"the console asked for assets elsewhere: {outside}"
