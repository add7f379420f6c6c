"""The dashboard as a WSGI application: routes, authentication, CSRF checks, errors.

Reads go through ``saga.runs_view.RunsView``; actions through ``SagaClient`` (``Actions``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any
from urllib.parse import quote

from saga.dashboard import pages, run_data, run_page
from saga.dashboard.actions import Actions
from saga.dashboard.graphs import Graphs
from saga.dashboard.http import (
    BadRequest,
    Request,
    Response,
    html_response,
    json_response,
    redirect,
)
from saga.dashboard.security import Guard, cross_site, host_is_loopback
from saga.dashboard.source import FilterError, Source, list_params
from saga.errors import (
    InputError,
    RunNotFoundError,
    SagaError,
    StoreError,
)

log = logging.getLogger("saga.dashboard")

_RUN = r"(?P<run_id>[A-Za-z0-9][A-Za-z0-9_.\-]{0,199})"
_STATIC = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}


class Dashboard:
    def __init__(
        self,
        source: Source,
        actions: Actions | None,
        guard: Guard,
        *,
        refresh_seconds: int = 5,
        trace_url_template: str | None = None,
        token_prices: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        self.source = source
        self.actions = actions  # None: read-only
        self.guard = guard
        self.refresh_seconds = refresh_seconds
        self.trace_url_template = trace_url_template
        self.graphs = Graphs()
        self.token_prices = dict(token_prices or {})
        self.static = {
            name: resources.files("saga.dashboard").joinpath("static", name).read_bytes()
            for name in _STATIC
        }
        get: list[tuple[str, Callable[..., Response]]] = [
            (r"/", self.list_page),
            (rf"/runs/{_RUN}", self.run_page),
            (rf"/runs/{_RUN}/confirm/(?P<action>retry|cancel|fork|event)", self.confirm_page),
            (rf"/runs/{_RUN}/download", self.download),
            (r"/api/runs", self.api_runs),
            (r"/api/counts", self.api_counts),
            (rf"/api/runs/{_RUN}", self.api_run),
            (r"/login", self.login_form),
        ]
        post: list[tuple[str, Callable[..., Response]]] = [
            (rf"/runs/{_RUN}/(?P<action>retry|cancel|fork|event)", self.form_action),
            (rf"/api/runs/{_RUN}/(?P<action>retry|cancel|fork|events)", self.api_action),
            (r"/login", self.login),
            (r"/logout", self.logout),
        ]
        self.routes = {
            "GET": [(re.compile(p + r"\Z"), f) for p, f in get],
            "POST": [(re.compile(p + r"\Z"), f) for p, f in post],
        }

    @property
    def read_only(self) -> bool:
        return self.actions is None

    # -- WSGI -------------------------------------------------------------------------------------

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        try:
            request = Request.from_environ(environ)
        except BadRequest as exc:
            return json_response({"error": str(exc)}, "400 Bad Request")(start_response)
        return self.handle(request)(start_response)

    def handle(self, request: Request) -> Response:
        if request.path.startswith("/static/"):
            name = request.path.removeprefix("/static/")
            if name in _STATIC and request.method == "GET":
                return Response("200 OK", self.static[name], content_type=_STATIC[name])
            return self.fail(request, "404 Not Found", "no such file")
        loopback_host = host_is_loopback(request.headers.get("host"))
        request.verdict = self.guard.judge(request.headers, loopback_host)
        if request.session is None and not request.verdict.bearer:
            # Every browser gets a session on its first visit, set on this response: the CSRF
            # tokens rendered now belong to it.
            session = self.guard.new_session(logged_in=not self.guard.token_required)
            request.verdict = dataclasses.replace(request.verdict, session=session)
            cookie = self.guard.set_cookie_header(session)
        else:
            cookie = None
        try:
            response = self._route(request, loopback_host)
        except Exception:
            log.exception("dashboard request %s %s failed", request.method, request.path)
            response = self.fail(
                request, "500 Internal Server Error", "the dashboard failed; see its log"
            )
        if cookie:
            response.headers.append(cookie)
        return response

    def _route(self, request: Request, loopback_host: bool) -> Response:
        routes = self.routes.get(request.method)
        if routes is None:
            return self.fail(request, "405 Method Not Allowed", "use GET or POST")
        for pattern, handler in routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            if not request.verdict.allowed and handler not in (self.login_form, self.login):
                return self.unauthorized(request, loopback_host)
            try:
                return handler(request, **match.groupdict())
            except RunNotFoundError as exc:
                return self.fail(request, "404 Not Found", str(exc))
            except (FilterError, InputError, BadRequest) as exc:
                return self.fail(request, "400 Bad Request", str(exc))
            except StoreError as exc:
                log.warning("the journal could not be read: %s", exc)
                return self.fail(request, "503 Service Unavailable", str(exc))
            except SagaError as exc:  # a run in the wrong state for the action, mostly
                return self.fail(request, "409 Conflict", str(exc))
        if any(
            p.match(request.path)
            for p, _ in self.routes["GET" if request.method == "POST" else "POST"]
        ):
            return self.fail(
                request, "405 Method Not Allowed", f"{request.path} takes no {request.method}"
            )
        return self.fail(request, "404 Not Found", f"no page at {request.path}")

    def chrome(self, request: Request, *, refresh: bool = False) -> pages.Chrome:
        session = request.session
        return pages.Chrome(
            read_only=self.read_only,
            logged_in=bool(self.guard.token_required and session and session.logged_in),
            csrf=self.guard.csrf_token(session) if session else "",
            refresh_seconds=self.refresh_seconds if refresh else 0,
        )

    def fail(self, request: Request, status: str, message: str) -> Response:
        if request.wants_json or request.path.startswith("/static/"):
            return json_response({"error": message}, status)
        return html_response(pages.error_page(status, message, self.chrome(request)), status)

    def unauthorized(self, request: Request, loopback_host: bool) -> Response:
        if not self.guard.token_required and not loopback_host:
            return self.fail(
                request,
                "403 Forbidden",
                "this dashboard has no token and answers only to a loopback host name "
                "(127.0.0.1, localhost); set SAGA_DASHBOARD_TOKEN to serve other names",
            )
        if request.wants_json or request.method != "GET":
            response = json_response({"error": "a token is required"}, "401 Unauthorized")
            response.headers.append(("WWW-Authenticate", 'Bearer realm="saga dashboard"'))
            return response
        return redirect("/login?next=" + quote(request.path, safe="/"))

    # -- pages ------------------------------------------------------------------------------------

    def list_page(self, request: Request) -> Response:
        params, flt, cursor = list_params(request.query)
        runs, next_cursor = self.source.list_runs(
            flt, newest_first=params.order == "newest", limit=params.limit, cursor=cursor
        )
        counts = self.source.count_by_state(flt)
        chrome = self.chrome(request, refresh=True)
        body = pages.runs_page(params, runs, counts, next_cursor, cursor is None, chrome)
        refresh = request.arg("refresh") != "0"
        return html_response(pages.layout("Runs", body, chrome, refresh=refresh))

    def run_page(self, request: Request, run_id: str) -> Response:
        detail = self.source.run_detail(run_id)
        chrome = self.chrome(request, refresh=True)
        body = run_page.render(
            detail,
            chrome,
            trace_url_template=self.trace_url_template,
            flash=request.arg("done"),
            graph=self.graphs.of(detail["saga_ref"]),
            prices=self.token_prices,
        )
        live = detail["state"] in ("running", "compensating")
        refresh = live and request.arg("refresh") != "0"
        return html_response(pages.layout(f"run {run_id}", body, chrome, refresh=refresh))

    def confirm_page(self, request: Request, run_id: str, action: str) -> Response:
        if self.read_only:
            return self.fail(request, "403 Forbidden", "the dashboard is read-only")
        detail = self.source.run_detail(run_id)
        step_keys = [s["step_key"] for s in run_data.action_steps(detail)]
        body = pages.confirm_page(
            action,
            run_id,
            detail["state"],
            step_keys,
            run_data.waiting_event_names(detail),
            self.chrome(request),
            step_key=request.arg("step_key"),
        )
        return html_response(body)

    def download(self, request: Request, run_id: str) -> Response:
        detail = self.source.run_detail(run_id)
        field = request.arg("field") or "result"
        value = run_data.payload_of(detail, request.arg("step"), field)
        name = f"{run_id}-{request.arg('step') or 'run'}-{field}.json"
        safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
        return Response(
            "200 OK",
            json.dumps(value, indent=2, ensure_ascii=False, default=str).encode(),
            content_type="application/json",
            headers=[("Content-Disposition", f'attachment; filename="{safe}"')],
        )

    def form_action(self, request: Request, run_id: str, action: str) -> Response:
        form = request.form()
        refused = self.guard.may_change(request.verdict, request.headers, form.get("csrf"))
        if refused:
            return self.fail(request, "403 Forbidden", refused)
        if self.actions is None:
            return self.fail(request, "403 Forbidden", "the dashboard is read-only")
        outcome = self.actions.perform(action, run_id, form, actor=request.actor)
        target = outcome.get("new_run_id") or run_id
        return redirect(f"/runs/{quote(target, safe='')}?done={quote(outcome['message'])}")

    # -- login ------------------------------------------------------------------------------------

    def login_form(self, request: Request) -> Response:
        if not self.guard.token_required:
            return redirect("/")
        return html_response(
            pages.login_page(_local(request.arg("next")), None, self.chrome(request))
        )

    def login(self, request: Request) -> Response:
        if not self.guard.token_required:
            return redirect("/")
        form = request.form()
        refused = cross_site(request.headers)
        if refused:
            return self.fail(request, "403 Forbidden", refused)
        if not self.guard.token_matches(form.get("token", "")):
            log.warning("dashboard login refused: wrong token")
            body = pages.login_page(_local(form.get("next")), "wrong token", self.chrome(request))
            return html_response(body, "401 Unauthorized")
        session = self.guard.new_session(logged_in=True)
        response = redirect(_local(form.get("next")))
        response.headers.append(self.guard.set_cookie_header(session))
        return response

    def logout(self, request: Request) -> Response:
        refused = self.guard.may_change(
            request.verdict, request.headers, request.form().get("csrf")
        )
        if refused:
            return self.fail(request, "403 Forbidden", refused)
        response = redirect("/login")
        response.headers.append(("Set-Cookie", "saga_dashboard=; Path=/; Max-Age=0; HttpOnly"))
        return response

    # -- the JSON API ----------------------------------------------------------------------------

    def api_runs(self, request: Request) -> Response:
        params, flt, cursor = list_params(request.query)
        runs, next_cursor = self.source.list_runs(
            flt, newest_first=params.order == "newest", limit=params.limit, cursor=cursor
        )
        return json_response({"runs": runs, "next_cursor": next_cursor})

    def api_counts(self, request: Request) -> Response:
        _, flt, _ = list_params(request.query)
        return json_response({"counts": self.source.count_by_state(flt)})

    def api_run(self, request: Request, run_id: str) -> Response:
        return json_response(self.source.run_detail(run_id))

    def api_action(self, request: Request, run_id: str, action: str) -> Response:
        body = request.json()
        csrf = request.headers.get("x-csrf-token")
        refused = self.guard.may_change(request.verdict, request.headers, csrf)
        if refused:
            return self.fail(request, "403 Forbidden", refused)
        if self.actions is None:
            return self.fail(request, "403 Forbidden", "the dashboard is read-only")
        return json_response(
            self.actions.perform(
                "event" if action == "events" else action, run_id, body, actor=request.actor
            )
        )


def _local(path: str | None) -> str:
    """Only a path on this dashboard (an open redirect would let a link send users elsewhere),
    of URL-safe characters: a control character split the Location header in two, or was
    dropped by the browser (``/\t/evil.com`` is ``//evil.com``)."""
    if not path or not _LOCAL_PATH.fullmatch(path) or path.startswith("//"):
        return "/"
    return path


_LOCAL_PATH = re.compile(r"/[A-Za-z0-9/_.\-?=&%]*")


__all__ = ["Dashboard"]
