"""The dashboard's actions, each through ``SagaClient``: the same checks and journal writes as
the CLI's ``saga retry / cancel / fork / send-event``."""

from __future__ import annotations

from typing import Any

from saga import strict_json
from saga.client import SagaClient
from saga.errors import InputError

ACTIONS = ("retry", "cancel", "fork", "event")


class Actions:
    def __init__(self, client: SagaClient) -> None:
        self.client = client

    def perform(
        self, action: str, run_id: str, form: dict[str, Any], *, actor: str
    ) -> dict[str, Any]:
        """Do ``action`` on the run as ``actor`` (kept in the run's history); what happened,
        as JSON. Errors are ``SagaError``s."""
        if action == "retry":
            self.client.retry(run_id, actor=actor)
            return {"run_id": run_id, "action": "retry", "message": "the run resumes"}
        if action == "cancel":
            reason = str(form.get("reason") or "cancelled from the dashboard")
            self.client.cancel(run_id, reason, actor=actor)
            return {
                "run_id": run_id,
                "action": "cancel",
                "message": "the run is stopping; its completed steps are compensated",
            }
        if action == "fork":
            step_key = form.get("step_key")
            if not step_key or not isinstance(step_key, str):
                raise InputError("fork needs step_key: the step to run again (and all after it)")
            new_run_id = form.get("new_run_id") or None
            new = self.client.fork(run_id, step_key, new_run_id=new_run_id, actor=actor)
            return {
                "run_id": run_id,
                "action": "fork",
                "new_run_id": new,
                "message": f"forked as {new}",
            }
        if action == "event":
            name = form.get("name")
            if not name or not isinstance(name, str):
                raise InputError("an event needs a name (the one the workflow waits for)")
            payload = form.get("payload")
            text = form.get("payload_json")  # the HTML form's field: JSON as text
            if isinstance(text, str):
                try:
                    payload = strict_json.loads(text.strip() or "null")
                except strict_json.NotJSONError as exc:
                    raise InputError(f"the event payload is not strict JSON: {exc}") from None
            delivered = self.client.send_event(run_id, name, payload, actor=actor)
            return {
                "run_id": run_id,
                "action": "event",
                "delivered": delivered,
                "message": "delivered" if delivered else "kept until the run waits for it",
            }
        raise InputError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
