"""`agentmgr --server HOST:PORT`: the same subcommands through the panel gRPC API.

The panel API calls the same fleet functions as the local path, so this module
only converts requests and replies. Replies become records with the same field
names and values as the local records, so both paths print the same output.
"""

from __future__ import annotations

import datetime
import os
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from agentmanager.v1 import common_pb2, panel_pb2, panel_pb2_grpc
from services.core.errors import AgentManagerError, ExitCode, InvalidArgument, RequestError

CALL_TIMEOUT_SECONDS = 30.0

# Codes with which the gateway rejected the request itself. Any other code means the call failed.
REQUEST_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
})


class RemoteRequestError(RequestError):
    """The gateway rejected a request; ``grpc_code_name`` is the status it returned."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.grpc_code_name = "INVALID_ARGUMENT" if code is grpc.StatusCode.OUT_OF_RANGE else code.name
        super().__init__(message)


class PanelUnavailable(AgentManagerError):
    """The panel API could not be reached or failed."""

    exit_code = ExitCode.DATABASE


class PanelClient:
    """A TLS channel to one gateway, authenticated with an operator API token."""

    def __init__(self, *, server: str, api_token: str, ca_file: Path) -> None:
        if not api_token:
            raise InvalidArgument("api_token", "missing API token: pass --api-token or set AGENTMGR_API_TOKEN")
        try:
            ca = ca_file.read_bytes()
        except OSError as error:
            raise InvalidArgument(
                "ca_file", f"cannot read CA file {ca_file}: {error.strerror}; pass --ca-file with the gateway's ca.pem"
            ) from None
        self.server = server
        self.channel = grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=ca))
        self.stub = panel_pb2_grpc.PanelServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_token}"),)

    def call(self, method: str, request: Any, *, timeout: float = CALL_TIMEOUT_SECONDS) -> Any:
        """Call ``method`` and return its reply.

        Raises:
            RemoteRequestError: the gateway rejected the request; the CLI maps its code like a local error.
            PanelUnavailable: the gateway could not be reached or failed.
        """
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            if code in REQUEST_CODES:
                raise RemoteRequestError(code, details) from None
            raise PanelUnavailable(f"panel API at {self.server} failed: {code.name}: {details}") from None

    def close(self) -> None:
        self.channel.close()


def client_from(arguments: Any, settings: Any) -> PanelClient:
    """Return a client for ``--server``, with the token and CA from flags or the environment."""
    ca_file = arguments.ca_file or os.environ.get("AGENTMGR_CA_FILE") or settings.tls_dir / "ca.pem"
    return PanelClient(
        server=arguments.server,
        api_token=arguments.api_token or os.environ.get("AGENTMGR_API_TOKEN", ""),
        ca_file=Path(ca_file),
    )


# Conversions to the records that the local path prints.


def time_of(message: timestamp_pb2.Timestamp, present: bool) -> datetime.datetime | None:
    return message.ToDatetime(tzinfo=datetime.timezone.utc) if present else None


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(seconds * 1e9))
    return message


def _times(message: Any, *names: str) -> dict[str, Any]:
    return {name: time_of(getattr(message, name), message.HasField(name)) for name in names}


def _enum_value(enum: Any, number: int, prefix: str) -> str:
    return enum.Name(number).removeprefix(prefix).lower()


def token_record(token: panel_pb2.EnrollmentToken) -> dict[str, Any]:
    return {
        "id": uuid.UUID(token.id),
        "prefix": token.prefix,
        "description": token.description,
        "group": token.group,
        "labels": dict(token.labels),
        "max_uses": token.max_uses if token.HasField("max_uses") else None,
        "use_count": token.use_count,
        **_times(token, "expires_at", "created_at"),
        "created_by": token.created_by,
        **_times(token, "last_used_at", "revoked_at"),
        "state": _enum_value(common_pb2.EnrollmentTokenState, token.state, "ENROLLMENT_TOKEN_STATE_"),
    }


def agent_record(agent: panel_pb2.Agent) -> dict[str, Any]:
    facts = agent.facts
    return {
        "id": uuid.UUID(agent.id),
        "machine_id": facts.machine_id,
        "hostname": facts.hostname,
        "os_name": facts.os_name,
        "os_version": facts.os_version,
        "architecture": facts.architecture,
        "agent_version": facts.agent_version,
        "addresses": list(facts.addresses),
        "labels": dict(facts.labels),
        "group": agent.group,
        **_times(agent, "created_at", "first_connected_at", "last_seen_at", "revoked_at"),
        "revoked_reason": agent.revoked_reason or None,
        "status": _enum_value(common_pb2.AgentStatus, agent.status, "AGENT_STATUS_"),
    }


def command_record(command: panel_pb2.Command) -> dict[str, Any]:
    return {
        "id": uuid.UUID(command.id),
        "agent_id": uuid.UUID(command.agent_id),
        "command_line": command.command_line,
        "reason": command.reason,
        "requested_by": command.requested_by,
        "state": _enum_value(common_pb2.CommandState, command.state, "COMMAND_STATE_"),
        "timeout_seconds": command.timeout.seconds,
        **_times(command, "expires_at", "created_at", "sent_at", "started_at", "finished_at"),
        "exit_code": command.exit_code if command.HasField("exit_code") else None,
        "stdout": command.stdout.decode("utf-8", errors="replace"),
        "stderr": command.stderr.decode("utf-8", errors="replace"),
        "stdout_truncated": command.stdout_truncated,
        "stderr_truncated": command.stderr_truncated,
        "duration_ms": round(command.duration.ToNanoseconds() / 1e6) if command.HasField("duration") else None,
        "error": command.error or None,
    }


def page(arguments: Any) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=arguments.limit, page_token=arguments.page_token)
