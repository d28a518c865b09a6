"""The agent's log: JSON lines to a rotating file, and to stderr when stderr is a terminal.

Records carry ``service`` (``agentmgr-agent``), ``pid`` and whatever ids are
bound with ``bind_context`` (manager, agent_id, command_id). Fields named like
a secret are always written as ``[redacted]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import logging.handlers
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

SERVICE = "agentmgr-agent"
LOG_FILE = "agent.log"
MAX_LOG_BYTES = 10 * 1024 * 1024
"""Size, in bytes, at which the log file is rotated."""
LOG_BACKUPS = 5
"""Rotated log files kept besides the current one."""

SECRET_FIELDS = frozenset({"token", "key", "agent_key", "enrollment_token", "secret"})
REDACTED = "[redacted]"

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("agent_log_context", default={})


class _ContextFilter(logging.Filter):
    """Copy the bound ids onto each record and blank out secret fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        for name in SECRET_FIELDS:
            if name in record.__dict__:
                setattr(record, name, REDACTED)
        return True


def make_formatter() -> logging.Formatter:
    return JsonFormatter(
        ["levelname", "name", "process", "message"],
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        static_fields={"service": SERVICE},
        timestamp=True,
    )


def configure_logging(log_dir: Path | None, level: str, *, stderr: bool | None = None) -> Path | None:
    """Send the agent's records to ``log_dir/agent.log`` and, when stderr is a TTY, to stderr.

    Returns the log file's path, or None when ``log_dir`` is None or cannot be
    created (then the records go to stderr, so they are not lost).
    """
    handlers: list[logging.Handler] = []
    log_path: Path | None = None
    to_stderr = sys.stderr.isatty() if stderr is None else stderr
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            log_path = log_dir / LOG_FILE
            handlers.append(
                logging.handlers.RotatingFileHandler(log_path, maxBytes=MAX_LOG_BYTES, backupCount=LOG_BACKUPS)
            )
        except OSError as error:
            print(f"agentmgr-agent: failed to write the log in {log_dir} ({error}); logging to stderr", file=sys.stderr)
            log_path = None
            to_stderr = True
    if to_stderr or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    formatter = make_formatter()
    context_filter = _ContextFilter()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(context_filter)
        root.addHandler(handler)
    root.setLevel(level)
    # gRPC's debug lines describe its event loop, not the agent; keep them out below INFO.
    logging.getLogger("grpc").setLevel(max(logging.getLevelName(level), logging.INFO))
    logging.captureWarnings(True)
    return log_path


@contextlib.contextmanager
def bind_context(**ids: Any) -> Iterator[None]:
    """Attach ``ids`` (manager, agent_id, command_id, ...) to every record logged inside."""
    token = _context.set({**_context.get(), **ids})
    try:
        yield
    finally:
        _context.reset(token)


def flush_logs() -> None:
    """Flush every handler, so a line logged just before exit is written."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
