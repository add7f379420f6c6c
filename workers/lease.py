"""The worker process's heartbeat and the lease of the step it is running."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from saga.errors import StoreError
from saga.records import Claim
from saga.store import PostgresStore

log = logging.getLogger("saga.worker")


class LeaseKeeper:
    """One daemon thread per worker process. Every third of the lease it beats the process's
    heart in the worker registry (a silent worker is dead: the sweeper re-dispatches the
    unclaimed steps of its queues, one of which it may have taken), and renews the lease of
    each claim being run (one per pool thread), so a long step is not taken over.

    Steps shorter than a third of the lease never cause a renewal, so the hot path pays nothing
    beyond setting a dict item.
    """

    def __init__(
        self,
        store: PostgresStore,
        lease_seconds: float,
        owner: str,
        queues: Sequence[str],
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._lease = lease_seconds
        self._owner = owner
        self._queues = list(queues)
        self._held: dict[int, Claim] = {}  # by the pool thread running it
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_beat = on_beat or (lambda: None)  # the liveness probe: this loop turns

    def start(self) -> None:
        """Register the process (before it claims anything) and start beating."""
        self._beat()
        self._thread = threading.Thread(target=self._run, name="saga-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """At a clean exit: the process holds no message, nothing to recover. The beating
        stops first, so no later beat registers the process again."""
        self._stopped.set()
        self._wake.set()
        try:
            self._store.deregister_worker(self._owner)
        except StoreError as exc:  # its heart stops anyway: a needless recovery at worst
            log.warning("could not deregister worker %s: %s", self._owner, exc)

    def hold(self, claim: Claim | None) -> None:
        """Set (or, with None, clear) the claim this thread is running."""
        if claim is None:
            self._held.pop(threading.get_ident(), None)
        else:
            self._held[threading.get_ident()] = claim

    def _run(self) -> None:
        interval = self._lease / 3
        while True:
            before = dict(self._held)
            self._wake.wait(interval)
            if self._stopped.is_set():
                return
            # Leases first: a slow heartbeat must not let a running step's lease run out.
            for thread, claim in before.items():
                if self._held.get(thread) is claim:  # held for a whole interval
                    self._renew(claim)
            try:
                self._beat()
            except StoreError as exc:
                log.warning("could not record this worker's heartbeat: %s", exc)
            self._on_beat()

    def _beat(self) -> None:
        self._store.worker_heartbeat(self._owner, self._queues, self._lease)

    def _renew(self, claim: Claim) -> None:
        try:
            if not self._store.renew_lease(claim, self._lease):
                log.warning(
                    "step %r of run %r (attempt %d) lost its lease: another attempt may run; "
                    "this one's outcome will be discarded",
                    claim.step_key,
                    claim.run_id,
                    claim.attempt,
                )
        except StoreError as exc:
            log.warning("could not renew a lease: %s", exc)
