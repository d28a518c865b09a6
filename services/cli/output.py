"""Render CLI results as a table for people or as JSON for scripts, with the same fields."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, TextIO

TABLE = "table"
JSON = "json"
FORMATS = (TABLE, JSON)


def plain(value: Any) -> Any:
    """Return ``value`` as JSON-ready data: UTC ISO 8601 times, text ids, enum values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.timezone.utc).isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _cell(value: Any) -> str:
    value = plain(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "-"
    return str(value)


def print_records(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    output: str,
    *,
    stream: TextIO | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Print ``records`` as a table of ``columns``, or as JSON with every field.

    In JSON the result is an object: ``{"items": [...]}`` plus ``extra`` (such
    as ``next_page_token``), so scripts can page through a listing.
    """
    stream = stream or sys.stdout
    if output == JSON:
        json.dump({"items": [plain(record) for record in records], **plain(dict(extra or {}))}, stream, indent=2)
        stream.write("\n")
        return
    rows = [[_cell(record.get(column)) for column in columns] for record in records]
    widths = [max([len(column), *(len(row[index]) for row in rows)]) for index, column in enumerate(columns)]
    stream.write("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths)).rstrip() + "\n")
    for row in rows:
        stream.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
    for key, value in (extra or {}).items():
        if value is not None and value != "":
            stream.write(f"{key}: {_cell(value)}\n")


def print_record(record: Mapping[str, Any], output: str, *, stream: TextIO | None = None) -> None:
    """Print one result as ``key: value`` lines, or as one JSON object."""
    stream = stream or sys.stdout
    if output == JSON:
        json.dump(plain(dict(record)), stream, indent=2)
        stream.write("\n")
        return
    width = max((len(key) for key in record), default=0)
    for key, value in record.items():
        stream.write(f"{key.ljust(width)}  {_cell(value)}\n")
