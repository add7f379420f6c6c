"""The outside service of the travel agent: look-ups, bookings, cancellations and emails.

It keeps its own record, independent of the engine, of every request and its
``Idempotency-Key``:

* ``duplicate_key_requests``: requests whose key's effect was already applied. The service
  answers them with the first answer (as payment APIs do) and applies nothing again. (A retry
  after a 500 that applied nothing is not one: ``keys_seen_more_than_once`` lists those too.)
* ``duplicate_effects``: effects applied more than once, judged by what they are (the same
  booking, cancellation or email body), not by key. This is the number that must stay 0: a
  client that retries without a key, or with a new key, is caught here.

``/stats?trips=PREFIX`` gives the record of each trip whose name starts with PREFIX (not
empty): its effects and how often each was applied, its bookings and their state,
and the first answer under each key, for checks per run.

Faults, drawn per request with probability ``fault_rate`` among ``faults``:

* ``error``  a 500 before anything is applied
* ``lost``   the effect is applied, then the answer is lost (a 502): the classic case where a
             retry without a key books twice

A cancellation may name the booking by ``booking_key`` (the key it was booked under) and a
correction the email by ``correction_of_key``: that is how a compensation undoes a step whose
outcome is unknown. Nothing applied under the key: nothing to undo, and the answer says so.

``/control`` can force faults on the next requests of one key, including ``hold`` (apply, then
no answer until the caller hangs up or is released: a worker to kill after the effect).

Run it as ``python -m saga_dev.testing.effects_server --port 8012``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from saga_dev.testing._faults import FaultyApp, fault_kinds, fault_parser
from saga_dev.testing._http import JSON, App, Reply, Request, main, serve_in_thread

FAULTS = ("error", "lost")
EFFECTS = ("book", "cancel", "send_email")
READS = ("lookup",)


def _canonical(op: str, body: Mapping[str, Any]) -> str:
    return op + ":" + json.dumps(body, sort_keys=True, separators=(",", ":"))


class EffectsServer(FaultyApp):
    FAULTS = FAULTS

    def __init__(
        self,
        *,
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULTS,
        seed: int | None = None,
        hold_seconds: float = 120.0,
    ) -> None:
        super().__init__(
            {
                "fault_rate": fault_rate,
                "faults": list(faults),
                "seed": seed,
                "hold_seconds": hold_seconds,
            }
        )

    def reset(self) -> None:
        super().reset()
        self.totals: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.key_requests: Counter[str] = Counter()
        self.applied: Counter[str] = Counter()  # by canonical effect
        self.answers: dict[str, tuple[str, JSON]] = {}  # key -> (canonical request, answer)
        self.bookings: dict[str, JSON] = {}
        self.emails: list[JSON] = []
        self.trips: dict[str, str] = {}  # canonical effect -> its trip
        self.key_trips: dict[str, str] = {}  # idempotency key -> the trip it was applied for
        self.prefixes: set[str] = set()  # trip prefixes whose requests are counted apart
        self.trip_counts: Counter[tuple[str, str]] = Counter()

    def control(self, changes: JSON) -> JSON:
        self.prefixes.update(changes.pop("count_trips", None) or [])
        return super().control(changes)

    def stats(self, query: Mapping[str, list[str]]) -> JSON:
        detail = query.get("detail", ["1"])[0] != "0"
        prefix = query.get("prefix", [""])[0]
        if "trips" in query:
            return self._trips(query["trips"][0])
        if prefix:
            return self._stats_of(prefix)
        repeated = {k: n for k, n in self.key_requests.items() if n > 1}
        out: JSON = {
            "requests": self.totals["requests"],
            "by_op": dict(self.by_op),
            "keyed_requests": sum(self.key_requests.values()),
            "unkeyed_requests": self.totals["requests"] - sum(self.key_requests.values()),
            "duplicate_key_requests": self.totals["duplicate_key_requests"],
            "key_replays": self.totals["replayed"],
            "effects_applied": sum(self.applied.values()),
            "duplicate_effects": sum(n - 1 for n in self.applied.values() if n > 1),
            "faults": dict(self.fault_counts),
            "bookings": {
                "active": sum(1 for b in self.bookings.values() if b["state"] == "booked"),
                "cancelled": sum(1 for b in self.bookings.values() if b["state"] == "cancelled"),
            },
            "emails_sent": len(self.emails),
            "held": sorted(self.held),
            "config": dict(self.config),
        }
        if detail:
            out["keys_seen_more_than_once"] = dict(sorted(repeated.items())[:100])
            out["bookings_detail"] = dict(self.bookings)
        return out

    def _stats_of(self, prefix: str) -> JSON:
        """Counts over the effects of trips whose name starts with ``prefix`` only."""
        applied = [n for c, n in self.applied.items() if self.trips[c].startswith(prefix)]
        return {
            "prefix": prefix,
            "effects_applied": sum(applied),
            "duplicate_effects": sum(n - 1 for n in applied if n > 1),
            "requests": self.trip_counts[prefix, "requests"],
            "failed_attempts": self.trip_counts[prefix, "faults"],
            "duplicate_key_requests": self.trip_counts[prefix, "duplicate_key_requests"],
        }

    def _trips(self, prefix: str) -> JSON:
        """Per trip: effects applied (by what they are), bookings, first answers by key."""
        out: dict[str, JSON] = {}

        def trip(name: str) -> JSON:
            return out.setdefault(name, {"effects": {}, "bookings": {}, "answers": {}})

        for canonical, n in self.applied.items():
            if self.trips[canonical].startswith(prefix):
                trip(self.trips[canonical])["effects"][canonical] = n
        for booking_id, booking in self.bookings.items():
            if booking["trip"].startswith(prefix):
                trip(booking["trip"])["bookings"][booking_id] = dict(booking)
        for key, name in self.key_trips.items():
            if name.startswith(prefix):
                trip(name)["answers"][key] = self.answers[key][1]
        return {"prefix": prefix, "trips": out}

    def _count_trip(self, body: Mapping[str, Any], what: str) -> None:
        trip = str(body.get("trip", ""))
        for n in (len(p) for p in self.prefixes):
            if trip[:n] in self.prefixes:
                self.trip_counts[trip[:n], what] += 1

    def route(self, request: Request) -> Reply:
        op = request.path.strip("/")
        if request.method != "POST" or op not in (*EFFECTS, *READS):
            return 404, {"error": f"no route {request.method} {request.path}"}, {}
        body = request.body
        if not isinstance(body, dict):
            return 400, {"error": "the body must be a JSON object"}, {}
        key = request.idempotency_key
        canonical = _canonical(op, body)
        with self.lock:
            self.totals["requests"] += 1
            self.by_op[op] += 1
            self._count_trip(body, "requests")
            if key is not None:
                self.key_requests[key] += 1
                if key in self.answers:  # applied before: this one must not apply again
                    self.totals["duplicate_key_requests"] += 1
                    self._count_trip(body, "duplicate_key_requests")
                    first, answer = self.answers[key]
                    if first != canonical:
                        reused = f"idempotency key {key!r} reused for another request"
                        return 422, {"error": reused}, {}
                    self.totals["replayed"] += 1
                    return 200, answer, {"Idempotent-Replayed": "true"}
            fault = self.draw_fault(key)
            if fault in ("error", "lost"):
                self._count_trip(body, "faults")
            if fault == "error":
                self.fault_counts[fault] += 1
                return 500, {"error": "injected fault: internal error, nothing applied"}, {}
            try:
                answer = self._apply(op, body, canonical)
            except (KeyError, TypeError, ValueError) as exc:
                return 400, {"error": f"bad {op} request: {exc}"}, {}
            if key is not None:
                self.answers[key] = (canonical, answer)
                self.key_trips[key] = str(body.get("trip", ""))
            if fault == "lost":
                self.fault_counts[fault] += 1
                return 502, {"error": "injected fault: applied, but the answer was lost"}, {}
            hold = fault == "hold"
            if hold:
                self.held.add(str(key))
        if hold:
            answered = request.wait(
                float(self.config["hold_seconds"]), lambda: key in self.released
            )
            with self.lock:
                self.held.discard(str(key))
                self.released.discard(str(key))
            if not answered:
                return 0, {}, {}
        return 200, answer, {}

    def _apply(self, op: str, body: Mapping[str, Any], canonical: str) -> JSON:
        if op == "lookup":
            return self._lookup(body)
        # Undo by key: a compensation whose step's outcome is unknown names the key the step
        # was asked under; the service undoes what it applied under it, if anything.
        for field, effect in (("booking_key", "booking_id"), ("correction_of_key", "message_id")):
            if field in body:
                applied = self.answers.get(str(body[field]))
                if applied is None:
                    return {"state": "nothing applied under that key", field: body[field]}
                earlier = applied[1]
                rest = {k: v for k, v in body.items() if k != field}
                if effect == "booking_id":
                    body = {**rest, "booking_id": earlier["booking_id"]}
                else:
                    body = {
                        **rest,
                        "to": earlier["to"],
                        "subject": f"Correction to {earlier['message_id']}",
                    }
                canonical = _canonical(op, body)
        self.applied[canonical] += 1
        self.trips[canonical] = str(body.get("trip", ""))
        n = sum(self.applied.values())
        if op == "book":
            booking_id = f"BK-{n:06d}"
            self.bookings[booking_id] = {
                "kind": str(body["kind"]),
                "item": str(body["item"]),
                "trip": str(body.get("trip", "")),
                "state": "booked",
            }
            return {"booking_id": booking_id, "item": body["item"], "state": "booked"}
        if op == "cancel":
            booking = self.bookings.get(str(body["booking_id"]))
            if booking is None:
                raise ValueError(f"no booking {body['booking_id']!r}")
            booking["state"] = "cancelled"
            return {"booking_id": body["booking_id"], "state": "cancelled"}
        self.emails.append(dict(body))
        return {"message_id": f"MSG-{n:06d}", "to": body["to"]}

    @staticmethod
    def _lookup(body: Mapping[str, Any]) -> JSON:
        kind = str(body["kind"])
        where = str(body.get("destination") or body.get("city") or "")
        when = int(body.get("day") or body.get("night") or 1)
        prefix = {"flights": "FL", "hotels": "HT"}.get(kind)
        if prefix is None:
            raise ValueError(f"cannot look up {kind!r}")
        digest = hashlib.sha256(f"{kind}{where}{when}".encode()).digest()
        options = [
            {"id": f"{prefix}-{where[:3].upper()}-{when}-{i}", "price": 80 + digest[i] % 200}
            for i in range(3)
        ]
        return {"kind": kind, "where": where, "options": options}


def serve(port: int = 0, **config: Any) -> Any:
    """An in-process server in a daemon thread (for unit tests)."""
    return serve_in_thread(EffectsServer(**config), port)


def _build(args: argparse.Namespace) -> App:
    return EffectsServer(fault_rate=args.fault_rate, faults=fault_kinds(args), seed=args.seed)


def cli(argv: Sequence[str] | None = None) -> int:
    parser = fault_parser("python -m saga_dev.testing.effects_server", FAULTS)
    return main(_build, parser, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
