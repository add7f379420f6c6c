"""Which pools a worker accepts: those where step timeouts hold."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery.concurrency import get_implementation

from saga.workers.pools import pool_name, refuse_unsupported_pool


@pytest.mark.parametrize(
    ("pool", "name"),
    [
        ("prefork", "prefork"),
        ("processes", "prefork"),
        ("solo", "solo"),
        ("threads", "threads"),
        ("celery.concurrency.thread:TaskPool", "threads"),
        (get_implementation("threads"), "threads"),
        (get_implementation("prefork"), "prefork"),
        (get_implementation("solo"), "solo"),
        ("eventlet", "eventlet"),
        ("gevent", "gevent"),
    ],
)
def test_pool_names(pool: object, name: str) -> None:
    assert pool_name(pool) == name


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads", get_implementation("threads")])
def test_the_pools_where_timeouts_hold_are_accepted(pool: object) -> None:
    refuse_unsupported_pool(sender=SimpleNamespace(pool_cls=pool))


@pytest.mark.parametrize("pool", ["eventlet", "gevent", "mypkg.pools:Custom"])
def test_other_pools_are_refused_saying_why(pool: str) -> None:
    with pytest.raises(SystemExit, match="timeouts are enforced only on the prefork, solo"):
        refuse_unsupported_pool(sender=SimpleNamespace(pool_cls=pool))
