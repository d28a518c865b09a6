"""JSON logging: one object per line with service, pid and the ids involved.

Every program calls ``configure_logging`` once, before it creates any library
object that logs (RQ worker, gRPC server). Ids are attached either per call
(``logger.info("...", extra={"agent_id": ...})``) or for a whole handler or job
with ``bind_context``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from pythonjsonlogger.json import JsonFormatter

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("log_context", default={})

# Extra fields whose values are never written, whatever the caller passes.
SECRET_FIELDS = frozenset({"password", "token", "key", "agent_key", "api_token", "secret"})
REDACTED = "[redacted]"


class _ContextFilter(logging.Filter):
    """Copy the bound context onto each record and blank out secret fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        for name in SECRET_FIELDS:
            if name in record.__dict__:
                setattr(record, name, REDACTED)
        return True


def make_formatter(service: str) -> logging.Formatter:
    """Return the JSON formatter used by every handler of ``service``."""
    return JsonFormatter(
        ["levelname", "name", "process", "message"],
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        static_fields={"service": service},
        timestamp=True,
    )


def configure_logging(service: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send all records of this process to ``stream`` (default stderr) as JSON lines.

    Replaces any handler already on the root logger, so libraries that add
    their own handlers only when none exists (RQ) log through this one.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(service))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


class bind_context:  # noqa: N801 - used like the function-style context managers it replaced
    """Attach ``ids`` (agent_id, command_id, job_id, …) to every record logged inside the ``with`` block.

    A class rather than ``contextlib.contextmanager``: a gateway keeps three of
    these open per agent session, and a suspended generator costs more memory.
    """

    __slots__ = ("_ids", "_token")

    def __init__(self, **ids: Any) -> None:
        self._ids = ids
        self._token: contextvars.Token[dict[str, Any]] | None = None

    def __enter__(self) -> None:
        self._token = _context.set({**_context.get(), **self._ids})

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _context.reset(self._token)
            self._token = None


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced, so it can be logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def flush_logs() -> None:
    """Flush every handler, so a line logged just before exit is written."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
