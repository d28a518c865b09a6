"""Checks of request fields; each raises InvalidArgument naming the field and the rule.

Every check returns the value in its normalised form, so callers store what
was checked.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Mapping

from services.core.errors import InvalidArgument

HOSTNAME_MAX_LENGTH = 253
HOSTNAME_LABEL_MAX_LENGTH = 63
_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")

MACHINE_ID_MIN_LENGTH = 8
MACHINE_ID_MAX_LENGTH = 128
_MACHINE_ID = re.compile(r"[A-Za-z0-9._:-]+")

FACT_MAX_LENGTH = 64
"""Maximum length of the OS name, OS version, architecture and agent version."""

MAX_ADDRESSES = 32

MAX_LABELS = 32
_LABEL_KEY = re.compile(r"[a-z0-9_./-]{1,63}")
LABEL_VALUE_MAX_LENGTH = 255

GROUP_MAX_LENGTH = 63
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
"""A group name: up to 63 letters, digits, '_', '.' and '-', starting with a letter or digit."""

DESCRIPTION_MAX_LENGTH = 1024
NAME_MAX_LENGTH = 128
"""Maximum length of an API token name and of an actor name."""

COMMAND_LINE_MAX_LENGTH = 8192
COMMAND_TIMEOUT_MAX_SECONDS = 86400
COMMAND_EXPIRY_MAX_SECONDS = 30 * 86400
REASON_MAX_LENGTH = 1024

MAX_USES_LIMIT = 1_000_000
"""Largest ``max_uses`` of an enrollment token."""


def _shown(value: str, limit: int = 80) -> str:
    """Return ``value`` quoted for an error message, cut to ``limit`` characters."""
    if len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    return repr(value)


def validate_hostname(hostname: str, field: str = "hostname") -> str:
    """Check ``hostname`` against RFC 1123 and return it lower-cased."""
    if not hostname:
        raise InvalidArgument(field, f"missing {field}: expected a host name such as web-01.example.com")
    if len(hostname) > HOSTNAME_MAX_LENGTH:
        raise InvalidArgument(
            field, f"invalid {field} {_shown(hostname)}: longer than {HOSTNAME_MAX_LENGTH} characters"
        )
    for label in hostname.split("."):
        if len(label) > HOSTNAME_LABEL_MAX_LENGTH:
            raise InvalidArgument(
                field,
                f"invalid {field} {_shown(hostname)}: label {_shown(label, 20)} is longer than "
                f"{HOSTNAME_LABEL_MAX_LENGTH} characters",
            )
        if not _HOSTNAME_LABEL.fullmatch(label):
            raise InvalidArgument(
                field,
                f"invalid {field} {_shown(hostname)}: each dot-separated label must be 1 to 63 letters, "
                "digits or '-', not starting or ending with '-'",
            )
    return hostname.lower()


def validate_machine_id(machine_id: str, field: str = "machine_id") -> str:
    """Check a stable machine id: 8 to 128 letters, digits, '.', '_', ':' or '-'."""
    if not machine_id:
        raise InvalidArgument(field, f"missing {field}: expected the machine's stable id, such as /etc/machine-id")
    if not MACHINE_ID_MIN_LENGTH <= len(machine_id) <= MACHINE_ID_MAX_LENGTH or not _MACHINE_ID.fullmatch(machine_id):
        raise InvalidArgument(
            field,
            f"invalid {field} {_shown(machine_id)}: expected {MACHINE_ID_MIN_LENGTH} to {MACHINE_ID_MAX_LENGTH} "
            "letters, digits, '.', '_', ':' or '-'",
        )
    return machine_id


def validate_text(value: str, field: str, max_length: int, *, required: bool = False) -> str:
    """Check that ``value`` is printable text of at most ``max_length`` characters.

    Printable means no control characters (line breaks and tabs included),
    so the value cannot forge lines in logs or tables.
    """
    if required and not value.strip():
        raise InvalidArgument(field, f"missing {field}: expected 1 to {max_length} printable characters")
    if len(value) > max_length:
        raise InvalidArgument(field, f"invalid {field} {_shown(value)}: longer than {max_length} characters")
    if not value.isprintable():
        raise InvalidArgument(field, f"invalid {field} {_shown(value)}: contains control characters")
    return value


def validate_addresses(addresses: Iterable[str], field: str = "addresses") -> tuple[str, ...]:
    """Check up to 32 IPv4 or IPv6 addresses and return them in canonical form, without repeats."""
    addresses = list(addresses)
    if len(addresses) > MAX_ADDRESSES:
        raise InvalidArgument(field, f"invalid {field}: {len(addresses)} addresses, at most {MAX_ADDRESSES} allowed")
    normalised: list[str] = []
    for index, text in enumerate(addresses):
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            raise InvalidArgument(
                f"{field}[{index}]", f"invalid {field}[{index}] {_shown(text)}: expected an IPv4 or IPv6 address"
            ) from None
        if address not in normalised:
            normalised.append(address)
    return tuple(normalised)


def validate_labels(labels: Mapping[str, str] | None, field: str = "labels") -> dict[str, str]:
    """Check up to 32 labels: keys of 1 to 63 of [a-z0-9_./-], values of up to 255 printable characters."""
    labels = dict(labels or {})
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field, f"invalid {field}: {len(labels)} labels, at most {MAX_LABELS} allowed")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                field,
                f"invalid {field} key {_shown(str(key))}: expected 1 to 63 lower-case letters, digits, "
                "'_', '.', '/' or '-'",
            )
        if not isinstance(value, str):
            raise InvalidArgument(field, f"invalid {field} value for key {key!r}: expected text")
        validate_text(value, f"{field}[{key}]", LABEL_VALUE_MAX_LENGTH)
    return labels


def validate_group(group: str, field: str = "group") -> str:
    """Check a group name; empty means no group."""
    if group and not _GROUP.fullmatch(group):
        raise InvalidArgument(
            field,
            f"invalid {field} {_shown(group)}: expected up to 63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        )
    return group


def validate_future_time(
    value: datetime.datetime | None, field: str, now: datetime.datetime
) -> datetime.datetime | None:
    """Check that ``value`` is a timezone-aware time after ``now``; None passes."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(field, f"invalid {field} {value.isoformat()}: expected a time with a time zone")
    if value <= now:
        raise InvalidArgument(field, f"invalid {field} {value.isoformat()}: the time has already passed")
    return value.astimezone(datetime.timezone.utc)


def validate_range(value: int, field: str, minimum: int, maximum: int, unit: str = "") -> int:
    """Check that the integer ``value`` lies in ``minimum..maximum``."""
    suffix = f" {unit}" if unit else ""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidArgument(field, f"invalid {field} {value!r}: expected {minimum} to {maximum}{suffix}")
    return value


def validate_command_line(command_line: str, field: str = "command_line") -> str:
    """Check a shell command line: 1 to 8192 characters without NUL.

    Line breaks and tabs are allowed, because scripts may need them.
    """
    if not command_line.strip():
        raise InvalidArgument(field, f"missing {field}: expected the command to run")
    if len(command_line) > COMMAND_LINE_MAX_LENGTH:
        raise InvalidArgument(
            field, f"invalid {field}: {len(command_line)} characters, at most {COMMAND_LINE_MAX_LENGTH} allowed"
        )
    if "\x00" in command_line:
        raise InvalidArgument(field, f"invalid {field}: contains a NUL character")
    return command_line
