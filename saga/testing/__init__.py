"""Local stand-ins for the outside world, shipped for tests, the demo and the benchmark.

* ``saga.testing.model_server``: an OpenAI-compatible model server with scripted completions,
  injectable faults and its own count of every request by idempotency key and logical step.
* ``saga.testing.effects_server``: the outside service (look-ups, bookings, emails) that counts
  every request by idempotency key and every effect by what it is.

Both run as real processes (``python -m saga.testing.model_server``); ``ServerProcess`` starts
one on a free port.
"""

from saga.testing._http import ServerProcess

__all__ = ["ServerProcess"]
