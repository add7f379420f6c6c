"""The dashboard's pure parts: escaping, sessions and CSRF tokens, cross-site checks, filters,
the run page's parts (usage, waits, graphs, limits)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from saga.dashboard import run_page
from saga.dashboard.app import _local
from saga.dashboard.html import Html, esc, h, join
from saga.dashboard.run_data import read_back, worker_process
from saga.dashboard.run_page import pretty
from saga.dashboard.security import Guard, check_bind, cross_site, host_is_loopback, is_loopback
from saga.dashboard.source import FilterError, list_params
from saga.errors import ConfigurationError


def test_values_are_escaped_and_markup_is_not() -> None:
    assert esc("<script>alert('x')</script>") == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert h('<a title="{}">{}</a>', '" onmouseover="x', "<b>") == (
        '<a title="&quot; onmouseover=&quot;x">&lt;b&gt;</a>'
    )
    inner = h("<b>{}</b>", "&")
    assert h("<p>{}</p>", inner) == "<p><b>&amp;</b></p>"  # built markup is not escaped twice
    assert join([inner, "<i>"]) == "<b>&amp;</b>&lt;i&gt;"
    assert isinstance(join([]), Html)


def test_large_payloads_are_cut_with_a_download_link() -> None:
    small = pretty({"a": "<x>"}, run_id="r1", step_key="s#1", field="result")
    assert "&lt;x&gt;" in small and "download" not in small
    big = pretty("y" * 10_000, run_id="r1", step_key="s#1", field="result")
    assert 'href="/runs/r1/download?field=result&amp;step=s%231"' in big
    assert "10,002 characters" in big


def test_sessions_are_signed_and_csrf_tokens_belong_to_one_session() -> None:
    guard = Guard("tok")
    session = guard.new_session(logged_in=True)
    cookie = f"saga_dashboard={guard.cookie_value(session)}"
    assert guard.session_from(cookie) == session
    forged = cookie.replace(".1.", ".0.") if ".1." in cookie else cookie + "x"
    assert guard.session_from(forged) is None
    assert guard.session_from("saga_dashboard=abc.1.deadbeef") is None
    assert Guard("tok").session_from(cookie) is None  # another server's key
    other = guard.new_session(logged_in=True)
    assert guard.csrf_token(session) != guard.csrf_token(other)

    verdict = guard.judge({"cookie": cookie, "host": "h"}, host_ok=False)
    assert verdict.allowed
    headers = {"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "same-origin"}
    assert guard.may_change(verdict, headers, guard.csrf_token(session)) == ""
    assert "does not match" in guard.may_change(verdict, headers, guard.csrf_token(other))
    assert "missing" in guard.may_change(verdict, headers, None)


def test_a_token_is_checked_for_bearer_requests_and_logins() -> None:
    guard = Guard("tok")
    assert guard.judge({"authorization": "Bearer tok"}, host_ok=False).allowed
    assert not guard.judge({"authorization": "Bearer nope"}, host_ok=False).allowed
    assert not guard.judge({}, host_ok=True).allowed
    logged_out = guard.new_session(logged_in=False)
    cookie = {"cookie": f"saga_dashboard={guard.cookie_value(logged_out)}"}
    assert not guard.judge(cookie, host_ok=True).allowed
    open_guard = Guard(None)
    assert open_guard.judge({}, host_ok=True).allowed
    assert not open_guard.judge({}, host_ok=False).allowed  # a rebound name


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"host": "h:1"}, False),
        ({"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "same-origin"}, False),
        ({"host": "h:1", "sec-fetch-site": "none"}, False),
        ({"host": "h:1", "sec-fetch-site": "same-site"}, True),
        ({"host": "h:1", "sec-fetch-site": "cross-site"}, True),
        ({"host": "h:1", "origin": "http://evil:1"}, True),
        ({"host": "h:1", "origin": "null"}, True),
    ],
)
def test_cross_site_requests_are_recognised(headers: dict[str, str], refused: bool) -> None:
    assert bool(cross_site(headers)) is refused


def test_binding_beyond_loopback_needs_a_token() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ConfigurationError, match="SAGA_DASHBOARD_TOKEN"):
            check_bind(host, None)
        check_bind(host, "a-token")
    assert host_is_loopback("127.0.0.1:8180") and host_is_loopback("[::1]:80")
    assert not host_is_loopback("evil.example:8180") and not host_is_loopback(None)


def test_redirects_after_login_stay_on_the_dashboard() -> None:
    assert _local("/runs/x") == "/runs/x"
    assert _local("/runs?state=failed&saga=a_b") == "/runs?state=failed&saga=a_b"
    control = ("/\r\nSet-Cookie: a=b", "/\t/evil.example", "/x\x00", "/caf\u00e9")
    for bad in (None, "", "https://evil.example/", "//evil.example/x", "/\\evil.example", *control):
        assert _local(bad) == "/"


def test_list_filters_are_read_from_the_query_string() -> None:
    params, flt, cursor = list_params(
        {
            "state": ["failed", "compensated", "failed"],
            "saga": ["book_trip"],
            "created_since": ["2026-12-04T20:30"],
            "order": ["oldest"],
            "limit": ["10"],
            "cursor": ["abc"],
        }
    )
    assert flt.states == ("failed", "compensated")
    assert flt.saga == "book_trip"
    assert flt.created_since == dt.datetime(2026, 12, 4, 20, 30, tzinfo=dt.UTC)
    assert params.order == "oldest" and params.limit == 10 and cursor == "abc"
    assert "state=failed&state=compensated" in params.query()
    for bad in (
        {"state": ["done"]},
        {"order": ["up"]},
        {"limit": ["0"]},
        {"created_until": ["soon"]},
    ):
        with pytest.raises(FilterError):
            list_params(bad)


def test_steps_completed_before_a_resumption_were_read_from_the_journal() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    run = {"created_at": t0.isoformat()}
    resumed = [t0 + dt.timedelta(seconds=10)]
    done = {"state": "completed", "finished_at": (t0 + dt.timedelta(seconds=5)).isoformat()}
    later = {"state": "completed", "finished_at": (t0 + dt.timedelta(seconds=15)).isoformat()}
    copied = {"state": "completed", "finished_at": (t0 - dt.timedelta(seconds=1)).isoformat()}
    assert "after the run resumed" in read_back(done, run, resumed)
    assert read_back(later, run, resumed) == ""
    assert read_back({**done, "state": "failed"}, run, resumed) == ""
    assert "forked" in read_back(copied, run, [])
    assert worker_process("vm:123:abcd:ef01") == "vm:123"
    assert worker_process(None) == "(no worker)"


def test_the_run_page_shows_usage_the_trace_link_and_waits() -> None:
    from saga.dashboard.pages import Chrome
    from saga.dashboard.run_page import render

    t0 = "2026-01-01T00:00:00+00:00"
    detail = {
        "run_id": "r1",
        "saga": "agent",
        "saga_version": "1",
        "state": "running",
        "input": {"q": "<i>"},
        "result": None,
        "error": None,
        "created_at": t0,
        "updated_at": t0,
        "finished_at": None,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "steps": [
            {
                "step_key": "decide#1",
                "name": "decide",
                "kind": "action",
                "state": "completed",
                "input": {},
                "result": {
                    "object": "saga.completion",
                    "model": "m-1",
                    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
                },
                "error": None,
                "max_attempts": 3,
                "created_at": t0,
                "started_at": t0,
                "finished_at": t0,
                "attempts": [
                    {
                        "attempt": 1,
                        "worker": "h:1:b:d",
                        "claimed_at": t0,
                        "finished_at": t0,
                        "outcome": "completed",
                    }
                ],
            }
        ],
        "events": [],
        "waits": [
            {
                "kind": "event",
                "step_key": "approval#2",
                "name": "approval",
                "since": t0,
                "due_at": None,
            }
        ],
        "usage": {
            "calls": 1,
            "total": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
            "by_step": {},
        },
    }
    chrome = Chrome(read_only=False, logged_in=False, csrf="c")
    page = render(
        detail,
        chrome,
        trace_url_template="https://t.example/trace/{trace_id}?x=1&y=2",
        flash=None,
        prices={"m-1": (1000.0, 2000.0)},
    )
    assert 'href="https://t.example/trace/4bf92f3577b34da6a3ce929d0e0e4736?x=1&amp;y=2"' in page
    assert "1 completion(s): <b>17</b> tokens (12 prompt, 5 completion)" in page
    assert '<b id="cost">$0.022000</b>' in page  # 12 * 1000 / 1e6 + 5 * 2000 / 1e6
    assert 'data-name="approval"' in page and "event wait" in page
    assert "&lt;i&gt;" in page and "<i>" not in page
    assert 'id="action-event"' in page and 'id="action-retry"' not in page
    plain = render(
        detail,
        Chrome(read_only=True, logged_in=False, csrf=""),
        trace_url_template=None,
        flash=None,
    )
    assert '<code id="trace-id">4bf92f3577b34da6a3ce929d0e0e4736</code>' in plain
    assert 'id="actions"' not in plain
    assert "no price for m-1 (set SAGA_TOKEN_PRICES" in plain


def test_a_graph_is_drawn_in_layers_with_fan_out_branches_summed_up() -> None:
    from saga.dashboard.run_timeline import graph_layers

    steps = [
        {"step_key": "split", "state": "completed"},
        {"step_key": "square[0]", "state": "completed"},
        {"step_key": "square[1]", "state": "completed"},
        {"step_key": "square[2]", "state": "running"},
    ]
    graph = {"split": (), "square": ("split",), "total": ("square",)}
    html = graph_layers(steps, graph)
    layers = html.split('<div class="layer">')[1:]
    assert [('data-step="split"' in x, 'data-step="square"' in x) for x in layers[:2]] == [
        (True, False),
        (False, True),
    ]
    assert "2\u00d7 <span" in layers[1] and "1\u00d7 <span" in layers[1]
    assert "not scheduled" in layers[2] and "after square" in layers[2]


def test_a_throttled_step_shows_its_state_and_the_limit_it_waits_for() -> None:
    from saga.dashboard.pages import Chrome
    from saga.dashboard.run_page import render

    t0 = "2026-01-01T00:00:00+00:00"
    limit = {
        "gate": "c:svc:acme",
        "kind": "concurrency",
        "name": "svc",
        "key": "acme",
        "limit": 3,
        "period": None,
        "units": None,
        "run_level": False,
        "status": "waiting",
        "since": t0,
        "place": 2,
        "in_line": 5,
        "in_use": 3,
        "paused_until": None,
    }
    rate = {
        **limit,
        "gate": "r:llm:acme",
        "kind": "rate",
        "name": "llm",
        "limit": 50,
        "period": 60.0,
        "units": 8,
        "status": None,
        "place": None,
        "in_use": None,
    }
    step = {
        "step_key": "call",
        "name": "call",
        "kind": "action",
        "state": "throttled",
        "input": {},
        "result": None,
        "error": None,
        "max_attempts": 3,
        "created_at": t0,
        "started_at": None,
        "finished_at": None,
        "attempts": [],
        "limits": [limit, rate],
    }
    detail = {
        "run_id": "r1",
        "saga": "per_tenant",
        "saga_version": "1",
        "state": "running",
        "input": {},
        "result": None,
        "error": None,
        "created_at": t0,
        "updated_at": t0,
        "finished_at": None,
        "steps": [step, {**step, "step_key": "done", "state": "completed"}],
        "events": [],
        "waits": [
            {"kind": "limit", "step_key": "call", "name": "c:svc:acme", "since": t0, "due_at": None}
        ],
        "usage": None,
    }
    page = render(
        detail,
        Chrome(read_only=True, logged_in=False, csrf=""),
        trace_url_template=None,
        flash=None,
    )
    assert 'data-state="throttled"' in page
    assert '<span class="state state-throttled">throttled</span>' in page
    assert (
        '<tr data-gate="c:svc:acme" data-status="waiting"><td>concurrency <b>svc</b></td>'
        "<td>acme</td><td>3 at a time</td><td>3</td><td>throttled: waits in line</td>"
        "<td>2 of 5</td>"
    ) in page
    assert '<tr data-gate="r:llm:acme" data-status="">' in page and "8 of 50 units per 60 s" in page
    assert page.count('class="limits"') == 1  # the completed step's limits are not shown
    assert 'data-kind="limit (throttled step in line)" data-name="c:svc:acme"' in page
    css = (Path(run_page.__file__).parent / "static" / "app.css").read_text()
    assert ".state-throttled {" in css
