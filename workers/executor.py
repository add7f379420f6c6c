"""Runs one attempt of a step: claim, call, journal the outcome, publish what it caused.

A message only names a step; the journal decides whether it runs. A duplicate or stale message
finds the step completed or claimed and is acked without calling anything.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from celery import Celery
from pydantic import ValidationError

from saga import coordinator, logs, metrics, tracing
from saga.definition import StepContext, StepOptions, function_by_ref
from saga.errors import RunNotFoundError, StoreError, StoreRejectedError, UnknownSagaError
from saga.failures import ErrorRecord, ErrorType, error_record
from saga.loader import load_definition
from saga.messages import AdvanceMessage, StepMessage, parse
from saga.outbox.message import OutboxMessage
from saga.records import Claim, Fenced, StepSnapshot
from saga.settings import Settings
from saga.states import RunState, StepKind, StepState
from saga.store import PostgresStore, open_pool
from saga.workers.calling import call_step
from saga.workers.lease import LeaseKeeper
from saga.workers.publish import CeleryPublisher, publish_now
from saga.workflow import Workflow

log = logging.getLogger("saga.worker")

T = TypeVar("T")


class StepExecutor:
    """Per-process: owns this process's Postgres pool, publisher and lease keeper."""

    def __init__(
        self, settings: Settings, app: Celery, queues: Sequence[str] | None = None
    ) -> None:
        assert settings.database_url, "the worker entry point checks this"
        self.settings = settings
        tracing.export_exception_details(settings.trace_exception_details)
        self.store = PostgresStore(
            # The task, the lease keeper and the publish-mark flusher each may hold one.
            open_pool(settings.database_url, size=settings.pool_size, name="saga-worker"),
            queue=settings.queue,
            dispatch_timeout=settings.dispatch_timeout_seconds,
            key_prefix=settings.key_prefix,
        )
        self.publisher = CeleryPublisher(app)
        # host:pid, and a token of this boot: a restarted container with the same host name and
        # pid is another worker (the registry must see the old one die).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._deliveries = itertools.count(1)  # numbers this process's deliveries (see execute)
        liveness = getattr(app, "saga_liveness", None)  # set when the worker serves probes
        # The registry recovers the queues this worker reads (``-Q a,b``) when it dies.
        self.leases = LeaseKeeper(
            self.store,
            settings.lease_seconds,
            self.owner,
            list(queues or [settings.queue]),
            on_beat=None
            if liveness is None
            # A solo pool's loop is held by a long step; this thread still beats.
            else lambda: liveness.tick("heartbeat", settings.lease_seconds),
        )
        self.leases.start()
        self._advance = functools.partial(coordinator.advance, load=load_definition)
        self._system = tracing.messaging_system(app.conf.broker_url)

    # -- tasks --------------------------------------------------------------------------------

    def execute(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        task_id: str | None,
        headers: Mapping[str, Any] | None = None,
    ) -> tracing.AttemptTrace | None:
        """Run the attempt the message names; its trace (``outcome``: completed, retry,
        failed, fenced), or None when there was nothing to run (a duplicate, a stale one)."""
        received_ns = time.time_ns()
        msg = parse(StepMessage, args, kwargs)
        # A token per delivery: a claim retried after a lost reply recognises its own lease.
        # The owner is this process's boot; a count tells its deliveries apart.
        owner = f"{self.owner}:{next(self._deliveries)}"
        claim = self._durably(
            "claiming",
            lambda: self.store.claim_step(
                msg.run_id,
                msg.step_key,
                owner=owner,
                lease=self.settings.lease_seconds,
            ),
        )
        if claim is None:
            claim = self._claim_gated(msg, owner, task_id, headers)
        if claim is None:
            return None
        with (
            tracing.attempt(
                claim,
                headers,
                queue=self.settings.queue,
                system=self._system,
                message_id=task_id,
                received_ns=received_ns,
            ) as trace,
            logs.bound_step(
                claim.run_id,
                claim.step_key,
                claim.attempt,
                logs.trace_id_of((claim.trace_context or {}).get("traceparent")),
            ),
        ):
            self._execute_claimed(claim)
        return trace

    def _claim_gated(
        self,
        msg: StepMessage,
        owner: str,
        task_id: str | None,
        headers: Mapping[str, Any] | None,
    ) -> Claim | None:
        """A claim refused: the step has limits (it takes its gates first), or there is
        nothing to run (a duplicate, a stale message), which is explained."""
        state = self.store.step_state(msg.run_id, msg.step_key)
        if state is None or not state.gated:
            self._explain_refusal(msg, task_id, headers, state)
            return None
        if state.fn_ref is not None:
            # Its code imported before it takes a rate limit's budget: a worker's first step
            # of a module would spend a granted window importing it, and call late, bunched
            # with the next window's calls. (A failure is the attempt's, after the claim.)
            with contextlib.suppress(Exception):
                function_by_ref(state.fn_ref)
        gated = self._durably(
            "claiming",
            lambda: self.store.claim_gated_step(
                msg.run_id, msg.step_key, owner=owner, lease=self.settings.lease_seconds
            ),
        )
        if gated is None:  # not claimable (any more): a duplicate or a stale message
            self._explain_refusal(msg, task_id, headers, None)
            return None
        if gated.claim is None:
            assert gated.throttled_by is not None
            log.info(
                "step %r of run %r waits in line for %s",
                msg.step_key,
                msg.run_id,
                gated.throttled_by["gate"],
            )
            metrics.step_throttled(gated.throttled_by)
            return None
        for gate, since in gated.waited:
            metrics.step_waited(gate, since)
            tracing.record_wait(
                gated.claim.trace_context,
                kind=str(gate["kind"]) if gate["kind"] == "concurrency" else "rate_limit",
                saga_name=gated.claim.saga_name,
                run_id=gated.claim.run_id,
                step=gated.claim.step_name,
                attempt=gated.claim.attempt,
                start=since,
                attributes={
                    tracing.SAGA_STEP_KEY: gated.claim.step_key,
                    "saga.limit.gate": gate["gate"],
                },
            )
        return gated.claim

    def _execute_claimed(self, claim: Claim) -> None:
        if claim.attempt > 1 and tracing.recording():
            self._trace_backoff(claim)
        self.leases.hold(claim)
        try:
            self._run(claim)
        except Fenced:
            tracing.attempt_fenced()
            log.warning(
                "attempt %d of step %r of run %r was overtaken (lease lost or run ended); its "
                "outcome was discarded",
                claim.attempt,
                claim.step_key,
                claim.run_id,
            )
        finally:
            self.leases.hold(None)

    def advance(self, args: Sequence[Any], kwargs: Mapping[str, Any], task_id: str | None) -> None:
        msg = parse(AdvanceMessage, args, kwargs)
        try:
            self._durably("advancing", lambda: self.store.advance_run(msg.run_id, self._advance))
        except RunNotFoundError:  # a late duplicate for a run deleted by retention
            log.warning(
                "task %s advances run %r, which does not exist; dropped", task_id, msg.run_id
            )

    # -- one attempt --------------------------------------------------------------------------

    def _run(self, claim: Claim) -> None:
        if claim.kind == StepKind.TIMER:
            self._complete(claim, "null")
            return
        if claim.kind == StepKind.EVENT:  # dispatched only when its wait timed out
            timed_out = f"no event {claim.step_name!r} arrived in time"
            self._fail(claim, ErrorType.EVENT_TIMEOUT, timed_out, None)
            return
        options = StepOptions.from_json(claim.options)
        try:
            assert claim.fn_ref is not None
            function = function_by_ref(claim.fn_ref)
        except UnknownSagaError as exc:
            # Perhaps this worker runs older code than the run; another worker may do better.
            retry = 5.0 if claim.attempt < claim.max_attempts else None
            self._fail_with(claim, exc, retry)
            return
        ctx = StepContext(
            run_id=claim.run_id,
            saga=claim.saga_name,
            step=claim.step_name,
            step_key=claim.step_key,
            attempt=claim.attempt,
            idempotency_key=claim.idempotency_key,
            run_input=claim.run_input,
            load_results=lambda: self.store.completed_results(claim.run_id),
            undo=options.undo,
        )
        try:
            value = function.validate_input(claim.input)
        except ValidationError as exc:
            self._fail_with(claim, exc, None)  # the same input fails the same way every time
            return
        try:
            with tracing.step_span(
                saga_name=claim.saga_name,
                run_id=claim.run_id,
                step=claim.step_name,
                attempt=claim.attempt,
                idempotency_key=claim.idempotency_key,
                compensation=claim.kind == StepKind.COMPENSATION,
            ):
                # Async steps on this thread's event loop; the timeout held on every pool.
                result = call_step(
                    function.fn, ctx, value, options.timeout_seconds, f"step {claim.step_key!r}"
                )
                result_json = function.encode_result(
                    result,
                    limit=self.settings.max_result_bytes,
                    run_id=claim.run_id,
                    step=claim.step_key,
                )
        except Exception as exc:
            decision = options.retry.decide(claim.attempt, exc)
            retry_in = decision.delay_seconds if decision.retry else None
            self._pause_limits(claim, exc)
            self._fail_with(claim, exc, retry_in, recorded=True)
            return
        self._complete(claim, result_json, ctx.usage)

    def _pause_limits(self, claim: Claim, exc: Exception) -> None:
        """A provider's 429 with Retry-After (an error with ``retry_after_seconds``) pauses
        the step's rate limits for everyone, not just this step's next attempt."""
        seconds = getattr(exc, "retry_after_seconds", None)
        if "gates" not in claim.options or not isinstance(seconds, int | float):
            return
        if not 0 < seconds <= 24 * 3600:
            return
        try:
            paused = self.store.pause_gates(claim.options, float(seconds))
        except StoreError as store_exc:  # the retry's own backoff still honours it
            log.warning("could not pause the rate limits of step %r: %s", claim.step_key, store_exc)
            return
        if paused:
            log.warning("rate limits %s paused for %.1f s (the service asked)", paused, seconds)

    def _complete(
        self, claim: Claim, result_json: str, usage: Mapping[str, int] | None = None
    ) -> None:
        try:
            done = self._durably(
                "journaling the result",
                lambda: self.store.complete_step(
                    claim,
                    result_json,
                    self._advance,
                    fast_path=True,
                    read_journal=self._replays(claim),
                    usage=usage,
                ),
                claim,
            )
        except (Fenced, StoreError) as exc:
            if not isinstance(exc, StoreRejectedError):
                raise  # the fence, or an outage that outlasted the lease: the sweeper takes over
            self._not_journaled(claim, exc)
            return
        except Exception as exc:  # e.g. the coordinator failing on this outcome: every time
            self._not_journaled(claim, exc)
            return
        tracing.attempt_completed()
        if done is not None:
            self._publish_now(done)

    def _not_journaled(self, claim: Claim, exc: Exception) -> None:
        """The step ran, but its outcome cannot be written, and writing it again would fail the
        same way. It must not run again for want of a journal row: its attempt is journaled as
        failed for good, naming the cause, and the run goes on as for any such failure (the
        step's outcome is unknown: compensated if it has a compensation)."""
        log.error(
            "step %r of run %r ran, but its outcome cannot be journaled: %s",
            claim.step_key,
            claim.run_id,
            exc,
        )
        message = (
            f"step {claim.step_key!r} of run {claim.run_id!r} ran on attempt {claim.attempt}, "
            f"but its outcome could not be journaled ({type(exc).__name__}: {exc}); the step is "
            f"not run again"
        )
        error = error_record(exc, message, attempt=claim.attempt, retryable=False, traceback=True)
        tracing.attempt_failed(exc, will_retry=False, record=True)
        self._record_failure(claim, error, None)

    def _fail_with(
        self, claim: Claim, exc: BaseException, retry_in: float | None, *, recorded: bool = False
    ) -> None:
        tracing.attempt_failed(exc, will_retry=retry_in is not None, record=not recorded)
        log.warning(
            "step %r of run %r failed on attempt %d/%d (%s)%s",
            claim.step_key,
            claim.run_id,
            claim.attempt,
            claim.max_attempts,
            type(exc).__name__,
            f"; retrying in {retry_in:.1f} s" if retry_in is not None else "; not retrying",
        )
        self._record_failure(
            claim,
            error_record(
                exc, attempt=claim.attempt, retryable=retry_in is not None, traceback=True
            ),
            retry_in,
        )

    def _fail(self, claim: Claim, type_: ErrorType, message: str, retry_in: float | None) -> None:
        self._record_failure(claim, error_record(type_, message, attempt=claim.attempt), retry_in)

    def _record_failure(self, claim: Claim, error: ErrorRecord, retry_in: float | None) -> None:
        def journal(advance: Callable[[Any], None]) -> list[OutboxMessage] | None:
            return self._durably(
                "journaling a failure",
                lambda: self.store.fail_attempt(
                    claim,
                    error,
                    retry_in=retry_in,
                    advance=advance,
                    fast_path=True,
                    read_journal=self._replays(claim),
                ),
                claim,
            )

        try:
            done = journal(self._advance)
        except (Fenced, StoreError) as exc:
            if not isinstance(exc, StoreRejectedError):
                raise
            done = journal(self._fail_run(error, exc))
        except Exception as exc:  # advancing the run fails on this outcome, every time
            done = journal(self._fail_run(error, exc))
        if done is not None:
            self._publish_now(done)

    @staticmethod
    def _fail_run(error: ErrorRecord, exc: Exception) -> Callable[[Any], None]:
        """When the run cannot be advanced past a failure: journal the failure and stop the run
        with both causes, for an operator to fix and ``saga retry``: a compensating run ends
        ``compensation_failed`` (a retry goes on undoing), a running one ``failed``."""
        why = f"{error['message']}; the run could not advance past it ({type(exc).__name__}: {exc})"
        stuck = error_record(exc, why, traceback=True)

        def stop(tx: Any) -> None:
            if tx.run.state == RunState.COMPENSATING:
                tx.finish(RunState.COMPENSATION_FAILED)  # keeps the run's original error
            else:
                tx.finish(RunState.FAILED, error=stuck)

        return stop

    @staticmethod
    def _replays(claim: Claim) -> bool:
        """Whether advancing the claim's run replays a workflow (which reads the journal)."""
        try:
            return isinstance(load_definition(claim.saga_ref), Workflow)
        except Exception:  # the coordinator reports a definition that fails to load; not here
            return False

    def _publish_now(self, messages: list[OutboxMessage]) -> None:
        publish_now(self.publisher, self.store.relay_later, messages)

    def _trace_backoff(self, claim: Claim) -> None:
        """A span for the wait before this retry: from the journaled failure of the previous
        attempt (which the claim read) to now."""
        failed_at = tracing.parse_time(claim.previous_failed_at)
        if failed_at is None:
            return  # e.g. the previous attempt was lost with its worker: no failure time
        tracing.record_wait(
            claim.trace_context,
            kind="retry_backoff",
            saga_name=claim.saga_name,
            run_id=claim.run_id,
            step=claim.step_name,
            attempt=claim.attempt,
            start=failed_at,
            attributes={tracing.ERROR_TYPE: claim.previous_error_type or ""},
        )

    # -- helpers ------------------------------------------------------------------------------

    def _durably(self, what: str, action: Callable[[], T], claim: Claim | None = None) -> T | None:
        """Run a store action, retrying through short Postgres outages (a cut connection, a
        failover) for up to one lease: the step's work is done and must not be lost to a blip.

        A retried outcome whose first try did commit meets the fence; that is success, and
        returns None. The messages that commit caused were never published (its reply was
        lost with the connection): they are made due now, and the sweeper sends them.
        """
        delay, deadline, retried = 0.05, time.monotonic() + self.settings.lease_seconds, False
        while True:
            try:
                return action()
            except Fenced:
                if retried and claim is not None and self._committed_by_us(claim):
                    self._durably("handing its messages to the sweeper", self._owed_now(claim))
                    return None
                raise
            except StoreRejectedError:
                raise  # refused as written: another try fails the same way
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s failed, retrying in %.2f s: %s", what, delay, exc)
                time.sleep(delay)
                delay, retried = min(delay * 2, 1.0), True

    def _owed_now(self, claim: Claim) -> Callable[[], None]:
        return lambda: self.store.messages_owed_now(claim.run_id)

    def _committed_by_us(self, claim: Claim) -> bool:
        state = self.store.step_state(claim.run_id, claim.step_key)
        return (
            state is not None
            and state.attempt == claim.attempt
            and state.state != StepState.RUNNING
        )

    def _explain_refusal(
        self,
        msg: StepMessage,
        task_id: str | None,
        headers: Mapping[str, Any] | None,
        state: StepSnapshot | None,
    ) -> None:
        if state is None:
            state = self.store.step_state(msg.run_id, msg.step_key)
        if state is None:
            log.warning(
                "task %s names step %r of run %r, which does not exist; dropped",
                task_id,
                msg.step_key,
                msg.run_id,
            )
            return
        log.info(
            "task %s: step %r of run %r is %s (attempt %d, run %s); nothing to do",
            task_id,
            msg.step_key,
            msg.run_id,
            state.state,
            state.attempt,
            state.run_state,
        )
        # A duplicate of a completed step: its result is read back, not made again.
        if state.state == StepState.COMPLETED:
            tracing.replayed_step(
                state.trace_context,
                saga_name=state.saga_name,
                run_id=msg.run_id,
                step=state.step_name,
                attempt=state.attempt,
                idempotency_key=state.idempotency_key,
                compensation=state.kind == StepKind.COMPENSATION,
                headers=headers,
            )
