"""The command journal: which command ids ran, and which results the manager has not stored yet.

One JSON file per command under ``<state dir>/journal/``, replaced atomically
at each step, so a crash at any point leaves a consistent entry:

- ``started``: written (and fsynced) before the process starts. An entry
  still ``started`` when the agent starts again means the agent died during
  the run. The command is then reported as interrupted and never run again.
- ``finished``: the result is stored here until the manager confirms it with
  ResultStored; it is resent after every reconnect until then.
- ``stored``: the manager has the result; the entry stays only so the id is
  never run again, and is pruned after ``RETENTION_SECONDS``.

Delivery is at least once, so the manager may send an id again; ``contains``
is the check that keeps such a command from running twice.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import os
import time
import uuid
from pathlib import Path

from agentmanager.v1 import agent_pb2

from agent.files import make_private_folder, remove_file, write_atomically

logger = logging.getLogger("agentmgr.agent.journal")

JOURNAL_DIR = "journal"
RETENTION_SECONDS = 40 * 86400
"""Age after which a stored entry is deleted; longer than the manager's largest command expiry (30 days)."""


class EntryState(str, enum.Enum):
    STARTED = "started"
    FINISHED = "finished"
    STORED = "stored"


def command_key(command_id: str) -> str:
    """Return the canonical form of ``command_id``, used as the entry's file name.

    Raises:
        ValueError: ``command_id`` is not a UUID, so it never becomes part of a path.
    """
    return str(uuid.UUID(command_id))


class Journal:
    """The journal folder of one agent; not safe for two processes at once (``run`` holds a lock)."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / JOURNAL_DIR
        make_private_folder(self.folder)

    def _path(self, command_id: str) -> Path:
        return self.folder / f"{command_key(command_id)}.json"

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            # Writes are atomic, so an unreadable entry means damage from outside the agent.
            logger.warning("skipped: unreadable journal entry %s (%s)", path.name, error)
            return None

    def _write(self, command_id: str, state: EntryState, result: agent_pb2.CommandResult | None = None) -> None:
        entry: dict = {"command_id": command_key(command_id), "state": state.value, "updated_at": time.time()}
        if result is not None:
            entry["result"] = base64.b64encode(result.SerializeToString()).decode()
        write_atomically(self._path(command_id), json.dumps(entry).encode())

    def contains(self, command_id: str) -> bool:
        """Return whether the command was started before, in this process or an earlier one."""
        return self._path(command_id).exists()

    def state(self, command_id: str) -> EntryState | None:
        entry = self._read(self._path(command_id))
        return None if entry is None else EntryState(entry["state"])

    def record_started(self, command_id: str) -> None:
        """Remember that the command is about to start (durable before it runs).

        Raises:
            OSError: the entry cannot be written; the command must not run then.
        """
        self._write(command_id, EntryState.STARTED)

    def record_result(self, result: agent_pb2.CommandResult) -> None:
        """Keep ``result`` until the manager confirms it.

        Raises:
            OSError: the entry cannot be written.
        """
        self._write(result.command_id, EntryState.FINISHED, result)

    def mark_stored(self, command_id: str) -> bool:
        """Drop the kept result because the manager stored it; return False for an unknown id."""
        if not self.contains(command_id):
            return False
        self._write(command_id, EntryState.STORED)
        return True

    def result(self, command_id: str) -> agent_pb2.CommandResult | None:
        """Return the kept result of a finished, unconfirmed command, else None."""
        entry = self._read(self._path(command_id))
        if entry is None or entry.get("state") != EntryState.FINISHED.value:
            return None
        return agent_pb2.CommandResult.FromString(base64.b64decode(entry["result"]))

    def unconfirmed_results(self) -> list[agent_pb2.CommandResult]:
        """Return every kept result that the manager has not confirmed, oldest first."""
        results = []
        for path in self._entries():
            entry = self._read(path)
            if entry is not None and entry.get("state") == EntryState.FINISHED.value:
                results.append((entry["updated_at"], agent_pb2.CommandResult.FromString(base64.b64decode(entry["result"]))))
        return [result for _, result in sorted(results, key=lambda item: item[0])]

    def interrupted(self) -> list[str]:
        """Return the ids of commands that started but never finished (the agent died meanwhile)."""
        ids = []
        for path in self._entries():
            entry = self._read(path)
            if entry is not None and entry.get("state") == EntryState.STARTED.value:
                ids.append(entry["command_id"])
        return ids

    def prune(self, *, now: float | None = None) -> int:
        """Delete stored entries older than ``RETENTION_SECONDS``; return how many went."""
        cutoff = (time.time() if now is None else now) - RETENTION_SECONDS
        removed = 0
        for path in self._entries():
            entry = self._read(path)
            if entry is not None and entry.get("state") == EntryState.STORED.value and entry["updated_at"] < cutoff:
                removed += remove_file(path)
        return removed

    def _entries(self) -> list[Path]:
        return [self.folder / name for name in os.listdir(self.folder) if name.endswith(".json")]
