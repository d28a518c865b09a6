"""Pieces every `agentmgr` subcommand uses: the context, argument types, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2.extensions

from services.core.database import Database
from services.core.errors import ExitCode
from services.core.fleet.listing import PageRequest
from services.core.settings import Settings

EXIT_CODES_BY_GRPC_CODE = {
    "INVALID_ARGUMENT": int(ExitCode.CONFIG),
    "NOT_FOUND": 10,
    "ALREADY_EXISTS": 11,
    "FAILED_PRECONDITION": 11,
    "UNAUTHENTICATED": 12,
    "PERMISSION_DENIED": 13,
    "RESOURCE_EXHAUSTED": 11,
    "UNAVAILABLE": int(ExitCode.DATABASE),
}

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Context:
    """Settings, output format, caller name and database access of one subcommand run."""

    def __init__(self, settings: Settings, output: str, panel: Any = None) -> None:
        self.settings = settings
        self.output = output
        self.actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"
        self.panel = panel
        """A ``remote.PanelClient`` with ``--server``; then subcommands go through the panel API."""
        self._database: Database | None = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.connection]:
        if self._database is None:
            self._database = Database(self.settings.database_url, max_connections=1, application_name="agentmgr-cli")
        with self._database.transaction() as connection:
            yield connection

    def close(self) -> None:
        if self._database is not None:
            self._database.close()
        if self.panel is not None:
            self.panel.close()


# Argument types.


def duration_seconds(text: str) -> int:
    """Parse ``90``, ``90s``, ``30m``, ``12h`` or ``7d`` into seconds."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected a positive number with s, m, h or d")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def label(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: expected key=value")
    return key, value


def identifier(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid id {text!r}: expected a UUID") from None


def page_request(arguments: argparse.Namespace) -> PageRequest:
    return PageRequest(page_size=arguments.limit, page_token=arguments.page_token)


def vars_of(item: Any) -> dict[str, Any]:
    """Return a domain object's fields, plus its derived ``state`` where it has one."""
    record = {field.name: getattr(item, field.name) for field in dataclasses.fields(item)}
    if hasattr(type(item), "state") and "state" not in record:
        record["state"] = item.state
    return record


def add_listing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=50, help="rows per page, 1 to 500 (default 50)")
    parser.add_argument("--page-token", default="", help="next_page_token of the previous page")
