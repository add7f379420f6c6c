"""The ``saga`` command's exit codes, and which error ends with which (README: Operating runs)."""

from __future__ import annotations

from enum import IntEnum

from saga.errors import RunFailedError, RunNotFoundError, SagaError, StoreError, WaitTimeoutError
from saga.records import OperatorError, RunTransitionError


class Exit(IntEnum):
    DONE = 0
    UNFINISHED = 1  # the run failed, or did not finish in the time given
    USAGE = 2  # bad arguments, input or settings (argparse exits 2 too)
    NOT_FOUND = 3  # no such run, or it is in no state for what was asked
    POSTGRES = 4  # Postgres could not be reached, or refused a statement


def exit_code(exc: SagaError) -> Exit:
    if isinstance(exc, RunFailedError | WaitTimeoutError):
        return Exit.UNFINISHED
    if isinstance(exc, RunNotFoundError | OperatorError | RunTransitionError):
        return Exit.NOT_FOUND
    if isinstance(exc, StoreError):
        return Exit.POSTGRES
    return Exit.USAGE
