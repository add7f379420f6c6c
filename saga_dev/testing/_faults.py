"""What the two local servers share about faults: their configuration, ``/control`` (change it,
force faults on a key, release a held answer), the per-request draw and the command-line flags."""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from saga_dev.testing._http import JSON, App


class FaultyApp(App):
    """An app whose requests fail on purpose: a fault forced on the request's key through
    /control, else one of ``config["faults"]`` drawn with probability ``config["fault_rate"]``
    from a generator seeded with ``config["seed"]`` (the same seed, the same faults)."""

    FAULTS: ClassVar[tuple[str, ...]]  # every kind the server knows; "hold" can only be forced

    def __init__(self, config: JSON) -> None:
        super().__init__()
        self.config = config
        self._check(self.config)
        self.reset()

    @classmethod
    def _check(cls, config: Mapping[str, Any]) -> None:
        unknown = set(config["faults"]) - set(cls.FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {list(cls.FAULTS)}")
        if not 0 <= float(config["fault_rate"]) <= 1:
            raise ValueError("fault_rate must be within 0..1")

    def reset(self) -> None:
        """Back to the state of a new server; subclasses reset their counts too."""
        self.rng = random.Random(self.config["seed"])
        self.forced: dict[str, list[str]] = {}
        self.held: set[str] = set()
        self.released: set[str] = set()

    def control(self, changes: JSON) -> JSON:
        forced = changes.pop("force", None) or {}
        release = changes.pop("release", None) or []
        config = {**self.config, **{k: v for k, v in changes.items() if k in self.config}}
        self._check(config)
        if config["seed"] != self.config["seed"]:
            self.rng = random.Random(config["seed"])
        self.config = config
        for key, kinds in forced.items():
            if set(kinds) - {*self.FAULTS, "hold"}:
                raise ValueError(f"cannot force {kinds}")
            self.forced.setdefault(key, []).extend(kinds)
        self.released.update(release)
        return dict(self.config)

    def draw_fault(self, key: str | None) -> str | None:
        """This request's fault, or None; call it with ``self.lock`` held."""
        queued = self.forced.get(key or "", [])
        fault = queued.pop(0) if queued else None
        if fault is None and self.rng.random() < float(self.config["fault_rate"]):
            kinds = self.config["faults"] or list(self.FAULTS)
            fault = kinds[self.rng.randrange(len(kinds))]
        return fault


def fault_parser(prog: str, faults: Sequence[str]) -> argparse.ArgumentParser:
    """The flags both servers take: --fault-rate, --faults, --seed."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="per request, 0..1")
    parser.add_argument("--faults", default=",".join(faults), help="comma-separated kinds")
    parser.add_argument("--seed", type=int)
    return parser


def fault_kinds(args: argparse.Namespace) -> list[str]:
    """--faults as a list (empty: every kind)."""
    return [f for f in args.faults.split(",") if f]
