"""A local OpenAI-compatible model server with scripted completions and injectable faults.

``POST /v1/chat/completions`` answers in the OpenAI format. The script is a function of the
conversation alone, so a repeated request gets the same answer: the task's budget ("a budget of
N steps" in the prompt) sets how many turns use a tool before the final JSON answer, and the
tools offered are used in the order of a travel agent's playbook (look up, book, email).

Faults are drawn per request with probability ``fault_rate`` among ``faults``:

* ``500``          an internal error
* ``429``          rate limited, with ``Retry-After`` and ``retry-after-ms``
* ``timeout``      no answer until well after the client's timeout
* ``malformed``    a 200 whose content is prose where a JSON object was asked for
* ``unknown_tool`` a 200 calling a tool that was not offered

``/control`` can also force faults on the next requests of one idempotency key, including
``hold`` (no answer until released or the caller hangs up: a worker to kill mid-call).

Counting is the point: every request is counted by its ``Idempotency-Key`` and by its logical
step (the conversation and its turn), whoever sent it, so a test or benchmark can tell how often
each completion was paid for without trusting the engine. With ``idempotent`` on (the default), a
key whose completion was already served gets that same completion back, counted as a replay
rather than a new completion, as a provider honouring idempotency keys would do.

Run it as ``python -m saga_dev.testing.model_server --port 8011 --fault-rate 0.15``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from saga_dev.testing._faults import FaultyApp, fault_kinds, fault_parser
from saga_dev.testing._http import JSON, App, Reply, Request, main, serve_in_thread

FAULTS = ("500", "429", "timeout", "malformed", "unknown_tool")
BUDGET = re.compile(r"budget of (\d+) steps")
FIELD = re.compile(r"^(Destination|Traveller|Trip): *(.+)$", re.MULTILINE)
PLAYBOOK = ("lookup_flights", "book_flight", "lookup_hotels", "book_hotel", "send_email")
DEFAULT_BUDGET = 5


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def conversation_id(messages: Sequence[Mapping[str, Any]]) -> str:
    """Names the conversation by its opening (system and first user message), prefixed with
    its trip when it names one, so counts can be filtered by trip."""
    opening = [m for m in messages if m.get("role") in ("system", "user")][:2]
    blob = json.dumps([_text(m) for m in opening])
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    trip = next(
        (v.strip() for m in opening for k, v in FIELD.findall(_text(m)) if k == "Trip"), None
    )
    return f"{trip}:{digest}" if trip else digest


def logical_step(messages: Sequence[Mapping[str, Any]]) -> str:
    """The conversation and its turn: the same completion asked for again has the same name."""
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    return f"{conversation_id(messages)}/{turn}"


# -- the script ---------------------------------------------------------------------------------


def _facts(messages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    facts = {"Destination": "Lisbon", "Traveller": "traveller@example.org", "Trip": "trip"}
    for m in messages:
        if m.get("role") in ("system", "user"):
            facts.update({k: v.strip() for k, v in FIELD.findall(_text(m))})
    return facts


def _last_tool_result(messages: Sequence[Mapping[str, Any]]) -> Any:
    for m in reversed(messages):
        if m.get("role") == "tool":
            try:
                return json.loads(_text(m))
            except json.JSONDecodeError:
                return None
    return None


def _first_option(messages: Sequence[Mapping[str, Any]], fallback: str) -> str:
    result = _last_tool_result(messages)
    if isinstance(result, dict) and result.get("options"):
        first = result["options"][0]
        if isinstance(first, dict) and "id" in first:
            return str(first["id"])
    return fallback


def _arguments(tool: str, messages: Sequence[Mapping[str, Any]], turn: int) -> dict[str, Any]:
    facts = _facts(messages)
    dest, leg = facts["Destination"], turn // len(PLAYBOOK) + 1
    if tool == "lookup_flights":
        return {"destination": dest, "day": leg}
    if tool == "book_flight":
        return {"flight_id": _first_option(messages, f"FL-{dest[:3].upper()}-{leg}")}
    if tool == "lookup_hotels":
        return {"city": dest, "night": leg}
    if tool == "book_hotel":
        return {"hotel_id": _first_option(messages, f"HT-{dest[:3].upper()}-{leg}")}
    if tool == "send_email":
        return {
            "to": facts["Traveller"],
            "subject": f"Your trip to {dest}, part {leg}",
            "body": f"Bookings so far for trip {facts['Trip']} are confirmed.",
        }
    return {}


def scripted_message(body: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The assistant message for this conversation, and its finish reason."""
    messages: list[dict[str, Any]] = body["messages"]
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    found = next((BUDGET.search(_text(m)) for m in messages if BUDGET.search(_text(m))), None)
    budget = int(found.group(1)) if found else DEFAULT_BUDGET
    offered = [
        t["function"]["name"]
        for t in body.get("tools") or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    if turn >= budget - 1 or not offered:
        facts = _facts(messages)
        booked = [
            r["booking_id"]
            for m in messages
            if m.get("role") == "tool"
            and isinstance(r := _safe_json(_text(m)), dict)
            and "booking_id" in r
        ]
        answer = {
            "answer": f"Trip {facts['Trip']} to {facts['Destination']} is arranged.",
            "bookings": booked,
        }
        return {"role": "assistant", "content": json.dumps(answer)}, "stop"
    playbook = [t for t in PLAYBOOK if t in offered] or offered
    tool = playbook[turn % len(playbook)]
    call = {
        "id": f"call_{turn}",
        "type": "function",
        "function": {"name": tool, "arguments": json.dumps(_arguments(tool, messages, turn))},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


def _safe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))  # the usual rough rule: four characters a token


def completion_body(
    body: Mapping[str, Any], message: Mapping[str, Any], finish: str, seed: str
) -> JSON:
    prompt = sum(_tokens(json.dumps(m)) for m in body["messages"])
    completion = _tokens(json.dumps(message))
    return {
        "id": "chatcmpl-" + hashlib.sha256(seed.encode()).hexdigest()[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or "scripted"),
        "choices": [{"index": 0, "message": dict(message), "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


# -- the server ---------------------------------------------------------------------------------


def _counter() -> dict[str, int]:
    return {"ok": 0, "replayed": 0, "faults": 0, "abandoned": 0}


class ModelServer(FaultyApp):
    FAULTS = FAULTS

    def __init__(
        self,
        *,
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULTS,
        seed: int | None = None,
        timeout_seconds: float = 3.0,
        retry_after_seconds: float = 0.2,
        hold_seconds: float = 120.0,
        idempotent: bool = True,
    ) -> None:
        super().__init__(
            {
                "fault_rate": fault_rate,
                "faults": list(faults),
                "seed": seed,
                "timeout_seconds": timeout_seconds,
                "retry_after_seconds": retry_after_seconds,
                "hold_seconds": hold_seconds,
                "idempotent": idempotent,
            }
        )

    def reset(self) -> None:
        super().reset()
        self.totals: Counter[str] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.by_key: dict[str, dict[str, int]] = defaultdict(_counter)
        self.by_step: dict[str, dict[str, int]] = defaultdict(_counter)
        self.usage: Counter[str] = Counter()
        self.cache: dict[str, JSON] = {}

    def stats(self, query: Mapping[str, list[str]]) -> JSON:
        detail = query.get("detail", ["1"])[0] != "0"
        prefix = query.get("prefix", [""])[0]
        if prefix:
            return self._stats_of(prefix)
        out: JSON = {
            "requests": self.totals["requests"],
            "completions": self.totals["ok"],
            "replays": self.totals["replayed"],
            "abandoned": self.totals["abandoned"],
            "faults": dict(self.fault_counts),
            "failed_attempts": sum(self.fault_counts.values()),
            "usage": dict(self.usage),
            "held": sorted(self.held),
            "config": dict(self.config),
        }
        if detail:
            out["by_key"] = dict(self.by_key)
            out["by_step"] = dict(self.by_step)
        return out

    def _stats_of(self, prefix: str) -> JSON:
        """Counts over the conversations whose trip starts with ``prefix`` only."""
        steps = [c for step, c in self.by_step.items() if step.startswith(prefix)]
        return {
            "prefix": prefix,
            "calls": sum(c["ok"] + c["faults"] + c["abandoned"] for c in steps),
            "steps_answered": sum(1 for c in steps if c["ok"] > 0),
            "steps_answered_twice": sum(1 for c in steps if c["ok"] > 1),
            "completions": sum(c["ok"] for c in steps),
            "failed_attempts": sum(c["faults"] for c in steps),
            "replays": sum(c["replayed"] for c in steps),
            "abandoned": sum(c["abandoned"] for c in steps),
        }

    def _count(self, what: str, key: str | None, step: str, fault: str | None = None) -> None:
        self.totals[what] += 1
        if fault is not None:
            self.fault_counts[fault] += 1
        field = "faults" if fault is not None else what
        self.by_step[step][field] += 1
        if key is not None:
            self.by_key[key][field] += 1

    def route(self, request: Request) -> Reply:
        if request.method != "POST" or request.path.rstrip("/") not in (
            "/v1/chat/completions",
            "/chat/completions",
        ):
            return 404, {"error": {"message": f"no route {request.method} {request.path}"}}, {}
        body = request.body
        if not (
            isinstance(body, dict)
            and isinstance(body.get("messages"), list)
            and body["messages"]
            and all(isinstance(m, dict) for m in body["messages"])
        ):
            return 400, {"error": {"message": "messages must be a non-empty list of objects"}}, {}
        key = request.idempotency_key
        step = logical_step(body["messages"])
        with self.lock:
            self.totals["requests"] += 1
            if key is not None and self.config["idempotent"] and key in self.cache:
                self._count("replayed", key, step)
                return 200, self.cache[key], {"Idempotent-Replayed": "true"}
            fault = self.draw_fault(key)
            config = dict(self.config)
        if fault == "hold":
            assert key is not None
            with self.lock:
                self.held.add(key)
            answered = request.wait(config["hold_seconds"], lambda: key in self.released)
            with self.lock:
                self.held.discard(key)
                self.released.discard(key)
                if not answered:  # the caller died waiting: nothing was delivered
                    self._count("abandoned", key, step)
                    return 0, {}, {}
            fault = None
        return self._answer(request, body, key, step, fault, config)

    def _answer(
        self,
        request: Request,
        body: JSON,
        key: str | None,
        step: str,
        fault: str | None,
        config: JSON,
    ) -> Reply:
        if fault == "500":
            with self.lock:
                self._count("fault", key, step, fault)
            return 500, {"error": {"message": "injected fault: internal error"}}, {}
        if fault == "429":
            with self.lock:
                self._count("fault", key, step, fault)
            wait = float(config["retry_after_seconds"])
            headers = {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1000))}
            error = {"message": "injected fault: rate limited", "type": "rate_limit"}
            return 429, {"error": error}, headers
        if fault == "timeout":
            with self.lock:
                self._count("fault", key, step, fault)
            request.wait(float(config["timeout_seconds"]))
            return 504, {"error": {"message": "injected fault: answered too late"}}, {}
        if fault == "malformed":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "Sure! I would book the earliest flight, then a hotel near the centre.",
            }
            with self.lock:
                self._count("fault", key, step, fault)
            return 200, completion_body(body, message, "stop", f"{step}:malformed"), {}
        if fault == "unknown_tool":
            call = {
                "id": "call_x",
                "type": "function",
                "function": {"name": "teleport", "arguments": json.dumps({"to": "the moon"})},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            with self.lock:
                self._count("fault", key, step, fault)
            return 200, completion_body(body, message, "tool_calls", f"{step}:unknown"), {}
        message, finish = scripted_message(body)
        reply = completion_body(body, message, finish, f"{key or step}")
        with self.lock:
            self._count("ok", key, step)
            for name, value in reply["usage"].items():
                self.usage[name] += value
            if key is not None:
                self.cache[key] = reply
        return 200, reply, {}


def serve(port: int = 0, **config: Any) -> Any:
    """An in-process server in a daemon thread (for unit tests): ``.url``, ``.app``,
    ``.shutdown()``."""
    return serve_in_thread(ModelServer(**config), port)


def _build(args: argparse.Namespace) -> App:
    return ModelServer(
        fault_rate=args.fault_rate,
        faults=fault_kinds(args),
        seed=args.seed,
        timeout_seconds=args.timeout_seconds,
        retry_after_seconds=args.retry_after_seconds,
        idempotent=not args.no_idempotency,
    )


def cli(argv: Sequence[str] | None = None) -> int:
    parser = fault_parser("python -m saga_dev.testing.model_server", FAULTS)
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=3.0,
        help="how long a 'timeout' fault stalls (beyond the client's timeout)",
    )
    parser.add_argument("--retry-after-seconds", type=float, default=0.2)
    parser.add_argument(
        "--no-idempotency",
        action="store_true",
        help="answer a repeated Idempotency-Key anew (and count it again)",
    )
    return main(_build, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
