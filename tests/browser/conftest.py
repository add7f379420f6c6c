"""Headless Chromium (Debian's package, installed by scripts/browser) driven by Playwright,
against the real dashboard server, relay and workers.

Missing chromium skips on a laptop and fails in CI (CI=true), like a missing service.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from saga.dashboard.server import DashboardServer
from saga.settings import Settings
from tests.conftest import unavailable
from tests.processes import ROOT, ProcessGroup

CHROMIUM = os.environ.get("SAGA_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
# A busy CI machine: an assertion on a page waits up to this long for it to hold.
expect.set_options(timeout=15_000)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# Per module, not per session: Playwright's sync API holds an event loop on the main thread
# while it is open, and later tests' asyncio.run() refuses to start under it.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        unavailable("chromium", FileNotFoundError(f"{CHROMIUM} (scripts/browser installs it)"))
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    p = context.new_page()
    yield p
    context.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def engine(settings: Settings, procs: ProcessGroup) -> Settings:
    """A relay and a worker on the test's database and queue."""
    procs.relay(settings)
    procs.worker(settings, "w1")
    return settings


@pytest.fixture
def dashboard(settings: Settings) -> Iterator[DashboardServer]:
    with DashboardServer(settings, port=0, refresh_seconds=1) as server:
        server.start()
        yield server
