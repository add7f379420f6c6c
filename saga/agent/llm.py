"""Model completions as journaled steps, through the ``openai`` client.

``complete`` is a step function: its input (the prompt: messages and tools offered) and its
result (text, parsed answer, tool calls, token usage, model) are journaled, so a replay returns
the saved completion and the model is never asked twice for a completed step. The step's
idempotency key goes to the provider as the ``Idempotency-Key`` header.

The client's own retries are off (``max_retries=0``): retries belong to the engine, where every
attempt is journaled and counted. A provider's Retry-After becomes the error's
``retry_after_seconds``, which the engine's retry policy honours.

Output the agent cannot use is a failed attempt with a clear error, and is retried:
``MalformedCompletion`` for prose where a JSON object was asked for, a call to a tool that was not
offered, or tool arguments that are not a JSON object with the required fields.

Configuration (environment of the workers): ``SAGA_MODEL_BASE_URL`` (unset: the provider's
default), ``SAGA_MODEL_API_KEY`` (else ``OPENAI_API_KEY``), ``SAGA_MODEL_NAME``,
``SAGA_MODEL_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from saga.definition import StepContext
from saga.errors import ConfigurationError
from saga.failures import exception_text
from saga.retry import RetryPolicy

if TYPE_CHECKING:
    import openai


def _openai() -> ModuleType:
    """The ``openai`` client, an optional dependency: imported at the first model call, so the
    models and ``run_usage`` here work without it (``saga show`` uses them)."""
    try:
        import openai
    except ModuleNotFoundError as exc:
        if exc.name != "openai":
            raise
        raise ConfigurationError(
            "model completions need the openai client, which comes with the agent extra: "
            "pip install 'durable-saga[agent]'"
        ) from None
    return openai


class ModelSettings(BaseSettings):
    """Where completions come from. Read from ``SAGA_MODEL_*`` in the worker's environment."""

    model_config = SettingsConfigDict(env_prefix="SAGA_MODEL_", frozen=True, extra="ignore")

    base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8011/v1."
    )
    api_key: SecretStr | None = Field(default=None, description="Else OPENAI_API_KEY.")
    name: str = Field(default="gpt-4o-mini", description="Model name sent with each request.")
    timeout_seconds: PositiveFloat = Field(default=30.0, description="Per request.")

    def key(self) -> str:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        from_env = os.environ.get("OPENAI_API_KEY")
        if from_env:
            return from_env
        if self.base_url:
            return "unused"  # a local server needs none; the client insists on one
        raise ModelRequestRejected(
            "no model configured: set SAGA_MODEL_BASE_URL (a local OpenAI-compatible server) "
            "or SAGA_MODEL_API_KEY / OPENAI_API_KEY (a real provider)"
        )


# -- errors -----------------------------------------------------------------------------------


class ModelError(Exception):
    """A model call did not give a usable completion."""


class ModelUnavailable(ModelError):
    """The provider failed or did not answer in time (5xx, connection, timeout): retried."""


class ModelRateLimited(ModelUnavailable):
    """429: retried no sooner than the provider asked."""

    def __init__(self, message: str, retry_after_seconds: float | None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ModelRequestRejected(ModelError):
    """The provider refused the request itself (4xx): the same request fails again."""


class MalformedCompletion(ModelError):
    """The completion is not what was asked for (not JSON, unknown tool, bad arguments):
    a failed attempt, retried; the next sample may be fine."""


MODEL_RETRY = RetryPolicy(
    max_attempts=8,
    initial_backoff_seconds=0.5,
    max_backoff_seconds=30.0,
    non_retryable=(ModelRequestRejected,),
)


# -- what is journaled ------------------------------------------------------------------------


class ToolSpec(BaseModel):
    """A tool offered to the model: a name, what it does, and its JSON-schema parameters."""

    model_config = ConfigDict(frozen=True)
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})

    def openai(self) -> dict[str, Any]:
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }
        return {"type": "function", "function": function}


class ChatRequest(BaseModel):
    """The prompt, journaled as the step's input."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[ToolSpec] = Field(default_factory=list)
    json_answer: bool = True  # an answer without a tool call must be a JSON object
    model: str | None = None  # else SAGA_MODEL_NAME
    temperature: float | None = None
    max_tokens: int | None = None


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: dict[str, Any]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )


class Completion(BaseModel):
    """A completion as journaled: what the model said, what it costs, and which model said it."""

    object: Literal["saga.completion"] = "saga.completion"  # lets run_usage find completions
    model: str
    text: str | None = None
    answer: dict[str, Any] | None = None  # the parsed JSON answer, when no tool was called
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str | None = None

    def assistant_message(self) -> dict[str, Any]:
        """The completion as the next request's assistant message."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                }
                for c in self.tool_calls
            ]
        return message


def tool_message(call: ToolCall, result: Any) -> dict[str, Any]:
    """A tool's result as the next request's tool message."""
    return {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result, sort_keys=True)}


# -- the call ---------------------------------------------------------------------------------

_clients: dict[tuple[int, str | None, str, float], openai.OpenAI] = {}
_clients_lock = threading.Lock()
# Async clients by event loop: an AsyncOpenAI client's connections belong to the loop that made
# them (a worker keeps one loop per pool thread, so one client each).
_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str | None, str, float], openai.AsyncOpenAI]
] = weakref.WeakKeyDictionary()


def _client_options(settings: ModelSettings) -> dict[str, Any]:
    return {
        "base_url": settings.base_url,
        "api_key": settings.key(),
        "timeout": settings.timeout_seconds,
        "max_retries": 0,  # the engine retries, journaling each attempt
    }


def _client(settings: ModelSettings) -> openai.OpenAI:
    # One client (one connection pool) per process and configuration, made after fork.
    ident = (os.getpid(), settings.base_url, settings.key(), settings.timeout_seconds)
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            client = _clients[ident] = _openai().OpenAI(**_client_options(settings))
        return client


def _async_client(settings: ModelSettings) -> openai.AsyncOpenAI:
    clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
    ident = (settings.base_url, settings.key(), settings.timeout_seconds)
    client = clients.get(ident)
    if client is None:
        client = clients[ident] = _openai().AsyncOpenAI(**_client_options(settings))
    return client


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: fall back to the policy's backoff
    return None


def _call(
    request: ChatRequest, idempotency_key: str | None, settings: ModelSettings
) -> tuple[str, dict[str, Any]]:
    """The model's name and the arguments of ``chat.completions.create``."""
    model = request.model or settings.name
    kwargs: dict[str, Any] = {"model": model, "messages": request.messages}
    if request.tools:
        kwargs["tools"] = [t.openai() for t in request.tools]
    if request.json_answer:
        kwargs["response_format"] = {"type": "json_object"}
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.max_tokens is not None:
        kwargs["max_tokens"] = request.max_tokens
    if idempotency_key:
        kwargs["extra_headers"] = {"Idempotency-Key": idempotency_key}
    return model, kwargs


@contextlib.contextmanager
def _model_errors(model: str, settings: ModelSettings) -> Iterator[None]:
    """The client's errors as the engine's: what to retry, when, and what not to."""
    openai = _openai()
    try:
        yield
    except openai.RateLimitError as exc:
        wait = _retry_after(exc.response)
        raise ModelRateLimited(
            f"model {model!r} rate-limited the call (429); retry after {wait} s", wait
        ) from None
    except openai.APITimeoutError:
        raise ModelUnavailable(
            f"model {model!r} did not answer within {settings.timeout_seconds} s"
        ) from None
    except openai.APIConnectionError as exc:
        raise ModelUnavailable(f"cannot reach model {model!r}: {exc}") from None
    except openai.APIStatusError as exc:
        if exc.status_code >= 500 or exc.status_code in (408, 409):
            raise ModelUnavailable(
                f"model {model!r} failed with HTTP {exc.status_code}: {exc.message}"
            ) from None
        raise ModelRequestRejected(
            f"model {model!r} refused the request with HTTP {exc.status_code}: {exc.message}"
        ) from None
    except (openai.APIResponseValidationError, ValueError) as exc:
        raise MalformedCompletion(f"model {model!r} sent an unreadable response: {exc}") from None


def chat(
    request: ChatRequest,
    *,
    idempotency_key: str | None = None,
    settings: ModelSettings | None = None,
) -> Completion:
    """One model call, without the engine (the benchmark's baselines use it as is)."""
    settings = settings or ModelSettings()
    model, kwargs = _call(request, idempotency_key, settings)
    with _model_errors(model, settings):
        response = _client(settings).chat.completions.create(**kwargs)
    return parse_completion(response, request)


async def achat(
    request: ChatRequest,
    *,
    idempotency_key: str | None = None,
    settings: ModelSettings | None = None,
) -> Completion:
    """``chat`` on ``openai.AsyncOpenAI``: the same call, errors and checks, to await."""
    settings = settings or ModelSettings()
    model, kwargs = _call(request, idempotency_key, settings)
    with _model_errors(model, settings):
        response = await _async_client(settings).chat.completions.create(**kwargs)
    return parse_completion(response, request)


def _parse_arguments(name: str, raw: str | None, spec: ToolSpec) -> dict[str, Any]:
    try:
        arguments = json.loads(raw or "{}")
    except json.JSONDecodeError:
        raise MalformedCompletion(
            f"the model called tool {name!r} with arguments that are not JSON: {raw!r:.200}"
        ) from None
    if not isinstance(arguments, dict):
        raise MalformedCompletion(
            f"the model called tool {name!r} with {type(arguments).__name__} arguments; "
            f"a JSON object is required"
        )
    required = spec.parameters.get("required") or []
    missing = [r for r in required if r not in arguments]
    if missing:
        raise MalformedCompletion(f"the model called tool {name!r} without {missing}")
    properties = spec.parameters.get("properties")
    if spec.parameters.get("additionalProperties") is False and isinstance(properties, dict):
        extra = sorted(set(arguments) - set(properties))
        if extra:
            raise MalformedCompletion(f"the model called tool {name!r} with unknown {extra}")
    return arguments


def parse_completion(response: Any, request: ChatRequest) -> Completion:
    """Check a provider response against the request; MalformedCompletion if unusable."""
    model = str(getattr(response, "model", None) or request.model or "unknown")
    choices = getattr(response, "choices", None) or []
    if not choices:
        raise MalformedCompletion(f"model {model!r} returned no choices")
    message = choices[0].message
    text = message.content
    offered = {t.name: t for t in request.tools}
    calls = []
    for raw in message.tool_calls or []:
        function = getattr(raw, "function", None)
        name = getattr(function, "name", None)
        if function is None or not isinstance(name, str):
            raise MalformedCompletion(f"model {model!r} sent a tool call without a function")
        if name not in offered:
            raise MalformedCompletion(
                f"model {model!r} called unknown tool {name!r}; the tools offered were "
                f"{sorted(offered)}"
            )
        calls.append(
            ToolCall(
                id=raw.id,
                name=name,
                arguments=_parse_arguments(name, function.arguments, offered[name]),
            )
        )
    answer = None
    if not calls and request.json_answer:
        try:
            answer = json.loads(text or "")
        except json.JSONDecodeError:
            raise MalformedCompletion(
                f"model {model!r} answered with text that is not JSON where a JSON object was "
                f"asked for: {text!r:.200}"
            ) from None
        if not isinstance(answer, dict):
            raise MalformedCompletion(
                f"model {model!r} answered with a JSON {type(answer).__name__} where a JSON "
                f"object was asked for"
            )
    usage = getattr(response, "usage", None)
    try:
        return Completion(
            model=model,
            text=text,
            answer=answer,
            tool_calls=calls,
            usage=Usage(
                prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                total_tokens=getattr(usage, "total_tokens", 0) or 0,
            ),
            finish_reason=choices[0].finish_reason,
        )
    except ValidationError as exc:
        raise MalformedCompletion(
            f"model {model!r} sent an unusable completion: {exception_text(exc)}"
        ) from None


def complete(ctx: StepContext, request: ChatRequest) -> Completion:
    """The journaled model call: ``ctx.step(complete, ChatRequest(...), retry=MODEL_RETRY)``.
    The provider's token count goes to the step's token rate limits (``RateLimit(...,
    tokens=True)``), replacing their estimate."""
    completion = chat(request, idempotency_key=ctx.idempotency_key)
    ctx.used_tokens(completion.usage.total_tokens)
    return completion


async def acomplete(ctx: StepContext, request: ChatRequest) -> Completion:
    """``complete`` as an async step (on the worker thread's event loop)."""
    completion = await achat(request, idempotency_key=ctx.idempotency_key)
    ctx.used_tokens(completion.usage.total_tokens)
    return completion


# -- usage per run ----------------------------------------------------------------------------


class RunUsage(BaseModel):
    """Token usage of a run's journaled completions, per step and in total."""

    calls: int = 0
    total: Usage = Field(default_factory=Usage)
    by_step: dict[str, Usage] = Field(default_factory=dict)


def run_usage(steps: Iterable[Any]) -> RunUsage:
    """Sum the usage of the completed completions among a run's steps (``client.steps(id)``)."""
    out = RunUsage()
    for s in steps:
        result = getattr(s, "result", None)
        if getattr(s, "state", None) != "completed" or not isinstance(result, Mapping):
            continue
        if result.get("object") != "saga.completion":
            continue
        usage = Usage.model_validate(result.get("usage") or {})
        out.by_step[str(s.step_key)] = usage
        out.total = out.total + usage
        out.calls += 1
    return out
