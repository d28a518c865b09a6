"""A thread-safe PostgreSQL connection pool with one transaction per borrowed connection.

The gateway calls the fleet functions from worker threads (``asyncio.to_thread``),
so the pool is psycopg2's ``ThreadedConnectionPool``. Every connection uses the
UTC time zone, so timestamps come back as timezone-aware UTC datetimes, and
``uuid`` columns come back as ``uuid.UUID``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.pool

from services.core.db import CONNECT_TIMEOUT_SECONDS, classify_connect_error
from services.core.errors import DatabaseError
from services.core.logs import redact_url

logger = logging.getLogger(__name__)

# uuid columns and parameters map to uuid.UUID for every connection of this process.
psycopg2.extras.register_uuid()

POOL_WAIT_SECONDS = 30.0
"""Maximum time, in seconds, that a caller waits for a free pooled connection."""

POOL_TIMEOUT = "pool_timeout"
"""``DatabaseError.cause`` when every pooled connection stayed busy for POOL_WAIT_SECONDS."""

# psycopg2 raises these when the server or the network drops a connection.
_CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class Database:
    """A pool of connections to one PostgreSQL database.

    Safe to use from many threads. ``transaction()`` blocks while all
    ``max_connections`` connections are borrowed, for at most POOL_WAIT_SECONDS.
    """

    def __init__(
        self,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        application_name: str = "agentmgr",
    ) -> None:
        """Open ``min_connections`` connections to ``url`` at once.

        Raises:
            DatabaseError: the first connections failed, and ``cause`` names the reason.
        """
        if not 0 <= min_connections <= max_connections or max_connections < 1:
            raise ValueError(
                f"invalid pool size: min_connections={min_connections}, max_connections={max_connections}; "
                "expected 0 <= min_connections <= max_connections and max_connections >= 1"
            )
        self.url = url
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        try:
            self._pool = psycopg2.pool.ThreadedConnectionPool(
                min_connections,
                max_connections,
                url,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name=application_name,
                options="-c TimeZone=UTC",
            )
        except psycopg2.Error as error:
            raise classify_connect_error(error) from error

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.connection]:
        """Borrow a connection inside one transaction: commit on success, roll back on error.

        A connection that the server or the network dropped is closed and
        left out of the pool, so the next call opens a fresh one.

        Raises:
            DatabaseError: no connection could be opened or borrowed, or the
                connection broke during the transaction.
        """
        if not self._slots.acquire(timeout=POOL_WAIT_SECONDS):
            raise DatabaseError(
                POOL_TIMEOUT,
                f"all {self.max_connections} database connections stayed busy for {POOL_WAIT_SECONDS:g} s",
            )
        try:
            connection = self._borrow()
            try:
                yield connection
                connection.commit()
            except BaseException as error:
                self._end_failed(connection, error)
                if isinstance(error, _CONNECTION_ERRORS):
                    raise DatabaseError(DatabaseError.UNREACHABLE, _first_line(error)) from error
                raise
            self._pool.putconn(connection)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close every pooled connection; safe to call twice."""
        if not self._pool.closed:
            self._pool.closeall()

    def _borrow(self) -> psycopg2.extensions.connection:
        try:
            connection = self._pool.getconn()
        except psycopg2.pool.PoolError as error:
            # Raised once the pool is closed; the semaphore prevents exhaustion.
            raise DatabaseError(DatabaseError.UNREACHABLE, str(error)) from error
        except psycopg2.Error as error:
            raise classify_connect_error(error) from error
        if connection.closed:
            self._pool.putconn(connection, close=True)
            try:
                connection = self._pool.getconn()
            except psycopg2.Error as error:
                raise classify_connect_error(error) from error
        return connection

    def _end_failed(self, connection: psycopg2.extensions.connection, error: BaseException) -> None:
        """Roll back after ``error``, and drop the connection if it is no longer usable."""
        broken = bool(connection.closed) or isinstance(error, _CONNECTION_ERRORS)
        if not broken:
            try:
                connection.rollback()
            except _CONNECTION_ERRORS:
                broken = True
        if broken:
            logger.warning(
                "discarded: database connection (%s)",
                _first_line(error),
                extra={"database": redact_url(self.url)},
            )
        self._pool.putconn(connection, close=broken)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
