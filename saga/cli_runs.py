"""The operators' commands: ``saga list``, ``show``, and ``retry`` / ``cancel`` (one run, or
every run a filter matches), ``fork``, ``send-event``. Reads go through ``saga.runs_view``;
actions through ``SagaClient``, each recorded in the run's history with its actor."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from saga import strict_json
from saga.errors import InputError, RunNotFoundError, SagaError
from saga.exit_codes import Exit, exit_code
from saga.records import OperatorError
from saga.run_text import LIST_HEADER, list_line, show_lines, trace_url
from saga.runs_view import MAX_PAGE, RunFilter, RunsView
from saga.settings import Settings
from saga.states import RunState

# What each bulk action acts on: a filter naming other states matches nothing it could change.
ACTS_ON = {
    "retry": (RunState.FAILED, RunState.COMPENSATION_FAILED),
    "cancel": (RunState.RUNNING,),
}
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def emit(obj: dict[str, Any]) -> None:
    """One JSON object on one line (``--json``)."""
    print(json.dumps(obj, default=str, ensure_ascii=False), flush=True)


def parse_time(option: str, text: str) -> dt.datetime:
    """ISO 8601 (no zone: this machine's), or a time ago: 30s, 15m, 2h, 1d, 1w."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=float(ago[1]) * _UNIT[ago[2]])
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"{option} {text!r} is not a time: give ISO 8601 (2026-01-31T12:00, with or "
            f"without a zone) or a time ago (30m, 2h, 1d)"
        ) from None
    return t if t.tzinfo else t.astimezone()


def add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (all must match)")
    g.add_argument(
        "--state",
        action="append",
        default=[],
        help="run state (repeat, or comma-separate): " + ", ".join(RunState),
    )
    g.add_argument("--saga", help="saga name")
    g.add_argument("--since", help="created at or after (ISO 8601, or ago: 30m, 2h, 1d)")
    g.add_argument("--until", help="created before")
    g.add_argument("--finished-since", help="finished at or after")
    g.add_argument("--finished-until", help="finished before")
    g.add_argument("--error-type", help="the run's error type (e.g. builtins.ValueError)")
    g.add_argument("--run-id-prefix", help="run ids starting with this")


def run_filter(args: argparse.Namespace) -> RunFilter:
    def t(option: str, value: str | None) -> dt.datetime | None:
        return None if value is None else parse_time(option, value)

    states = tuple(s.strip() for v in args.state for s in v.split(",") if s.strip())
    return RunFilter(
        states=states,
        saga=args.saga,
        created_since=t("--since", args.since),
        created_until=t("--until", args.until),
        finished_since=t("--finished-since", args.finished_since),
        finished_until=t("--finished-until", args.finished_until),
        error_type=args.error_type,
        run_id_prefix=args.run_id_prefix,
    )


def _view(settings: Settings) -> RunsView:
    assert settings.database_url, "resolve() fills it"
    return RunsView(settings.database_url, pool_size=1)


# -- saga list ------------------------------------------------------------------------------------


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    flt = run_filter(args)
    with _view(settings) as view:
        if args.counts:
            counts = view.count_by_state(flt)
            if args.json:
                emit({"counts": counts, "cap": args.count_cap})
            for state, n in counts.items():
                if not args.json:
                    print(f"{state:<20} {n}{'+' if n >= args.count_cap else ''}")
            return Exit.DONE
        page = view.list_runs(
            flt, newest_first=not args.oldest_first, limit=args.limit, cursor=args.cursor
        )
    if args.json:
        for r in page.runs:
            emit(r.to_json())
        if page.next_cursor:  # stdout stays one run per line
            print(f"next page: --cursor {page.next_cursor}", file=sys.stderr)
        return Exit.DONE
    if not page.runs:
        print("no runs match")
        return Exit.DONE
    print(LIST_HEADER)
    for r in page.runs:
        print(list_line(r))
    if page.next_cursor:
        print(f"next page: --cursor {page.next_cursor}")
    return Exit.DONE


# -- saga show ------------------------------------------------------------------------------------


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    with _view(settings) as view:
        detail = view.run_detail(args.run_id)
    if detail is None:
        raise RunNotFoundError(f"no run has id {args.run_id!r} (`saga list` finds runs)")
    link = trace_url(settings.trace_url_template, detail.trace_id)
    if args.json:
        print(json.dumps({**detail.to_json(), "trace_url": link}, indent=2, ensure_ascii=False))
        return Exit.DONE
    for line in show_lines(detail, trace_link=link, tracebacks=args.tracebacks):
        print(line)
    return Exit.DONE


# -- saga retry / cancel (one run, or bulk), fork, send-event --------------------------------------


def _has_filter(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, name)
        for name in (
            "state",
            "saga",
            "since",
            "until",
            "finished_since",
            "finished_until",
            "error_type",
            "run_id_prefix",
        )
    )


def matching_runs(view: RunsView, flt: RunFilter, verb: str, most: int) -> list[str]:
    """Ids of the runs ``flt`` matches that ``verb`` can act on, oldest first."""
    allowed = ACTS_ON[verb]
    wrong = [s for s in flt.states if s not in allowed]
    if wrong:
        raise InputError(
            f"`saga {verb}` acts on {' or '.join(allowed)} runs; --state {wrong[0]} matches "
            f"none it could change"
        )
    flt = dataclasses.replace(flt, states=flt.states or tuple(allowed))
    ids: list[str] = []
    cursor = None
    while True:
        page = view.list_runs(flt, newest_first=False, limit=MAX_PAGE, cursor=cursor)
        ids += [r.run_id for r in page.runs]
        if len(ids) > most:
            raise InputError(f"more than {most} runs match; narrow the filters or raise --max")
        cursor = page.next_cursor
        if cursor is None:
            return ids


def confirmed(verb: str, count: int, yes: bool) -> bool:
    """The operator typed the count back (or passed --yes)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise InputError(
            f"{verb} {count} runs needs a confirmation and there is no terminal to ask on: "
            f"pass --yes (or --dry-run to list them)"
        )
    answer = input(f"{verb} {count} runs? type {count} to confirm: ")
    return answer.strip() == str(count)


def cmd_operate(settings: Settings, args: argparse.Namespace) -> int:
    from saga.client import SagaClient
    from saga.workers import telemetry

    # What an operator ends is traced here: an event wait, a run cancelled with nothing to
    # undo. Exported at exit; off unless OTEL_* asks, as for workers and relays.
    telemetry.configure_sdk("saga-cli")
    with SagaClient(settings) as client:
        if args.command == "fork":
            new = client.fork(
                args.run_id, args.step_key, new_run_id=args.new_run_id, actor=args.actor
            )
            if args.json:
                emit({"run_id": args.run_id, "new_run_id": new})
            else:
                print(new)
            return Exit.DONE
        if args.command == "send-event":
            payload = json_option("--payload", args.payload)
            waited = client.send_event(args.run_id, args.name, payload, actor=args.actor)
            if args.json:
                emit({"run_id": args.run_id, "event": args.name, "delivered": waited})
            else:
                print("delivered" if waited else "kept until the run waits for it")
            return Exit.DONE

        def act(run_id: str) -> None:
            if args.command == "cancel":
                client.cancel(run_id, args.reason, actor=args.actor)
            else:
                client.retry(run_id, actor=args.actor)

        return _act_on_runs(settings, args, act)


def _act_on_runs(settings: Settings, args: argparse.Namespace, act: Callable[[str], None]) -> int:
    verb = args.command
    if args.run_id and _has_filter(args):
        raise InputError(f"`saga {verb}` takes a run id or filters, not both")
    if not args.run_id and not _has_filter(args):
        raise InputError(
            f"`saga {verb}` needs a run id or at least one filter "
            f"(--state {ACTS_ON[verb][0]} matches every {ACTS_ON[verb][0]} run)"
        )
    if args.run_id:
        ids = [args.run_id]
        if args.dry_run:
            with _view(settings) as view:
                found = view.list_runs(RunFilter(run_id_prefix=args.run_id), limit=1).runs
            if not found or found[0].run_id != args.run_id:
                raise RunNotFoundError(f"no run has id {args.run_id!r}")
            if found[0].state not in ACTS_ON[verb]:
                raise OperatorError(f"run {args.run_id!r} is {found[0].state}; {verb} would fail")
    else:
        with _view(settings) as view:
            ids = matching_runs(view, run_filter(args), verb, args.max)
    if args.dry_run:
        for run_id in ids:
            if args.json:
                emit({"run_id": run_id, "action": verb, "dry_run": True})
            else:
                print(run_id)
        if not args.json:
            print(f"{verb} would act on {len(ids)} runs (dry run: nothing done)")
        return Exit.DONE
    if not args.run_id and not confirmed(verb, len(ids), args.yes):
        print("nothing done", file=sys.stderr)
        return Exit.USAGE
    refused = 0
    for run_id, error in _each(ids, act):
        refused += error is not None
        if args.json:
            emit({"run_id": run_id, "action": verb, "ok": error is None, "error": error})
        elif error is not None:
            print(f"{run_id}: not done: {error}", file=sys.stderr)
        else:
            print(f"{run_id}: {PAST[verb]}")
    if args.run_id and refused:
        return Exit.NOT_FOUND
    if not args.json and not args.run_id:
        print(f"{verb}: {len(ids) - refused} runs done, {refused} no longer in a state to {verb}")
    return Exit.NOT_FOUND if refused else Exit.DONE


PAST = {"retry": "retried (resumes)", "cancel": "cancelled (stopping; compensates)"}


def _each(ids: list[str], act: Callable[[str], None]) -> Iterator[tuple[str, str | None]]:
    """Each run acted on, with the reason it was refused (it changed since it was listed)."""
    for run_id in ids:
        try:
            act(run_id)
        except SagaError as exc:
            if exit_code(exc) != Exit.NOT_FOUND:
                raise
            yield run_id, str(exc)
        else:
            yield run_id, None


def json_option(option: str, text: str) -> Any:
    try:
        return strict_json.loads(text)
    except strict_json.NotJSONError as exc:
        raise InputError(f"{option} is not strict JSON: {exc}") from None


# -- the parsers ----------------------------------------------------------------------------------


def add_parsers(sub: Any, epilog: str) -> None:
    """The operators' subcommands, on the ``saga`` parser's subparsers."""
    ls = sub.add_parser("list", help="find runs (newest first)", epilog=epilog)
    add_filters(ls)
    ls.add_argument("--oldest-first", action="store_true")
    ls.add_argument("--limit", type=int, default=50, help=f"runs per page (1-{MAX_PAGE})")
    ls.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    ls.add_argument("--counts", action="store_true", help="runs per state instead of a page")
    ls.add_argument("--json", action="store_true", help="one JSON object per run and line")
    ls.set_defaults(count_cap=10_000)

    sh = sub.add_parser("show", help="a run's steps, attempts, events and trace", epilog=epilog)
    sh.add_argument("run_id")
    sh.add_argument("--tracebacks", action="store_true", help="print each attempt's traceback")
    sh.add_argument("--json", action="store_true")

    for verb, help in (
        ("cancel", "cancel a run, or every running run the filters match (compensates)"),
        (
            "retry",
            "resume a failed run (or retry a failed compensation), or every such run "
            "the filters match",
        ),
    ):
        p = sub.add_parser(verb, help=help, epilog=epilog)
        p.add_argument("run_id", nargs="?")
        add_filters(p)
        p.add_argument("--dry-run", action="store_true", help="list the runs; change nothing")
        p.add_argument("--yes", action="store_true", help="skip the count confirmation")
        p.add_argument("--max", type=int, default=1000, help="refuse when more runs match")
        _actor(p)
        if verb == "cancel":
            p.add_argument("--reason", default="cancelled by an operator")
    f = sub.add_parser("fork", help="a new run from a run's journal before STEP_KEY")
    f.add_argument("run_id")
    f.add_argument("step_key")
    f.add_argument("--new-run-id")
    _actor(f)
    e = sub.add_parser("send-event", help="deliver an outside event to a run")
    e.add_argument("run_id")
    e.add_argument("name")
    e.add_argument("--payload", default="null", help="the event's payload as JSON")
    _actor(e)


def _actor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actor", help="who acts, for the run's history (default: your user@host)")
    p.add_argument("--json", action="store_true", help="one JSON object per run and line")
