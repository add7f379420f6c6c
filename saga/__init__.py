"""Durable sagas for AI-agent workflows: journaled Celery steps through a Postgres outbox."""

from saga.async_client import AsyncSagaClient
from saga.client import SagaClient
from saga.definition import Saga, StepArgs, StepContext, StepDecl, StepOptions, step
from saga.errors import (
    ConfigurationError,
    DefinitionError,
    InputError,
    LimitReachedError,
    MalformedMessageError,
    MigrationError,
    RunConflictError,
    RunFailedError,
    RunNotFoundError,
    SagaError,
    StepResultError,
    StepTimeoutError,
    StoreError,
    UnknownSagaError,
    WaitTimeoutError,
)
from saga.limits import Concurrency, RateLimit, RateLimited
from saga.loader import load_definition
from saga.records import RunRecord, StepRecord
from saga.retry import RetryPolicy
from saga.settings import Settings
from saga.workflow import (
    AsyncWorkflowContext,
    EventTimeout,
    NonDeterminismError,
    StepFailed,
    Workflow,
    WorkflowContext,
    workflow,
)

__all__ = [
    "AsyncSagaClient",
    "AsyncWorkflowContext",
    "Concurrency",
    "ConfigurationError",
    "DefinitionError",
    "EventTimeout",
    "InputError",
    "LimitReachedError",
    "MalformedMessageError",
    "MigrationError",
    "NonDeterminismError",
    "RateLimit",
    "RateLimited",
    "RetryPolicy",
    "RunConflictError",
    "RunFailedError",
    "RunNotFoundError",
    "RunRecord",
    "Saga",
    "SagaClient",
    "SagaError",
    "Settings",
    "StepArgs",
    "StepContext",
    "StepDecl",
    "StepFailed",
    "StepOptions",
    "StepRecord",
    "StepResultError",
    "StepTimeoutError",
    "StoreError",
    "UnknownSagaError",
    "WaitTimeoutError",
    "Workflow",
    "WorkflowContext",
    "load_definition",
    "step",
    "workflow",
]
