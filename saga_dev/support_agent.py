"""A support agent under flow control: the README's "Flow control" example.

Each run answers one tenant's ticket: the model decides, searching the docs as a tool, until it
answers. The model is called through a provider account (``model_account`` in the run's input,
"shared" unless the tenant brings its own key) that allows 500 requests and 200,000 tokens a
minute: every worker shares those budgets, and a 429 with Retry-After pauses both for everyone.
A tenant has at most 5 runs going at a time; its others wait in Postgres as throttled steps,
higher priorities first (``client.start(support_agent, ticket, priority=10)``).

    saga start saga_dev.support_agent:support_agent \\
        --input '{"tenant": "acme", "question": "How do I rotate my API key?"}'
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from saga import Concurrency, RateLimit, StepContext, WorkflowContext, workflow
from saga.agent import MODEL_RETRY, ChatRequest, ToolSpec, complete, tool_message


class Ticket(BaseModel):
    tenant: str
    question: str
    model_account: str = "shared"  # whose provider key the run's model calls use


# Keys and units are worked out when a step is scheduled, from JSON: the run's input as a dict
# (not the Ticket), and the step's input (here the ChatRequest, as a dict).


def tenant(run: Any) -> str:
    return str(run["tenant"])


def model_account(run: Any) -> str:
    return str(run.get("model_account") or "shared")


def estimated_tokens(request: Any) -> int:
    """What a model call will take of the token budget, before it is made: about four
    characters a token for the prompt, plus the cap on the answer."""
    prompt = sum(len(str(m.get("content") or "")) for m in request["messages"])
    return prompt // 4 + int(request.get("max_tokens") or 1024)


MODEL_REQUESTS = RateLimit("model_requests", 500, per=60, key=model_account)
MODEL_TOKENS = RateLimit(
    "model_tokens", 200_000, per=60, key=model_account, units=estimated_tokens, tokens=True
)

SEARCH = ToolSpec(
    name="search_docs",
    description="Search the product documentation; returns the matching passages.",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    },
)
DOCS = {
    "api key": "Settings > API keys > Rotate: the old key works for 24 hours more.",
    "invoice": "Billing > Invoices lists every invoice; each has a PDF download.",
}


def search_docs(ctx: StepContext, args: dict[str, Any]) -> list[str]:
    query = str(args.get("query", "")).lower()
    return [text for topic, text in DOCS.items() if topic in query or query in topic]


class NoAnswer(Exception):
    """The model did not answer within the turns a ticket gets."""


@workflow("support_agent", concurrency=Concurrency(5, key=tenant, name="support_runs"))
def support_agent(ctx: WorkflowContext, ticket: Ticket) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {
            "role": "system",
            "content": 'Answer with a JSON object {"answer": "..."}; search the docs first.',
        },
        {"role": "user", "content": ticket.question},
    ]
    for turn in range(1, 7):
        completion = ctx.step(
            complete,
            ChatRequest(messages=messages, tools=[SEARCH], max_tokens=800),
            retry=MODEL_RETRY,
            rate_limit=[MODEL_REQUESTS, MODEL_TOKENS],
        )
        if not completion.tool_calls:
            return {"tenant": ticket.tenant, "turns": turn, "answer": completion.answer}
        messages = [*messages, completion.assistant_message()]
        for call in completion.tool_calls:
            found = ctx.step(search_docs, call.arguments, name=call.name)
            messages.append(tool_message(call, found))
    raise NoAnswer(f"ticket of {ticket.tenant!r}: no answer within 6 turns")
