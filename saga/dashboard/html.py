"""HTML built with escaping by default: every value put into markup is escaped unless it is
already ``Html`` (markup this package built). A step result holding ``<script>`` renders as text."""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any


class Html(str):
    """Markup that is safe to emit as is."""

    __slots__ = ()


def esc(value: Any) -> Html:
    """``value`` as text in HTML (attributes included: quotes are escaped too)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def h(template: str, *args: Any, **kwargs: Any) -> Html:
    """``template.format(...)`` with every argument escaped. The template itself is trusted:
    always a literal in this package, never data."""
    return Html(template.format(*(esc(a) for a in args), **{k: esc(v) for k, v in kwargs.items()}))


def join(parts: Iterable[Html | str], sep: str = "") -> Html:
    """Concatenate fragments, escaping any that is plain text."""
    return Html(sep.join(esc(p) for p in parts))
