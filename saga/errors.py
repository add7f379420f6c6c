"""Exception types. Each message names the ids involved and says what to do.

Every exception here pickles/unpickles by its message alone (``args`` holds exactly the message),
so it survives Celery's result backend and multiprocessing, and ``str()`` of it is JSON-friendly.
"""

from __future__ import annotations


class SagaError(Exception):
    """Base class for every error this package raises on purpose."""

    def __reduce__(self) -> tuple[type[SagaError], tuple[str]]:
        return (type(self), (str(self),))


class ConfigurationError(SagaError):
    """The settings are missing something or contradict each other."""


class DefinitionError(SagaError):
    """A saga definition is invalid (raised when its module is imported)."""


class UnknownSagaError(SagaError):
    """A saga reference (``module:attribute``) does not name a saga."""


class RunNotFoundError(SagaError):
    """No run has the given id."""


class RunConflictError(SagaError):
    """A run id is already taken by a run of another saga or with another input."""


class LimitReachedError(SagaError):
    """A run was refused at its start: its definition's ``Concurrency(on_limit="refuse")``
    already has as many runs for its key as the limit allows."""


class RunFailedError(SagaError):
    """The awaited run ended in a failed state."""


class WaitTimeoutError(SagaError):
    """The awaited run did not finish in time; it keeps running."""


class InputError(SagaError):
    """A run input or event payload the engine cannot take: it does not fit the saga's
    annotation, is not strict JSON, is too large, or names no valid event."""


class StepResultError(SagaError):
    """A step returned a result that cannot be journaled (not JSON, or too large)."""


class MalformedMessageError(SagaError):
    """A task message does not have the shape the engine sends; it is dropped, not retried."""


class UnsignedMessageError(MalformedMessageError):
    """Message signing is on and a task message is unsigned, or its signature does not verify
    under any known key; it is dropped, not retried."""


class StoreError(SagaError):
    """Postgres failed underneath the store (the driver's error is the ``__cause__``)."""


class StoreRejectedError(StoreError):
    """Postgres refused the data or the statement itself (a value it cannot store, a broken
    constraint): unlike an outage, retrying fails the same way."""


class MigrationError(SagaError):
    """The schema could not be brought up to date."""


class StepTimeoutError(SagaError):
    """A step ran longer than its timeout; the attempt fails and is retried per its policy."""


class AttemptFailedError(SagaError):
    """A step attempt failed; its error is journaled. Raised to Celery only, so that its tools
    (events, Flower) report the attempt as failed or retried, never as a success."""
