"""Local stand-ins for the outside world, shipped for tests, the demo and the benchmark.

* ``saga_dev.testing.model_server``: an OpenAI-compatible model server with scripted completions,
  injectable faults and its own count of every request by idempotency key and logical step.
* ``saga_dev.testing.effects_server``: the outside service (look-ups, bookings, emails) that counts
  every request by idempotency key and every effect by what it is.

Both run as real processes (``python -m saga_dev.testing.model_server``); ``ServerProcess`` starts
one on a free port.
"""

from saga_dev.testing._http import ServerProcess

__all__ = ["ServerProcess"]
