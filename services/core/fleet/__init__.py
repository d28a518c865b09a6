"""Domain operations on the fleet; the gateway, the CLI and the jobs call these, never SQL.

Every function takes an open psycopg2 connection as its first argument and
runs inside the caller's transaction: it never commits, so a caller that
raises after a call leaves nothing behind (see ``Database.transaction``).
Bad requests raise the ``RequestError`` subclasses of ``services.core.errors``.
"""

from services.core.fleet.models import (
    FINAL_STATES,
    PENDING_STATES,
    Agent,
    AgentStatus,
    ApiRole,
    ApiToken,
    AuditEntry,
    Command,
    CommandState,
    EnrollmentToken,
    TokenState,
)

__all__ = [
    "FINAL_STATES",
    "PENDING_STATES",
    "Agent",
    "AgentStatus",
    "ApiRole",
    "ApiToken",
    "AuditEntry",
    "Command",
    "CommandState",
    "EnrollmentToken",
    "TokenState",
]
