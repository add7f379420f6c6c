"""Point the test suite at Postgres and Redis, starting embedded ones where none answers.

    exports="$(python scripts/services.py ensure --state-dir .saga-test)" && eval "$exports"
    python scripts/services.py stop --state-dir .saga-test

``ensure`` reads SAGA_TEST_DATABASE_URL and SAGA_TEST_REDIS_URL (defaulting to the usual local
servers) and prints ``export`` lines for those two and SAGA_TEST_BROKER_URL. Assign before
``eval``: ``eval "$(...)"`` alone would hide a failure, eval of nothing succeeds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# Run as a plain script from a checkout, the package need not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saga.embedded import server_answers, start_embedded, stop_embedded

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def kombu_url(redis_url: str) -> str:
    """Kombu spells redis-py's ``unix://`` (what a previous ``ensure`` exported) differently."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


def ensure(state_dir: Path) -> dict[str, str]:
    """The URLs to test against: the configured servers, or embedded ones where they are down."""
    database_url = os.environ.get("SAGA_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    redis_url = os.environ.get("SAGA_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    broker_url = kombu_url(redis_url)
    need_database = not server_answers(database_url=database_url)
    need_redis = not server_answers(redis_url=redis_url)
    if need_database or need_redis:
        embedded = start_embedded(state_dir)
        if need_database:
            database_url = embedded.database_url
        if need_redis:
            redis_url, broker_url = embedded.redis_url, embedded.broker_url
    return {
        "SAGA_TEST_DATABASE_URL": database_url,
        "SAGA_TEST_REDIS_URL": redis_url,
        "SAGA_TEST_BROKER_URL": broker_url,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("command", choices=["ensure", "stop"])
    parser.add_argument(
        "--state-dir", type=Path, default=Path(".saga-test"), help="embedded servers' folder"
    )
    args = parser.parse_args(argv)
    if args.command == "stop":
        stop_embedded(args.state_dir)
        return 0
    for name, value in ensure(args.state_dir).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
