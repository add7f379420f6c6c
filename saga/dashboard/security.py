"""Who may use the dashboard, and which requests may change something.

- A token (``SAGA_DASHBOARD_TOKEN``) is asked for as ``Authorization: Bearer <token>`` or once
  through the login form, which sets a signed session cookie. Without a token the dashboard
  only binds to loopback (``check_bind``) and answers only to loopback host names (a page on
  another site cannot reach it by pointing its own name at 127.0.0.1).
- A state-changing request is a POST whose session's CSRF token comes with it (form field or
  ``X-CSRF-Token``), from the same origin (``Origin`` and ``Sec-Fetch-Site``, when the browser
  sends them). A Bearer request carries no cookie a browser would attach by itself, so it needs
  no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from saga.errors import ConfigurationError

COOKIE = "saga_dashboard"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})

# No inline script or style anywhere: the pages load /static/app.js and /static/app.css only.
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),  # "no-referrer" makes form POSTs send Origin: null
    ("Cache-Control", "no-store"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve anything but loopback without a token."""
    if not token and not is_loopback(host):
        raise ConfigurationError(
            f"the dashboard would listen on {host!r} with no token: anyone who reaches it could "
            f"retry, cancel and fork runs. Set SAGA_DASHBOARD_TOKEN (a long random string), or "
            f"bind to 127.0.0.1"
        )


@dataclass(frozen=True)
class Session:
    sid: str
    logged_in: bool  # proved the token through the login form


@dataclass(frozen=True)
class Verdict:
    """What a request may do: ``allowed`` to read; ``session`` is None for Bearer requests."""

    allowed: bool
    session: Session | None
    bearer: bool = False


class Guard:
    def __init__(self, token: str | None, *, secret: bytes | None = None) -> None:
        self._token = token or None
        # Sessions are signed with a key drawn at start: a restart logs everyone out.
        self._secret = secret or secrets.token_bytes(32)

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, candidate: str) -> bool:
        if self._token is None:
            return True
        return hmac.compare_digest(candidate.encode(), self._token.encode())

    def new_session(self, *, logged_in: bool) -> Session:
        return Session(secrets.token_urlsafe(18), logged_in)

    def cookie_value(self, session: Session) -> str:
        body = f"{session.sid}.{int(session.logged_in)}"
        return f"{body}.{self._sign(body)}"

    def set_cookie_header(self, session: Session) -> tuple[str, str]:
        return (
            "Set-Cookie",
            f"{COOKIE}={self.cookie_value(session)}; Path=/; HttpOnly; SameSite=Strict",
        )

    def session_from(self, cookie_header: str | None) -> Session | None:
        if not cookie_header:
            return None
        try:
            jar = SimpleCookie(cookie_header)
        except CookieError:
            return None
        morsel = jar.get(COOKIE)
        if morsel is None:
            return None
        parts = morsel.value.split(".")
        if len(parts) != 3 or parts[1] not in ("0", "1"):
            return None
        sid, flag, signature = parts
        if not hmac.compare_digest(signature, self._sign(f"{sid}.{flag}")):
            return None
        return Session(sid, flag == "1")

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.sid}")

    def judge(self, headers: Mapping[str, str], host_ok: bool) -> Verdict:
        """May this request read? ``headers`` are lower-cased names."""
        session = self.session_from(headers.get("cookie"))
        auth = headers.get("authorization", "")
        if self._token is not None and auth.lower().startswith("bearer "):
            return Verdict(self.token_matches(auth[7:].strip()), None, bearer=True)
        if self._token is None:
            return Verdict(host_ok, session)
        return Verdict(session is not None and session.logged_in, session)

    def may_change(self, verdict: Verdict, headers: Mapping[str, str], csrf: str | None) -> str:
        """Why this POST is refused, or "" when it may go ahead."""
        if not verdict.allowed:
            return "not logged in"
        if verdict.bearer:
            return ""
        cross = cross_site(headers)
        if cross:
            return cross
        if verdict.session is None or not csrf:
            return "the form's CSRF token is missing: reload the page and try again"
        if not hmac.compare_digest(csrf, self.csrf_token(verdict.session)):
            return "the form's CSRF token does not match this session: reload the page"
        return ""


def cross_site(headers: Mapping[str, str]) -> str:
    """Why the browser says this request comes from another site, or ""."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site not in (None, "same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        parsed = urlsplit(origin)
        if origin == "null" or parsed.netloc.lower() != host.lower():
            return f"cross-site request refused (Origin {origin} is not this dashboard)"
    return ""


def host_is_loopback(host_header: str | None) -> bool:
    """The request's Host names loopback (guards a token-less dashboard against DNS
    rebinding: another site's name resolved to 127.0.0.1)."""
    if not host_header:
        return False
    name = urlsplit(f"//{host_header}").hostname or ""
    return is_loopback(name)
