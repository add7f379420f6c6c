"""Keeps the lease of the step this process is running, so a long step is not taken over."""

from __future__ import annotations

import logging
import threading

from saga.errors import StoreError
from saga.records import Claim
from saga.store import PostgresStore

log = logging.getLogger("saga.worker")


class LeaseKeeper:
    """One daemon thread per process; renews the current claim every third of the lease.

    Steps shorter than a third of the lease never cause a renewal, so the hot path pays nothing
    beyond setting an attribute.
    """

    def __init__(self, store: PostgresStore, lease_seconds: float) -> None:
        self._store = store
        self._lease = lease_seconds
        self._current: Claim | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, claim: Claim | None) -> None:
        """Set (or, with None, clear) the claim being run."""
        self._current = claim
        if claim is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="saga-lease", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = self._lease / 3
        while True:
            claim = self._current
            self._wake.wait(interval)
            # Renew only a claim that has been held for a whole interval.
            if claim is None or claim is not self._current:
                continue
            try:
                if not self._store.renew_lease(claim, self._lease):
                    log.warning(
                        "step %r of run %r (attempt %d) lost its lease: another attempt may "
                        "run; this one's outcome will be discarded",
                        claim.step_key,
                        claim.run_id,
                        claim.attempt,
                    )
            except StoreError as exc:
                log.warning("could not renew a lease: %s", exc)
