"""A WSGI request and response, small enough to read at once."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from saga.dashboard.security import SECURITY_HEADERS, Session, Verdict

MAX_BODY = 2 * 1_048_576 + 65_536  # an event payload at SAGA_MAX_INPUT_BYTES, form-encoded


class BadRequest(Exception):
    """The request cannot be read (its message is shown to the caller)."""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    remote: str = ""  # the peer's address (a proxy's, behind one)
    verdict: Verdict = field(default_factory=lambda: Verdict(False, None))

    @classmethod
    def from_environ(cls, environ: dict[str, Any]) -> Request:
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        method = environ.get("REQUEST_METHOD", "GET").upper()
        body = b""
        if method == "POST":
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if length < 0:  # read(-1) reads to the end of the stream: blocks until it closes
                raise BadRequest("Content-Length is negative")
            if length > MAX_BODY:
                raise BadRequest(f"the request body is over {MAX_BODY} bytes")
            body = environ["wsgi.input"].read(length) if length else b""
        path = environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", "replace")
        return cls(
            method=method,
            path=path,
            query=parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=False),
            headers=headers,
            body=body,
            remote=str(environ.get("REMOTE_ADDR", "")),
        )

    @property
    def session(self) -> Session | None:
        return self.verdict.session

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0].strip() or None if values else None

    def form(self) -> dict[str, str]:
        parsed = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in parsed.items()}

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    @property
    def actor(self) -> str:
        """Who acts, for the run's history: how they proved themselves, and from where."""
        if self.verdict.bearer:
            who = "bearer token"
        elif self.session is not None and self.session.logged_in:
            who = f"session {self.session.sid[:8]}"
        else:
            who = "no token"
        return f"dashboard ({who}) from {self.remote or 'unknown'}"

    @property
    def wants_json(self) -> bool:
        return self.path.startswith("/api/")


@dataclass
class Response:
    status: str
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            *SECURITY_HEADERS,
            *self.headers,
        ]
        start_response(self.status, headers)
        return [self.body]


def html_response(body: str, status: str = "200 OK") -> Response:
    return Response(status, body.encode())


def json_response(data: Any, status: str = "200 OK") -> Response:
    return Response(status, json.dumps(data, default=str).encode(), content_type="application/json")


def redirect(location: str) -> Response:
    return Response("303 See Other", b"", headers=[("Location", location)])
