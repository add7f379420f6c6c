"""The broker connection's options: delivery guarantees, TLS, Sentinel, RabbitMQ queue type.

Built from the settings, and merged into an app that may already have its own: what the user set
stays, except what the engine's guarantees need (publisher confirms on RabbitMQ).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from saga.errors import ConfigurationError
from saga.settings import Settings

log = logging.getLogger("saga.worker")

REDIS_SCHEMES = ("redis", "rediss", "sentinel")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def scheme_of(broker_url: str) -> str:
    # A failover list ("amqp://a//;amqp://b//") shares one scheme; "redis+socket" is Redis.
    return broker_url.split(":", 1)[0].split("+", 1)[0].lower()


def broker_options(broker_url: str, settings: Settings) -> dict[str, Any]:
    """kombu transport options the engine needs for this broker."""
    scheme = scheme_of(broker_url)
    if scheme in REDIS_SCHEMES:
        # Must outlast the longest step, or Redis hands a running task to another worker.
        options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_seconds}
        if scheme == "sentinel" and settings.broker_sentinel_master:
            options["master_name"] = settings.broker_sentinel_master
        return options
    if scheme in AMQP_SCHEMES:
        return {"confirm_publish": True}  # the relay marks a row published only once confirmed
    return {}


def tls_options(broker_url: str, settings: Settings) -> dict[str, Any] | None:
    """``broker_use_ssl`` for a TLS broker URL: the certificate is always verified (against
    SAGA_BROKER_CA_FILE, else the system's CAs), and so is the host name."""
    scheme = scheme_of(broker_url)
    ca = str(settings.broker_ca_file) if settings.broker_ca_file else None
    cert = str(settings.broker_cert_file) if settings.broker_cert_file else None
    key = str(settings.broker_key_file) if settings.broker_key_file else None
    if scheme == "rediss":  # redis-py's SSLConnection keywords
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
        for name, value in (("ssl_ca_certs", ca), ("ssl_certfile", cert), ("ssl_keyfile", key)):
            if value:
                options[name] = value
        return options
    if scheme == "amqps":  # py-amqp's SSLTransport keywords (its default CAs when none given)
        options = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": urlsplit(broker_url).hostname}
        for name, value in (("ca_certs", ca), ("certfile", cert), ("keyfile", key)):
            if value:
                options[name] = value
        return options
    return None


def _celery_has_quorum_queues() -> bool:
    from celery.app.defaults import NAMESPACES

    return "default_queue_type" in NAMESPACES["task"]


def _verifies(options: Any) -> bool:
    if not isinstance(options, dict):
        return bool(options)  # True: kombu's defaults; an SSLContext: the user's own
    reqs = options.get("ssl_cert_reqs", options.get("cert_reqs", ssl.CERT_REQUIRED))
    return reqs not in (ssl.CERT_NONE, "none", "CERT_NONE")


def apply_broker_options(app: Celery, settings: Settings) -> None:
    """Merge the engine's broker options into ``app``: the user's own values stay."""
    url = str(app.conf.broker_url or "")
    scheme = scheme_of(url)
    options = dict(app.conf.broker_transport_options or {})
    for name, value in broker_options(url, settings).items():
        options.setdefault(name, value)
    if scheme in AMQP_SCHEMES:
        options["confirm_publish"] = True  # not optional: the outbox relies on it
    if scheme == "sentinel" and not options.get("master_name"):
        raise ConfigurationError(
            "a sentinel:// broker needs the master's name: set SAGA_BROKER_SENTINEL_MASTER (or "
            "broker_transport_options['master_name'] on your Celery app)"
        )
    app.conf.broker_transport_options = options
    if not app.conf.broker_use_ssl:  # Celery's default is False: kombu would not verify
        tls = tls_options(url, settings)
        if tls is not None:
            app.conf.broker_use_ssl = tls
    elif not _verifies(app.conf.broker_use_ssl):
        log.warning(
            "broker_use_ssl turns certificate verification off: anyone on the path can read and "
            "forge task messages; set a CA (SAGA_BROKER_CA_FILE) instead"
        )
    if settings.queue_type == "quorum" and scheme in AMQP_SCHEMES:
        if not _celery_has_quorum_queues():
            raise ConfigurationError(
                "SAGA_QUEUE_TYPE=quorum needs Celery 5.5 or later (task_default_queue_type); "
                "upgrade celery"
            )
        # Celery >= 5.5: queues it declares (missing or default ones) are quorum queues, and
        # the worker then uses per-consumer QoS (quorum queues have no global QoS).
        if app.conf.get("task_create_missing_queue_type") in (None, "classic"):
            app.conf.task_create_missing_queue_type = "quorum"
        if app.conf.get("task_default_queue_type") in (None, "classic"):
            app.conf.task_default_queue_type = "quorum"
        app.conf.worker_detect_quorum_queues = True
