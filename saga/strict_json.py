"""Strict JSON at the edge: every value the engine stores passes here on its way in.

JSON has no NaN or infinities. pydantic writes them as ``null`` and Python's ``json`` as bare
``NaN``/``Infinity`` tokens (which Postgres refuses); a number too large for a float (``1e999``)
parses as infinity. Each would change a value without a word, so each is refused here instead.
Text with the NUL character is refused too: Postgres cannot store it in JSON, and finding out at
commit time would lose a step's outcome after the step had run.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import TypeAdapter

ANY: TypeAdapter[Any] = TypeAdapter(Any)

NUL = (
    "text with the NUL character (\\u0000) cannot be stored: Postgres refuses it in JSON; "
    "remove it, or encode binary data (base64)"
)
NON_FINITE = (
    "NaN and infinite numbers have no JSON form (they would be stored as null); use null, a "
    "string, or a finite number"
)


class NotJSONError(ValueError):
    """A value or text that is not strict JSON; the message says what to change."""


def dump(value: Any, adapter: TypeAdapter[Any] = ANY) -> bytes:
    """``value`` as JSON through ``adapter`` (a pydantic model as its fields, a date as ISO
    8601...). A value that does not fit the adapter's type fails (pydantic's serialisation
    warning, raised); NotJSONError for NaN or infinities anywhere in it."""
    data = adapter.dump_json(value, warnings="error")
    # pydantic writes a non-finite float as null: only output with a null can hide one.
    if b"null" in data and _has_non_finite(adapter.dump_python(value, warnings=False)):
        raise NotJSONError(NON_FINITE)
    # Only output with the escape can hold a NUL; an escaped backslash before "u0000" is text.
    if b"\\u0000" in data and _has_nul(json.loads(data)):
        raise NotJSONError(NUL)
    return data


def loads(text: str | bytes) -> Any:
    """Parse JSON text, refusing ``NaN``, ``Infinity``, numbers out of a float's range, and
    text with the NUL character."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise NotJSONError(f"not JSON: {exc}") from None
    if _has_nul(value):
        raise NotJSONError(NUL)
    return value


def _refuse_constant(token: str) -> Any:
    raise NotJSONError(f"{token} is not JSON: {NON_FINITE}")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise NotJSONError(f"{token} is out of a number's range: {NON_FINITE}")
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_non_finite(v) for v in value)
    return False
