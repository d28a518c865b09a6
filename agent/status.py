"""The connection state file that ``run`` keeps up to date and ``status`` reads."""

from __future__ import annotations

import datetime
import enum
import json
import logging
import os
from pathlib import Path
from typing import Any

from agent import __version__
from agent.files import remove_file, write_atomically

logger = logging.getLogger("agentmgr.agent.status")

STATUS_FILE = "status.json"


class ConnectionState(str, enum.Enum):
    """Phase of the run loop, which ``status`` shows with the time it began."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    """The last attempt or session failed; the loop waits for the next attempt."""
    REVOKED = "revoked"
    """The manager rejected the credentials; ``run`` exited and does not retry."""
    STOPPED = "stopped"


class StatusFile:
    """``<state dir>/status.json``: written only by ``run``, read by ``status``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATUS_FILE
        self.document: dict[str, Any] = {}

    def update(self, state: ConnectionState, **fields: Any) -> None:
        """Record ``state`` (and the time it was entered, when it changed) with ``fields``.

        A write failure is logged and otherwise ignored: the status file is informative.
        """
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self.document.get("state") != state.value:
            self.document["since"] = now
        self.document.update(fields, state=state.value, updated_at=now, pid=os.getpid(), version=__version__)
        try:
            write_atomically(self.path, json.dumps(self.document, indent=2).encode() + b"\n", mode=0o644)
        except OSError as error:
            logger.warning("failed: writing %s (%s)", self.path, error)

    def read(self) -> dict[str, Any] | None:
        """Return the last recorded state, or None when ``run`` never wrote one."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("skipped: unreadable %s (%s)", self.path, error)
            return None

    def remove(self) -> bool:
        return remove_file(self.path)
