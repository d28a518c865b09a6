"""Redis access: one way to connect, and a bounded wait for the server at start."""

from __future__ import annotations

import redis
import redis.exceptions

from services.core.errors import RedisError
from services.core.logs import redact_url
from services.core.retry import retry_until_deadline

SOCKET_TIMEOUT_SECONDS = 10
"""Bound on one Redis command, so a hung server surfaces as an error."""

HEALTH_CHECK_INTERVAL_SECONDS = 30
"""Idle time after which redis-py pings a pooled connection before using it."""


def connect_redis(url: str) -> redis.Redis:
    """Return a client for ``url``; no connection is opened until the first command."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
    )


def ping_redis(client: redis.Redis) -> None:
    """Ping ``client``'s server.

    Raises:
        RedisError: the server is unreachable or rejects the credentials.
    """
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as error:
        raise RedisError("authentication_failed", str(error)) from error
    except redis.exceptions.RedisError as error:
        raise RedisError("unreachable", str(error)) from error


def wait_for_redis(url: str, *, timeout_seconds: float) -> redis.Redis:
    """Return a client for ``url`` once its server answers, retrying until ``timeout_seconds``.

    Raises:
        RedisError: the server did not answer in time, or rejected the credentials.
    """
    client = connect_redis(url)
    retry_until_deadline(
        lambda: ping_redis(client),
        what="redis",
        timeout_seconds=timeout_seconds,
        is_retryable=lambda error: isinstance(error, RedisError) and error.cause == "unreachable",
        log_fields={"redis": redact_url(url)},
    )
    return client
