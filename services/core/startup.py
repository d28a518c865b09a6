"""Checks that every long-running service makes before it serves."""

from __future__ import annotations

import logging

from services.core.db import wait_for_database
from services.core.schema import check_schema
from services.core.settings import Settings

logger = logging.getLogger(__name__)


def verify_schema(settings: Settings, service: str) -> str:
    """Connect to the database and return the schema version if it is current.

    Raises:
        DatabaseError: the database cannot be reached in time.
        SchemaError: bundled migrations are not applied.
    """
    connection = wait_for_database(
        settings.database_url,
        timeout_seconds=settings.db_wait_seconds,
        application_name=f"agentmgr-{service}",
    )
    try:
        version = check_schema(connection)
    finally:
        connection.close()
    logger.info("verified: schema at %s", version, extra={"schema_version": version})
    return version
