"""Typed errors of the agent and the exit statuses they map to.

Code inside the agent raises these; only ``cli.main`` turns them into an exit
status, so the statuses below are the agent's interface to systemd and scripts.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit statuses of ``agentmgr-agent``."""

    OK = 0
    FAILURE = 1
    """An unexpected error; the log contains the traceback."""
    USAGE = 2
    """A command-line argument or an ``AGENTMGR_AGENT_`` setting is invalid."""
    NOT_INSTALLED = 3
    """The config folder contains no complete install: run ``install`` first."""
    ALREADY_INSTALLED = 4
    """``install`` found an existing install and ``--replace`` was not given."""
    CA_MISMATCH = 5
    """The manager's CA does not match ``--ca-fingerprint`` or ``--ca-file``."""
    UNREACHABLE = 6
    """The manager cannot be reached (address, network, or TLS handshake)."""
    REJECTED = 7
    """The manager rejected the registration (token, host facts, or an existing agent)."""
    REVOKED = 8
    """The manager rejected the agent's credentials: the agent was deleted or replaced."""
    LOCKED = 9
    """Another ``agentmgr-agent run`` already uses the same state folder."""
    UPDATE_INSTALLED = 10
    """The agent installed and selected a new version; the launcher starts it on trial. The
    launcher handles this status itself, so it reaches systemd only from an agent started without it."""
    INTERRUPTED = 130
    """Stopped by SIGINT, as shells report it (128 + 2)."""


class AgentError(Exception):
    """Base class of the errors the agent raises on purpose; the message says what to do."""

    exit_code = ExitCode.FAILURE


class UsageError(AgentError):
    exit_code = ExitCode.USAGE


class NotInstalledError(AgentError):
    exit_code = ExitCode.NOT_INSTALLED


class AlreadyInstalledError(AgentError):
    exit_code = ExitCode.ALREADY_INSTALLED


class CAMismatchError(AgentError):
    exit_code = ExitCode.CA_MISMATCH


class UnreachableError(AgentError):
    exit_code = ExitCode.UNREACHABLE


class RejectedError(AgentError):
    exit_code = ExitCode.REJECTED


class RevokedError(AgentError):
    exit_code = ExitCode.REVOKED


class LockedError(AgentError):
    exit_code = ExitCode.LOCKED
