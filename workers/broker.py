"""The broker connection: checked once at start-up, and explained when it cannot work."""

from __future__ import annotations

import logging
import ssl

from celery import Celery

from saga.errors import ConfigurationError

log = logging.getLogger("saga.worker")


def missing_transport(broker_url: str, exc: ImportError) -> str:
    """What to do when kombu's transport for ``broker_url`` cannot be imported: no retry fixes
    a missing module (kombu's Redis transport needs ``redis`` and ``packaging``, its
    ``kombu[redis]`` extra)."""
    scheme = broker_url.split(":", 1)[0] or "?"
    missing = f"the missing module {exc.name!r}" if exc.name else "what it needs"
    return (
        f"the broker transport for {scheme}:// (SAGA_BROKER_URL) cannot be loaded: {exc}. "
        f"Retrying cannot fix this: install {missing} into this Python environment "
        f"(for kombu's {scheme} transport: pip install 'kombu[{scheme}]'; durable-saga's own "
        f"dependencies bring the redis and amqp transports) and start again"
    )


def _untrusted_certificate(exc: BaseException) -> bool:
    """Whether a failed connection was a TLS certificate that did not verify (redis-py and
    kombu wrap the ssl error in their own)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            seen
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def check_broker(app: Celery, connect_timeout: float = 5.0) -> None:
    """Import the broker's kombu transport and connect once, at start-up, so that what no retry
    fixes stops a worker or relay saying what to do: a missing module, an unknown scheme, a
    refused login or a missing vhost. A broker that is down or slow is left to the usual
    retries (it may come up later)."""
    import amqp.exceptions
    import redis.exceptions

    url = str(app.conf.broker_url)
    try:
        with app.connection_for_write(connect_timeout=connect_timeout) as conn:
            conn.transport  # noqa: B018 - resolves and imports the transport class
            try:
                conn.connect()
            except (
                amqp.exceptions.IrrecoverableConnectionError,  # vhost not found, not allowed
                amqp.exceptions.IrrecoverableChannelError,  # login refused
                redis.exceptions.AuthenticationError,
                redis.exceptions.ResponseError,  # e.g. a database index out of range
            ) as exc:
                raise ConfigurationError(
                    f"the broker at {conn.as_uri()} (SAGA_BROKER_URL) refused this client: "
                    f"{str(exc).rstrip('.')}. Retrying cannot fix this: check the user, "
                    f"password and vhost or database in SAGA_BROKER_URL"
                ) from None
            except Exception as exc:  # down or unreachable: the usual retries take over
                if _untrusted_certificate(exc):
                    raise ConfigurationError(
                        f"the broker at {conn.as_uri()} (SAGA_BROKER_URL) presented a TLS "
                        f"certificate this client does not trust ({_one_line(exc)}). Retrying "
                        f"cannot fix this: set SAGA_BROKER_CA_FILE to the CA that signed it"
                    ) from None
                log.warning("the broker does not answer yet (%s); retrying as usual", exc)
    except ImportError as exc:
        raise ConfigurationError(missing_transport(url, exc)) from exc
    except KeyError as exc:  # kombu: "No such transport: ..."
        raise ConfigurationError(
            f"SAGA_BROKER_URL names no broker transport kombu knows ({exc.args[0]}): "
            f"use redis://HOST:PORT/DB or amqp://USER:PASSWORD@HOST:PORT/VHOST"
        ) from None
