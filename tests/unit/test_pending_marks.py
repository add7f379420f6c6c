"""The fast path's publish marks: taken by the next claim, or flushed by a thread when idle."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence

from saga.outbox.message import OutboxMessage
from saga.workers.publish import PendingMarks


def _messages(n: int) -> list[OutboxMessage]:
    return [OutboxMessage("saga.step", "q", {"n": i}) for i in range(n)]


class Recorder:
    def __init__(self) -> None:
        self.marked: list[uuid.UUID] = []
        self.called = threading.Event()

    def __call__(self, ids: Sequence[uuid.UUID]) -> None:
        self.marked.extend(ids)
        self.called.set()


def test_a_claim_takes_the_pending_marks_and_the_thread_then_has_nothing_to_mark() -> None:
    recorder = Recorder()
    marks = PendingMarks(recorder, flush_after=0.2)
    sent = _messages(3)
    marks.add(sent)
    assert marks.take() == [m.message_id for m in sent]
    assert marks.take() == []
    assert not recorder.called.wait(1.0), "marks already taken were marked again"


def test_an_idle_process_has_its_marks_flushed_by_the_thread() -> None:
    recorder = Recorder()
    marks = PendingMarks(recorder, flush_after=0.05)
    first, second = _messages(2), _messages(1)
    marks.add(first)
    assert recorder.called.wait(10), "the marking thread never flushed"
    recorder.called.clear()
    marks.add(second)
    assert recorder.called.wait(10), "the marking thread flushed only once"
    assert recorder.marked == [m.message_id for m in first + second]
    assert marks.take() == []


def test_a_failing_mark_is_logged_and_the_thread_keeps_going() -> None:
    calls: list[int] = []
    failed, done = threading.Event(), threading.Event()

    def mark(ids: Sequence[uuid.UUID]) -> None:
        calls.append(len(ids))
        if len(calls) == 1:
            failed.set()
            raise RuntimeError("database away")
        done.set()

    marks = PendingMarks(mark, flush_after=0.05)
    marks.add(_messages(2))
    assert failed.wait(10)
    # That batch is dropped (the relay publishes those rows again); the next one is marked.
    marks.add(_messages(1))
    assert done.wait(10)
    assert calls == [2, 1]
