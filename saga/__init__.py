"""Durable sagas for AI-agent workflows: journaled Celery steps through a Postgres outbox."""

from saga.client import SagaClient
from saga.definition import Saga, Step, StepContext, StepDecl, load_saga, step
from saga.errors import (
    ConfigurationError,
    DefinitionError,
    MalformedMessageError,
    MigrationError,
    RunConflictError,
    RunFailedError,
    RunNotFoundError,
    SagaError,
    StepResultError,
    StoreError,
    UnknownSagaError,
    WaitTimeoutError,
)
from saga.retry import RetryPolicy
from saga.settings import Settings
from saga.store import RunRecord, StepRecord

__all__ = [
    "ConfigurationError",
    "DefinitionError",
    "MalformedMessageError",
    "MigrationError",
    "RetryPolicy",
    "RunConflictError",
    "RunFailedError",
    "RunNotFoundError",
    "RunRecord",
    "Saga",
    "SagaClient",
    "SagaError",
    "Settings",
    "Step",
    "StepContext",
    "StepDecl",
    "StepRecord",
    "StepResultError",
    "StoreError",
    "UnknownSagaError",
    "WaitTimeoutError",
    "load_saga",
    "step",
]
