"""`saga worker` whose consumer fails as it starts, as on an unrecoverable error: for the test
that such a worker exits non-zero (``python -m tests.failing_worker``)."""

from __future__ import annotations

import sys
from typing import Any

from saga import cli
from saga.workers import app as worker_app
from saga.workers.intake import GuardedConsumer


class FailingConsumer(GuardedConsumer):
    def start(self) -> None:
        raise RuntimeError("an unrecoverable error, on purpose")


def create_app(*args: Any, **kwargs: Any) -> Any:
    app = real_create_app(*args, **kwargs)
    app.conf.worker_consumer = f"{__name__}:FailingConsumer"
    return app


real_create_app = worker_app.create_app

if __name__ == "__main__":
    worker_app.create_app = create_app  # cmd_worker imports it when it runs
    sys.exit(cli.main(["--log-level", "INFO", "worker", "--pool", "solo"]))
