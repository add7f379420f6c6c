"""The run page's views of the run as a whole: the step graph (or sequence), the attempts on a
timeline by worker, the waits still open, and the run's events."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from saga.dashboard.html import Html, h, join
from saga.dashboard.pages import state_badge, when
from saga.dashboard.run_data import (
    Detail,
    action_steps,
    anchor,
    attempts_of,
    duration,
    outcome_of,
    parse_time,
    run_of,
    steps_of,
    worker_process,
)

WAIT_KINDS = {
    "event": "event wait",
    "timer": "timer",
    "kept_event": "event sent, not yet waited for",
    "limit": "limit (throttled step in line)",
}


def sequence(detail: Detail, graph: Mapping[str, Sequence[str]] | None) -> Html:
    """The step graph in layers (each step right of what it comes after), when the saga's
    definition could be imported; else the steps in the order the run scheduled them."""
    steps = action_steps(detail)
    if graph:
        return graph_layers(steps, graph)
    nodes = [
        h(
            '<a class="node" href="#step-{anchor}" data-step="{key}">{key} {badge}</a>',
            anchor=anchor(s["step_key"]),
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


def graph_layers(steps: Sequence[Mapping[str, Any]], graph: Mapping[str, Sequence[str]]) -> Html:
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
                    anchor=anchor(rows[0]["step_key"] if rows else name),
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


def timeline(detail: Detail) -> Html:
    """Every attempt of every step and compensation, grouped by the worker that ran it, with
    a bar placed on the run's time span."""
    run = run_of(detail)
    start = parse_time(run.get("created_at"))
    rows: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]] = []
    for s in steps_of(detail):
        for a in attempts_of(s):
            rows.append((worker_process(a.get("worker")), s, a))
    if not rows or start is None:
        return Html("")
    ends = [parse_time(a.get("finished_at")) or parse_time(a.get("claimed_at")) for _, _, a in rows]
    end = max([t for t in ends if t] + [parse_time(run.get("finished_at")) or start])
    span = max((end - start).total_seconds(), 1e-3)
    rows.sort(key=lambda r: (r[0], str(r[2].get("claimed_at") or "")))
    lost_steps: dict[str, int] = {}
    for _, s, a in rows:
        if outcome_of(a) == "lost":
            lost_steps[s["step_key"]] = int(a.get("attempt") or 0)
    out = []
    for worker, s, a in rows:
        claimed = parse_time(a.get("claimed_at"))
        finished = parse_time(a.get("finished_at"))
        left = ((claimed - start).total_seconds() / span * 100) if claimed else 0.0
        width = (((finished or end) - claimed).total_seconds() / span * 100) if claimed else 0.0
        outcome = outcome_of(a)
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
                took=duration(a.get("claimed_at"), a.get("finished_at")),
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


def _table(title: str, table_id: str, headers: Sequence[str], rows: Sequence[Html]) -> Html:
    """A titled table, or nothing when it has no row."""
    if not rows:
        return Html("")
    return h(
        '<h2>{}</h2><table id="{}"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>',
        title,
        table_id,
        join(h("<th>{}</th>", c) for c in headers),
        join(rows),
    )


def waits(detail: Detail) -> Html:
    rows = [
        h(
            '<tr data-kind="{kind}" data-name="{name}"><td>{kind}</td><td>{name}</td>'
            "<td>{key}</td><td>{since}</td><td>{until}</td></tr>",
            kind=WAIT_KINDS.get(w.get("kind", ""), w.get("kind", "")),
            name=w.get("name") or "",
            key=w.get("step_key") or "",
            since=when(w.get("since")),
            until=when(w.get("due_at")),
        )
        for w in detail.get("waits") or []
    ]
    headers = ("kind", "name", "step", "since", "due (timeout, timer or end of a pause)")
    return _table("Waiting for", "waits", headers, rows)


def events(detail: Detail) -> Html:
    rows = [
        h(
            '<tr data-event="{event}"><td>{at}</td><td>{event}</td><td>{actor}</td>'
            "<td><code>{detail}</code></td></tr>",
            at=when(e.get("at")),
            event=e.get("event", ""),
            actor=e.get("actor") or "",
            detail=""
            if e.get("detail") is None
            else json.dumps(e.get("detail"), ensure_ascii=False, default=str),
        )
        for e in detail.get("events") or []
    ]
    return _table("Run events", "events", ("at", "event", "by", "detail"), rows)
