"""The run page: facts, actions, the step sequence, a timeline of attempts per worker, each
step's input, result, errors and attempts, compensations, waits and timers, events, usage.

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
from saga.errors import InputError

WAIT_KINDS = {
    "event": "event wait",
    "timer": "timer",
    "kept_event": "event sent, not yet waited for",
}
COMPLETION = "saga.completion"  # how saga.agent.llm marks a journaled completion
TRUNCATE_AT = 4_096  # characters of pretty JSON shown inline; the rest is a download
Detail = Mapping[str, Any]


# -- reading the detail ------------------------------------------------------------------------


def run_of(detail: Detail) -> Mapping[str, Any]:
    """The run's own fields (``RunDetail`` keeps them at the top level)."""
    return detail


def steps_of(detail: Detail) -> list[Mapping[str, Any]]:
    return list(detail.get("steps") or [])


def action_steps(detail: Detail) -> list[Mapping[str, Any]]:
    """The steps a fork can start from: the run's own steps, not its compensations."""
    return [s for s in steps_of(detail) if s.get("kind") != "compensation"]


def waiting_event_names(detail: Detail) -> list[str]:
    return [str(w["name"]) for w in detail.get("waits") or [] if w.get("kind") == "event"]


def payload_of(detail: Detail, step_key: str | None, field: str) -> Any:
    """A step's (or, without a step, the run's) input, result or error, for the download."""
    if field not in ("input", "result", "error"):
        raise InputError(f"field={field!r}: use input, result or error")
    if step_key is None:
        return run_of(detail).get(field)
    for s in steps_of(detail):
        if s["step_key"] == step_key:
            return s.get(field)
    raise InputError(f"run {run_of(detail)['run_id']!r} has no step {step_key!r}")


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _seconds(start: Any, end: Any) -> float | None:
    a, b = _time(start), _time(end)
    return (b - a).total_seconds() if a and b else None


def _duration(start: Any, end: Any) -> str:
    s = _seconds(start, end)
    if s is None:
        return ""
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


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


def _attempts(step: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(step.get("attempts") or [])


def _outcome(attempt: Mapping[str, Any]) -> str:
    return str(attempt.get("outcome") or "running")


def resumptions(detail: Detail) -> list[dt.datetime]:
    """When the run resumed after an interruption: a lost attempt's end (its worker died), or
    an operator's retry. Steps completed before then were read back from the journal, not run
    again."""
    times = [
        _time(a.get("finished_at"))
        for s in steps_of(detail)
        for a in _attempts(s)
        if _outcome(a) == "lost"
    ]
    times += [_time(e.get("at")) for e in detail.get("events") or [] if e.get("event") == "retry"]
    return sorted(t for t in times if t)


def read_back(
    step: Mapping[str, Any], run: Mapping[str, Any], resumed: Sequence[dt.datetime]
) -> str:
    """Why this step's result came from the journal rather than a new run of it, or ""."""
    if step.get("state") != "completed":
        return ""
    finished = _time(step.get("finished_at"))
    created = _time(run.get("created_at"))
    if finished and created and finished < created:
        return "copied from the journal of the run it was forked from"
    if finished and any(finished < t for t in resumed):
        return "read back from the journal after the run resumed, not run again"
    return ""


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
        ("took", esc(_duration(run.get("created_at"), run.get("finished_at")))),
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


def _sequence(detail: Detail, graph: Mapping[str, Sequence[str]] | None) -> Html:
    """The step graph in layers (each step right of what it comes after), when the saga's
    definition could be imported; else the steps in the order the run scheduled them."""
    steps = action_steps(detail)
    if graph:
        return _graph(steps, graph)
    nodes = [
        h(
            '<a class="node" href="#step-{anchor}" data-step="{key}">{key} {badge}</a>',
            anchor=_anchor(s["step_key"]),
            key=s["step_key"],
            badge=state_badge(s.get("state", "")),
        )
        for s in steps
    ]
    if not nodes:
        return Html("")
    return h(
        '<h2>Steps in order</h2><div class="graph" id="sequence">{}</div>',
        join(nodes, '<span class="arrow">→</span>'),
    )


def _graph(steps: Sequence[Mapping[str, Any]], graph: Mapping[str, Sequence[str]]) -> Html:
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((level(d) for d in graph.get(name, ())), default=-1)
        return depth[name]

    layers: dict[int, list[str]] = {}
    for name in graph:
        layers.setdefault(level(name), []).append(name)
    columns = []
    for _, names in sorted(layers.items()):
        nodes = []
        for name in names:
            # A fan-out step has a row per branch ("name[i]"): its states are summed up.
            rows = [
                s for s in steps if s["step_key"] == name or s["step_key"].startswith(name + "[")
            ]
            states = [str(s.get("state", "")) for s in rows]
            summary = join(
                h("{} {}", f"{states.count(st)}\u00d7" if len(rows) > 1 else "", state_badge(st))
                for st in dict.fromkeys(states)
            )
            after = graph.get(name) or ()
            nodes.append(
                h(
                    '<a class="node" href="#step-{anchor}" data-step="{name}">{name} {summary}'
                    "<small>{after}</small></a>",
                    anchor=_anchor(rows[0]["step_key"] if rows else name),
                    name=name,
                    summary=summary or h('<span class="state">not scheduled</span>'),
                    after=f"after {', '.join(after)}" if after else "first",
                )
            )
        columns.append(h('<div class="layer">{}</div>', join(nodes)))
    return h(
        '<h2>Step graph</h2><div class="layers" id="graph">{}</div>',
        join(columns, '<span class="arrow">→</span>'),
    )


def _anchor(step_key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else f"_{ord(c):x}" for c in step_key)


def worker_process(worker: Any) -> str:
    """The process in a worker id (``host:pid:boot:delivery``): attempts are grouped by it."""
    if not worker:
        return "(no worker)"
    return ":".join(str(worker).split(":")[:2])


def _timeline(detail: Detail) -> Html:
    """Every attempt of every step and compensation, grouped by the worker that ran it, with
    a bar placed on the run's time span."""
    run = run_of(detail)
    start = _time(run.get("created_at"))
    rows: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]] = []
    for s in steps_of(detail):
        for a in _attempts(s):
            rows.append((worker_process(a.get("worker")), s, a))
    if not rows or start is None:
        return Html("")
    ends = [_time(a.get("finished_at")) or _time(a.get("claimed_at")) for _, _, a in rows]
    end = max([t for t in ends if t] + [_time(run.get("finished_at")) or start])
    span = max((end - start).total_seconds(), 1e-3)
    rows.sort(key=lambda r: (r[0], str(r[2].get("claimed_at") or "")))
    lost_steps: dict[str, int] = {}
    for _, s, a in rows:
        if _outcome(a) == "lost":
            lost_steps[s["step_key"]] = int(a.get("attempt") or 0)
    out = []
    for worker, s, a in rows:
        claimed = _time(a.get("claimed_at"))
        finished = _time(a.get("finished_at"))
        left = ((claimed - start).total_seconds() / span * 100) if claimed else 0.0
        width = (((finished or end) - claimed).total_seconds() / span * 100) if claimed else 0.0
        outcome = _outcome(a)
        note = ""
        if outcome == "lost":
            note = "its worker died; the lease expired"
        lost_at = lost_steps.get(s["step_key"])
        if lost_at is not None and int(a.get("attempt") or 0) > lost_at:
            note = f"resumed the step after attempt {lost_at} was lost"
        out.append(
            h(
                '<tr class="attempt outcome-{outcome}" data-step="{key}" data-attempt="{n}"'
                ' data-outcome="{outcome}"><td class="worker" title="{full}">{worker}</td>'
                "<td>{kind}{key}</td>"
                "<td>{n}</td><td>{badge}</td><td>{claimed}</td><td>{took}</td><td>{note}</td>"
                '<td class="bar-cell"><div class="bar"><span class="{outcome} {cls}" '
                'data-left="{left}" data-width="{width}"></span></div></td></tr>',
                outcome=outcome,
                key=s["step_key"],
                n=a.get("attempt"),
                worker=worker,
                full=a.get("worker") or "",
                kind=h('<span class="badge comp">undo</span> ')
                if s.get("kind") == "compensation"
                else "",
                badge=state_badge(outcome),
                claimed=when(a.get("claimed_at")),
                took=_duration(a.get("claimed_at"), a.get("finished_at")),
                note=note,
                cls="compensation" if s.get("kind") == "compensation" else "",
                left=f"{max(0.0, min(left, 100.0)):.2f}",
                width=f"{max(0.2, min(width, 100.0)):.2f}",
            )
        )
    return h(
        '<h2>Attempts by worker</h2><table class="timeline" id="timeline"><thead><tr>'
        "<th>worker</th><th>step</th><th>attempt</th><th>outcome</th><th>claimed</th>"
        "<th>took</th><th></th><th>on the run's time span</th></tr></thead><tbody>{}</tbody>"
        "</table>",
        join(out),
    )


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
    attempts = _attempts(s)
    attempt_rows = join(
        h(
            '<tr data-outcome="{o}"><td>{n}</td><td>{badge}</td><td class="worker">{w}</td>'
            "<td>{c}</td><td>{f}</td><td>{err}</td></tr>",
            o=_outcome(a),
            n=a.get("attempt"),
            badge=state_badge(_outcome(a)),
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
            took=_duration(s.get("started_at"), s.get("finished_at")),
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
        anchor=_anchor(key),
        key=key,
        kind=s.get("kind", "action"),
        state=s.get("state", ""),
        rb="1" if why else "0",
        body=join(parts),
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


def _waits(detail: Detail) -> Html:
    waits = detail.get("waits") or []
    if not waits:
        return Html("")
    rows = join(
        h(
            '<tr data-kind="{kind}" data-name="{name}"><td>{kind}</td><td>{name}</td>'
            "<td>{key}</td><td>{since}</td><td>{until}</td></tr>",
            kind=WAIT_KINDS.get(w.get("kind", ""), w.get("kind", "")),
            name=w.get("name") or "",
            key=w.get("step_key") or "",
            since=when(w.get("since")),
            until=when(w.get("due_at")),
        )
        for w in waits
    )
    return h(
        '<h2>Waiting for</h2><table id="waits"><thead><tr><th>kind</th><th>name</th><th>step</th>'
        "<th>since</th><th>due (timeout or timer)</th></tr></thead><tbody>{}</tbody></table>",
        rows,
    )


def _events(detail: Detail) -> Html:
    events = detail.get("events") or []
    if not events:
        return Html("")
    rows = join(
        h(
            '<tr data-event="{event}"><td>{at}</td><td>{event}</td><td>{actor}</td>'
            "<td><code>{detail}</code></td></tr>",
            at=when(e.get("at")),
            event=e.get("event", ""),
            actor=e.get("actor") or "",
            detail=json.dumps(e.get("detail"), ensure_ascii=False, default=str)
            if e.get("detail") is not None
            else "",
        )
        for e in events
    )
    return h(
        '<h2>Run events</h2><table id="events"><thead><tr><th>at</th><th>event</th><th>by</th>'
        "<th>detail</th></tr></thead><tbody>{}</tbody></table>",
        rows,
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
        _sequence(detail, graph),
        _waits(detail),
        _timeline(detail),
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
        _events(detail),
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
