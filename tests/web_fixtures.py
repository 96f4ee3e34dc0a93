"""A real browser (Playwright driving Debian's chromium) against a real server on loopback.

Browser tests skip when chromium is absent on a developer's machine, and FAIL when
CI=true: CI must not pass by silently testing nothing (as tests/conftest.py does for
PostgreSQL). Each page is watched for console errors, uncaught exceptions and dialogs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("EPREUVE_CHROMIUM", "/usr/bin/chromium"))
SERIOUS = ("serious", "critical")


def chromium_path() -> str:
    if CHROMIUM.exists():
        return str(CHROMIUM)
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"no chromium at {CHROMIUM}: CI installs Debian's chromium "
                    "(apt-get install chromium)")
    pytest.skip("no chromium: apt-get install chromium to run the browser tests")


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable,
                                              args=["--no-sandbox"])
        yield instance
        instance.close()


@dataclass
class Watched:
    """A page and what it said: console errors, uncaught exceptions, dialogs opened."""

    page: object
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def goto_refused(self, path: str, status: int):
        """Open a page the server refuses with `status` (an error page): chromium logs
        that one refusal on the console, and only that one is expected."""
        before = len(self.errors)
        response = self.page.goto(path)
        assert response.status == status, (path, response.status)
        refusal = f"the server responded with a status of {status}"
        new = self.errors[before:]
        expected = [e for e in new if refusal in e]
        assert len(expected) == 1, new
        self.errors[before:] = [e for e in new if e is not expected[0]]
        return response

    def assert_quiet(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs


def watched_page(browser, base_url: str) -> Watched:
    context = browser.new_context(base_url=base_url)
    page = context.new_page()
    watched = Watched(page)
    page.on("console", lambda message: watched.errors.append(message.text)
            if message.type == "error" else None)
    page.on("pageerror", lambda error: watched.errors.append(f"uncaught: {error}"))

    def dialog(d) -> None:
        watched.dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    return watched


def sign_in(watched: Watched, token: str) -> None:
    page = watched.page
    page.goto("/sign-in")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_load_state()


def serious_violations(page) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [f"{v['id']}: {v['help']} ({len(v['nodes'])} node(s): "
            f"{[n['target'] for n in v['nodes']][:3]})"
            for v in results.response["violations"] if v.get("impact") in SERIOUS]
