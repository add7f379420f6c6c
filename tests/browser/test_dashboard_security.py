"""The dashboard is safe to expose: escaped payloads, CSRF and origin checks, a token off
loopback, a read-only mode, and security headers; each tried from a real browser."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect
from pydantic import SecretStr

from saga import SagaClient, Settings
from saga.dashboard.server import DashboardServer
from saga.errors import ConfigurationError
from tests import coordinator_sagas as cs
from tests import dashboard_sagas as ds

Conn = psycopg.Connection[Any]


def test_a_script_in_a_step_result_renders_as_text(
    engine: Settings, dashboard: DashboardServer, page: Page
) -> None:
    with SagaClient(engine) as client:
        run_id = client.start(ds.hostile_result, {"note": "<b>bold?</b>"}, run_id="hostile")
        assert client.wait(run_id, timeout=60).state == "completed"
    page.goto(f"{dashboard.url}/runs/{run_id}")
    result = page.locator('#steps section[data-step="hostile"] pre[data-field="result"]')
    expect(result).to_contain_text("<script>window.__pwned = 1</script>")
    expect(result).to_contain_text('<img src=x onerror=\\"window.__pwned=2\\">')
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#steps script, #steps img").count() == 0
    expect(page.locator('pre[data-field="input"]').last).to_contain_text("<b>bold?</b>")

    # A big result is cut, with a download of the whole of it.
    big = page.locator('#steps section[data-step="big_answer"] pre[data-field="result"]')
    expect(big).to_contain_text("characters)")
    link = page.locator('#steps section[data-step="big_answer"] a.download')
    with page.expect_download() as download:
        link.click()
    whole = download.value.path().read_text()
    assert "line 0299 of a long answer" in whole
    assert "line 0299" not in big.inner_text()


def test_pages_carry_security_headers(dashboard: DashboardServer, page: Page) -> None:
    response = page.goto(dashboard.url + "/")
    assert response is not None
    headers = response.headers
    assert headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    cookie = next(c for c in page.context.cookies() if c["name"] == "saga_dashboard")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


class _EvilSite:
    """Another origin (another port) serving a form that posts to the dashboard."""

    def __init__(self, target: str) -> None:
        body = (
            f'<form id="evil" method="post" action="{target}">'
            '<input type="hidden" name="csrf" value="guessed">'
            '<button id="go">win a prize</button></form>'
        ).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://localhost:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def failed_run(engine: Settings, tmp_path: Any) -> str:
    with SagaClient(engine) as client:
        run_id = client.start(ds.fixable, {"marker": str(tmp_path / "never")})
        assert client.wait(run_id, timeout=60).state == "failed"
    return run_id


def test_a_cross_site_post_is_refused(
    failed_run: str, dashboard: DashboardServer, page: Page, db: Conn
) -> None:
    page.goto(dashboard.url + "/")  # the user has a session with the dashboard
    evil = _EvilSite(f"{dashboard.url}/runs/{failed_run}/retry")
    try:
        page.goto(evil.url)
        page.click("#go")
        expect(page.locator("#error")).to_contain_text("cross-site request refused")
    finally:
        evil.close()
    # Without the browser's headers: the CSRF token is still required.
    response = page.request.post(
        f"{dashboard.url}/runs/{failed_run}/retry", form={"csrf": "guessed"}
    )
    assert response.status == 403
    assert "CSRF token" in response.text()
    response = page.request.post(
        f"{dashboard.url}/api/runs/{failed_run}/retry",
        data="{}",
        headers={"Origin": "http://evil.example", "Content-Type": "application/json"},
    )
    assert response.status == 403
    assert db.execute(
        "SELECT state FROM saga_runs WHERE run_id = %s", (failed_run,)
    ).fetchone() == ("failed",)

    # The page's own token works through the API too.
    page.goto(f"{dashboard.url}/runs/{failed_run}/confirm/retry")
    csrf = page.locator('input[name="csrf"]').get_attribute("value")
    assert csrf
    response = page.request.post(
        f"{dashboard.url}/api/runs/{failed_run}/retry",
        data="{}",
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert response.status == 200, response.text()
    assert response.json()["action"] == "retry"


def test_a_token_is_required_off_loopback(settings: Settings, browser: Browser, db: Conn) -> None:
    with pytest.raises(ConfigurationError, match="SAGA_DASHBOARD_TOKEN"):
        DashboardServer(settings, host="0.0.0.0", port=0)

    token = "s3cret-token-for-the-test"
    guarded = settings.model_copy(update={"dashboard_token": SecretStr(token)})
    with SagaClient(settings) as client:
        run_id = client.start(cs.approval, {"item": "x"}, run_id="guarded-run")
    with DashboardServer(guarded, host="0.0.0.0", port=0, refresh_seconds=0) as server:
        server.start()
        port = server.httpd.server_address[1]
        base = f"http://127.0.0.1:{port}"
        context = browser.new_context()
        page = context.new_page()
        try:
            # No token: the API answers 401, pages send to the login form.
            assert page.request.get(base + "/api/runs").status == 401
            assert page.request.get(f"{base}/api/runs/{run_id}").status == 401
            page.goto(f"{base}/runs/{run_id}")
            expect(page.locator("#login-form")).to_be_visible()
            page.fill('input[name="token"]', "wrong")
            page.click('#login-form button[type="submit"]')
            expect(page.locator(".flash.error")).to_have_text("wrong token")
            page.fill('input[name="token"]', token)
            page.click('#login-form button[type="submit"]')
            expect(page.locator("#run-id")).to_have_text(run_id)  # back where it was going
            # Logged in: actions work; logging out ends the session.
            page.click("header form button")
            expect(page.locator("#login-form")).to_be_visible()
            assert page.request.get(base + "/api/runs").status == 401

            # A Bearer token serves scripts, without cookies or CSRF tokens.
            bearer = {"Authorization": f"Bearer {token}"}
            listed = page.request.get(base + "/api/runs", headers=bearer)
            assert listed.status == 200
            assert [r["run_id"] for r in listed.json()["runs"]] == [run_id]
            wrong = page.request.get(base + "/api/runs", headers={"Authorization": "Bearer no"})
            assert wrong.status == 401
            cancelled = page.request.post(
                f"{base}/api/runs/{run_id}/cancel",
                data='{"reason": "by a script"}',
                headers={**bearer, "Content-Type": "application/json"},
            )
            assert cancelled.status == 200, cancelled.text()
        finally:
            context.close()
    with SagaClient(settings) as client:
        assert client.wait(run_id, timeout=60).state in ("cancelled", "compensated")


@pytest.fixture
def read_only_dashboard(settings: Settings) -> Iterator[DashboardServer]:
    with DashboardServer(settings, port=0, read_only=True) as server:
        server.start()
        yield server


def test_read_only_mode_has_no_actions(
    failed_run: str, read_only_dashboard: DashboardServer, page: Page, db: Conn
) -> None:
    base = read_only_dashboard.url
    page.goto(f"{base}/runs/{failed_run}")
    expect(page.locator("header .badge.ro")).to_have_text("read-only")
    expect(page.locator("#actions")).to_have_count(0)
    expect(page.locator(".fork-link")).to_have_count(0)
    page.goto(f"{base}/runs/{failed_run}/confirm/retry")
    expect(page.locator("#error")).to_contain_text("read-only")
    response = page.request.post(f"{base}/api/runs/{failed_run}/retry", data="{}")
    assert response.status == 403
    assert db.execute(
        "SELECT state FROM saga_runs WHERE run_id = %s", (failed_run,)
    ).fetchone() == ("failed",)


def test_a_token_less_dashboard_answers_only_to_loopback_names(
    dashboard: DashboardServer, page: Page
) -> None:
    port = dashboard.httpd.server_address[1]
    rebound = page.request.get(
        f"http://127.0.0.1:{port}/api/runs", headers={"Host": f"evil.example:{port}"}
    )
    assert rebound.status == 403
    assert "loopback" in rebound.json()["error"]


def test_the_login_redirect_and_the_request_body_are_read_strictly(settings: Settings) -> None:
    """A ``next`` with a control character split the Location header in two (a forged cookie)
    or became ``//evil.example`` once the browser dropped a tab; a negative Content-Length made
    the server wait for the client to close the connection."""
    token = "s3cret-token-for-the-test"
    guarded = settings.model_copy(update={"dashboard_token": SecretStr(token)})
    with DashboardServer(guarded, host="127.0.0.1", port=0, refresh_seconds=0) as server:
        server.start()
        port = server.httpd.server_address[1]
        for target, expected in [
            ("/\r\nSet-Cookie: forged=1", "/"),
            ("/\t/evil.example", "/"),
            ("//evil.example", "/"),
            ("/runs?state=failed&saga=a_b", "/runs?state=failed&saga=a_b"),
        ]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            form = urlencode({"token": token, "next": target})
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            conn.request("POST", "/login", body=form, headers=headers)
            response = conn.getresponse()
            assert response.status in (302, 303), response.read()
            assert response.getheader("Location") == expected
            cookies = response.msg.get_all("Set-Cookie") or []
            assert cookies and not [c for c in cookies if "forged" in c]
            conn.close()

        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall(
                b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\ntoken=x"
            )
            # Not closing our side: before, the server read until we did (read(-1)).
            status_line = raw.recv(200).split(b"\r\n")[0]
            assert b" 400 " in status_line, status_line
