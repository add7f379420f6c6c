"""The run page: facts, actions, the step graph or sequence, a timeline of attempts per worker,
each step's input, result, errors and attempts, compensations, waits and timers, events, usage.

It renders ``RunsView.run_detail(...).to_json()``, the same JSON ``/api/runs/{id}`` serves.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from saga.dashboard.html import Html, esc, h, join
from saga.dashboard.pages import Chrome, state_badge, when
from saga.dashboard.run_data import (
    Detail,
    action_steps,
    anchor,
    attempts_of,
    duration,
    outcome_of,
    read_back,
    resumptions,
    run_of,
    steps_of,
)
from saga.dashboard.run_timeline import events, sequence, timeline, waits

COMPLETION = "saga.completion"  # how saga.agent.llm marks a journaled completion
TRUNCATE_AT = 4_096  # characters of pretty JSON shown inline; the rest is a download


# -- pieces ------------------------------------------------------------------------------------


def pretty(value: Any, *, run_id: str, step_key: str | None, field: str) -> Html:
    """Pretty JSON as text; large values truncated, with a link to download them whole."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    query = urlencode({"field": field, **({"step": step_key} if step_key else {})})
    link = f"/runs/{quote(run_id, safe='')}/download?{query}"
    if len(text) <= TRUNCATE_AT:
        return h('<pre class="json" data-field="{}">{}</pre>', field, text)
    return h(
        '<pre class="json truncated" data-field="{field}">{text}\n… ({n} characters)</pre>'
        '<a class="download" href="{link}" download>Download the whole {field} ({n} characters'
        " of JSON)</a>",
        field=field,
        text=text[:TRUNCATE_AT],
        n=f"{len(text):,}",
        link=link,
    )


def error_block(error: Any) -> Html:
    if not error:
        return Html("")
    if not isinstance(error, Mapping):
        return h('<p class="flash error">{}</p>', error)
    traceback = error.get("traceback")
    return h(
        '<div class="error-block"><p class="flash error"><b>{type}</b>: {message}</p>{tb}</div>',
        type=error.get("type") or "error",
        message=error.get("message") or "",
        tb=h(
            '<details open><summary>traceback</summary><pre class="traceback">{}</pre></details>',
            traceback,
        )
        if traceback
        else "",
    )


# -- sections ------------------------------------------------------------------------------------


def _facts(detail: Detail, trace_url_template: str | None) -> Html:
    run = run_of(detail)
    trace_id = detail.get("trace_id") or run.get("trace_id")
    trace: Html = Html("")
    if trace_id:
        if trace_url_template:
            url = trace_url_template.replace("{trace_id}", str(trace_id))
            trace = h('<a id="trace-link" href="{}" rel="noreferrer">{}</a>', url, trace_id)
        else:
            trace = h('<code id="trace-id">{}</code>', trace_id)
    rows = [
        ("saga", esc(run.get("saga"))),
        ("version", esc(run.get("saga_version") or "")),
        ("state", state_badge(run["state"])),
        ("created", when(run.get("created_at"))),
        ("updated", when(run.get("updated_at"))),
        ("finished", when(run.get("finished_at"))),
        ("took", esc(duration(run.get("created_at"), run.get("finished_at")))),
        ("trace", trace),
    ]
    if run.get("deadline_at"):
        rows.append(("deadline", when(run.get("deadline_at"))))
    if run.get("queue"):
        rows.append(("queue", esc(run.get("queue"))))
    return h(
        '<dl class="facts" id="facts">{}</dl>',
        join(h("<dt>{}</dt><dd>{}</dd>", k, v) for k, v in rows if v),
    )


def _actions(detail: Detail, chrome: Chrome) -> Html:
    if chrome.read_only:
        return Html("")
    run = run_of(detail)
    state = run["state"]
    base = f"/runs/{quote(run['run_id'], safe='')}/confirm"
    links = []
    if state in ("failed", "compensation_failed"):
        links.append(h('<a class="button" id="action-retry" href="{}/retry">Retry…</a>', base))
    if state == "running":
        links.append(
            h('<a class="button" id="action-event" href="{}/event">Send an event…</a>', base)
        )
        links.append(
            h('<a class="button danger" id="action-cancel" href="{}/cancel">Cancel…</a>', base)
        )
    if action_steps(detail):
        links.append(
            h('<a class="button" id="action-fork" href="{}/fork">Fork from a step…</a>', base)
        )
    return h('<div class="actions" id="actions">{}</div>', join(links))


def _step_section(
    s: Mapping[str, Any], run: Mapping[str, Any], resumed: Sequence[dt.datetime], chrome: Chrome
) -> Html:
    run_id = run["run_id"]
    key = s["step_key"]
    is_comp = s.get("kind") == "compensation"
    undoes = s.get("compensation_of") or (key.removeprefix("compensate:") if is_comp else None)
    labels = []
    if is_comp:
        labels.append(h('<span class="badge comp">compensation of {}</span>', undoes))
    elif s.get("kind") in ("timer", "event"):
        labels.append(h('<span class="badge">{}</span>', s.get("kind")))
    why = read_back(s, run, resumed)
    if why:
        labels.append(h('<span class="badge replayed" title="{0}">read from journal</span>', why))
    attempts = attempts_of(s)
    attempt_rows = join(
        h(
            '<tr data-outcome="{o}"><td>{n}</td><td>{badge}</td><td class="worker">{w}</td>'
            "<td>{c}</td><td>{f}</td><td>{err}</td></tr>",
            o=outcome_of(a),
            n=a.get("attempt"),
            badge=state_badge(outcome_of(a)),
            w=a.get("worker") or "",
            c=when(a.get("claimed_at")),
            f=when(a.get("finished_at")),
            err=_attempt_error(a),
        )
        for a in attempts
    )
    fork = (
        h(
            ' <a class="fork-link" href="/runs/{}/confirm/fork?{}">fork from here…</a>',
            quote(run_id, safe=""),
            urlencode({"step_key": key}),
        )
        if not chrome.read_only and not is_comp
        else ""
    )
    parts = [
        h(
            '<h3>{key} {badge} {labels}</h3><p class="help">{name} · attempt {attempt} of {max}'
            " · {took}{why}{fork}</p>",
            key=key,
            badge=state_badge(s.get("state", "")),
            labels=join(labels, " "),
            name=s.get("name") or key,
            attempt=max([int(a.get("attempt") or 0) for a in attempts], default=0),
            max=s.get("max_attempts", "?"),
            took=duration(s.get("started_at"), s.get("finished_at")),
            why=f" · {why}" if why else "",
            fork=fork,
        )
    ]
    if "input" in s:
        parts.append(
            h(
                "<h4>input</h4>{}",
                pretty(s.get("input"), run_id=run_id, step_key=key, field="input"),
            )
        )
    if s.get("result") is not None or s.get("state") == "completed":
        parts.append(
            h(
                "<h4>result</h4>{}",
                pretty(s.get("result"), run_id=run_id, step_key=key, field="result"),
            )
        )
    parts.append(error_block(s.get("error")))
    parts.append(_limits(s))
    if attempts:
        parts.append(
            h(
                '<details{open}><summary>{n} attempt(s)</summary><table class="attempts">'
                "<thead><tr><th>#</th><th>outcome</th><th>worker</th><th>claimed</th>"
                "<th>finished</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>"
                "</details>",
                open=Html(" open") if len(attempts) > 1 else "",
                n=len(attempts),
                rows=attempt_rows,
            )
        )
    return h(
        '<section class="step {cls}" id="step-{anchor}" data-step="{key}" data-kind="{kind}"'
        ' data-state="{state}" data-read-back="{rb}">{body}</section>',
        cls="compensation" if is_comp else "",
        anchor=anchor(key),
        key=key,
        kind=s.get("kind", "action"),
        state=s.get("state", ""),
        rb="1" if why else "0",
        body=join(parts),
    )


LIMIT_STATUS = {
    "waiting": "throttled: waits in line",
    "offered": "budget freed for it: dispatched to take it",
    "held": "holds a slot",
}


def _limits(s: Mapping[str, Any]) -> Html:
    """The limits of a step not yet ended (``saga.limits``): for a throttled one, which it waits
    for, its place in line and since when; for a running one, the slots it holds."""
    limits = [v for v in s.get("limits") or [] if isinstance(v, Mapping)]
    if not limits or s.get("state") in ("completed", "failed", "cancelled"):
        return Html("")
    rows = []
    for v in limits:
        rate = v.get("kind") == "rate"
        if rate:
            what = h("rate limit <b>{}</b>", v.get("name"))
            period = v.get("period")
            per = f"{period:g} s" if isinstance(period, int | float) else "?"
            size = f"{v.get('units')} of {v.get('limit')} units per {per}"
        else:
            what = h(
                "concurrency <b>{}</b>{}", v.get("name"), " (per run)" if v.get("run_level") else ""
            )
            size = f"{v.get('limit')} at a time"
        in_use = v.get("in_use")
        status = str(v.get("status") or "")
        text = LIMIT_STATUS.get(status, "")
        if status == "held" and v.get("run_level"):
            text = "its run holds a slot"
        place = ""
        if status == "waiting" and v.get("place") and v.get("in_line"):
            place = f"{v['place']} of {v['in_line']}"
        rows.append(
            h(
                '<tr data-gate="{gate}" data-status="{status}"><td>{what}</td><td>{key}</td>'
                "<td>{size}</td><td>{in_use}</td><td>{text}</td><td>{place}</td><td>{since}</td>"
                "<td>{paused}</td></tr>",
                gate=v.get("gate", ""),
                status=status,
                what=what,
                key=v.get("key") or "",
                size=size,
                in_use="" if in_use is None else in_use,
                text=text,
                place=place,
                since=when(v.get("since")),
                paused=when(v.get("paused_until")),
            )
        )
    return h(
        '<h4>limits</h4><table class="limits"><thead><tr><th>limit</th><th>key</th>'
        "<th>allows</th><th>in use</th><th>this step</th><th>place in line</th><th>since</th>"
        "<th>paused until (a service's 429)</th></tr></thead><tbody>{}</tbody></table>",
        join(rows),
    )


def _attempt_error(a: Mapping[str, Any]) -> Html:
    if not a.get("error_type") and not a.get("message"):
        return Html("")
    tb = a.get("traceback")
    head = h("<b>{}</b>: {}", a.get("error_type") or "", a.get("message") or "")
    if not tb:
        return head
    return h(
        '{}<details><summary>traceback</summary><pre class="traceback">{}</pre></details>', head, tb
    )


def _usage(detail: Detail, prices: Mapping[str, Sequence[float]]) -> Html:
    """Model usage of an agent run (``saga.agent``'s RunUsage): totals, then per completion,
    with its cost when ``SAGA_TOKEN_PRICES`` prices its model."""
    usage = detail.get("usage")
    if not isinstance(usage, Mapping):
        return Html("")
    total = usage.get("total") or {}
    rows, cost, unpriced = [], 0.0, set()
    for s in steps_of(detail):
        result = s.get("result")
        if s.get("state") != "completed" or not isinstance(result, Mapping):
            continue
        if result.get("object") != COMPLETION:
            continue
        model, u = str(result.get("model", "")), result.get("usage") or {}
        price = prices.get(model)
        step_cost = None
        if price is not None:
            step_cost = (
                u.get("prompt_tokens", 0) * price[0] + u.get("completion_tokens", 0) * price[1]
            ) / 1e6
            cost += step_cost
        else:
            unpriced.add(model)
        rows.append(
            h(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                s["step_key"],
                model,
                u.get("prompt_tokens", 0),
                u.get("completion_tokens", 0),
                u.get("total_tokens", 0),
                "" if step_cost is None else f"${step_cost:.6f}",
            )
        )
    if unpriced:
        priced = h(
            "no price for {} (set SAGA_TOKEN_PRICES to see the cost)", ", ".join(sorted(unpriced))
        )
    else:
        priced = h('cost <b id="cost">${}</b>', f"{cost:.6f}")
    return h(
        '<h2>Model usage</h2><div id="usage"><p>{calls} completion(s): <b>{total}</b> tokens '
        "({prompt} prompt, {completion} completion); {priced}</p>"
        "<table><thead><tr><th>step</th><th>model</th><th>prompt</th><th>completion</th>"
        "<th>total</th><th>cost</th></tr></thead><tbody>{rows}</tbody></table></div>",
        calls=usage.get("calls", 0),
        total=total.get("total_tokens", 0),
        prompt=total.get("prompt_tokens", 0),
        completion=total.get("completion_tokens", 0),
        priced=priced,
        rows=join(rows),
    )


def render(
    detail: Detail,
    chrome: Chrome,
    *,
    trace_url_template: str | None,
    flash: str | None,
    graph: Mapping[str, Sequence[str]] | None = None,
    prices: Mapping[str, Sequence[float]] | None = None,
) -> Html:
    run = run_of(detail)
    run_id = run["run_id"]
    resumed = resumptions(detail)
    steps = steps_of(detail)
    actions_ = [s for s in steps if s.get("kind") != "compensation"]
    comps = [s for s in steps if s.get("kind") == "compensation"]
    parts: list[Html | str] = [
        h('<h1>Run <code id="run-id">{}</code> {}</h1>', run_id, state_badge(run["state"])),
        h('<p class="flash" id="flash">{}</p>', flash) if flash else "",
        _actions(detail, chrome),
        _facts(detail, trace_url_template),
        error_block(run.get("error")),
        sequence(detail, graph),
        waits(detail),
        timeline(detail),
        h(
            '<h2>Steps</h2><div id="steps">{}</div>',
            join(_step_section(s, run, resumed, chrome) for s in actions_),
        ),
    ]
    if comps:
        parts.append(
            h(
                '<h2>Compensations</h2><p class="help">Each undoes a step, newest first.</p>'
                '<div id="compensations">{}</div>',
                join(_step_section(s, run, resumed, chrome) for s in comps),
            )
        )
    parts += [
        _usage(detail, prices or {}),
        events(detail),
        h(
            "<h2>Run input</h2>{}",
            pretty(run.get("input"), run_id=run_id, step_key=None, field="input"),
        ),
    ]
    if run.get("result") is not None:
        parts.append(
            h(
                "<h2>Run result</h2>{}",
                pretty(run.get("result"), run_id=run_id, step_key=None, field="result"),
            )
        )
    return join(parts)
