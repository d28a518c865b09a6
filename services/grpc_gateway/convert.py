"""Conversions between the fleet records and the protocol messages."""

from __future__ import annotations

import datetime

from google.protobuf import duration_pb2, timestamp_pb2

from agentmanager.v1 import agent_pb2, common_pb2, panel_pb2
from services.core.fleet.agents import HostFacts
from services.core.fleet.rollouts import AgentUpdateState, UpdateNotice
from services.core.fleet.models import Agent, AgentStatus, Command, CommandState, EnrollmentToken, TokenState

AGENT_STATUS_TO_PROTO = {
    AgentStatus.ONLINE: common_pb2.AGENT_STATUS_ONLINE,
    AgentStatus.OFFLINE: common_pb2.AGENT_STATUS_OFFLINE,
    AgentStatus.NEVER_CONNECTED: common_pb2.AGENT_STATUS_NEVER_CONNECTED,
    AgentStatus.REVOKED: common_pb2.AGENT_STATUS_REVOKED,
}
AGENT_STATUS_FROM_PROTO = {value: key for key, value in AGENT_STATUS_TO_PROTO.items()}

COMMAND_STATE_TO_PROTO = {state: common_pb2.CommandState.Value(f"COMMAND_STATE_{state.name}") for state in CommandState}
COMMAND_STATE_FROM_PROTO = {value: key for key, value in COMMAND_STATE_TO_PROTO.items()}

TOKEN_STATE_TO_PROTO = {
    state: common_pb2.EnrollmentTokenState.Value(f"ENROLLMENT_TOKEN_STATE_{state.name}") for state in TokenState
}


def timestamp(value: datetime.datetime | None) -> timestamp_pb2.Timestamp | None:
    """Return ``value`` as a Timestamp, or None (which leaves the field unset)."""
    if value is None:
        return None
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(seconds * 1_000_000_000))
    return message


def seconds_of(message: duration_pb2.Duration) -> float:
    return message.seconds + message.nanos / 1_000_000_000


def host_facts_from_proto(facts: common_pb2.HostFacts) -> HostFacts:
    return HostFacts(
        hostname=facts.hostname,
        machine_id=facts.machine_id,
        os_name=facts.os_name,
        os_version=facts.os_version,
        architecture=facts.architecture,
        agent_version=facts.agent_version,
        addresses=tuple(facts.addresses),
        labels=dict(facts.labels),
    )


def agent_to_proto(agent: Agent, status: AgentStatus) -> panel_pb2.Agent:
    return panel_pb2.Agent(
        id=str(agent.id),
        facts=common_pb2.HostFacts(
            hostname=agent.hostname,
            machine_id=agent.machine_id,
            os_name=agent.os_name,
            os_version=agent.os_version,
            architecture=agent.architecture,
            agent_version=agent.agent_version,
            addresses=list(agent.addresses),
            labels=agent.labels,
        ),
        group=agent.group,
        status=AGENT_STATUS_TO_PROTO[status],
        created_at=timestamp(agent.created_at),
        first_connected_at=timestamp(agent.first_connected_at),
        last_seen_at=timestamp(agent.last_seen_at),
        revoked_at=timestamp(agent.revoked_at),
        revoked_reason=agent.revoked_reason or "",
    )


def command_to_proto(command: Command) -> panel_pb2.Command:
    return panel_pb2.Command(
        id=str(command.id),
        agent_id=str(command.agent_id),
        command_line=command.command_line,
        reason=command.reason,
        requested_by=command.requested_by,
        state=COMMAND_STATE_TO_PROTO[command.state],
        timeout=duration(command.timeout_seconds),
        expires_at=timestamp(command.expires_at),
        created_at=timestamp(command.created_at),
        sent_at=timestamp(command.sent_at),
        started_at=timestamp(command.started_at),
        finished_at=timestamp(command.finished_at),
        exit_code=command.exit_code,
        stdout=command.stdout or b"",
        stderr=command.stderr or b"",
        stdout_truncated=command.stdout_truncated,
        stderr_truncated=command.stderr_truncated,
        duration=None if command.duration_ms is None else duration(command.duration_ms / 1000),
        error=command.error or "",
    )


def command_request(command: Command) -> agent_pb2.ServerMessage:
    return agent_pb2.ServerMessage(
        command_request=agent_pb2.CommandRequest(
            command_id=str(command.id),
            command_line=command.command_line,
            timeout=duration(command.timeout_seconds),
            expires_at=timestamp(command.expires_at),
        )
    )


def token_to_proto(token: EnrollmentToken) -> panel_pb2.EnrollmentToken:
    return panel_pb2.EnrollmentToken(
        id=str(token.id),
        prefix=token.prefix,
        description=token.description,
        group=token.group,
        labels=token.labels,
        max_uses=token.max_uses,
        use_count=token.use_count,
        expires_at=timestamp(token.expires_at),
        created_at=timestamp(token.created_at),
        created_by=token.created_by,
        last_used_at=timestamp(token.last_used_at),
        revoked_at=timestamp(token.revoked_at),
        state=TOKEN_STATE_TO_PROTO[token.state],
    )


UPDATE_STATE_FROM_PROTO = {
    agent_pb2.UPDATE_STATE_DOWNLOADING: AgentUpdateState.DOWNLOADING,
    agent_pb2.UPDATE_STATE_INSTALLING: AgentUpdateState.INSTALLING,
    agent_pb2.UPDATE_STATE_SUCCEEDED: AgentUpdateState.SUCCEEDED,
    agent_pb2.UPDATE_STATE_FAILED: AgentUpdateState.FAILED,
    agent_pb2.UPDATE_STATE_ROLLED_BACK: AgentUpdateState.ROLLED_BACK,
}


def update_notice(notice: UpdateNotice) -> agent_pb2.ServerMessage:
    release = notice.release
    return agent_pb2.ServerMessage(
        update_notice=agent_pb2.UpdateNotice(
            rollout_id=str(notice.rollout_id),
            release_id=str(release.id),
            version=release.version,
            size_bytes=release.size_bytes,
            sha256=release.sha256,
            manifest=release.manifest_bytes,
            signature=release.signature,
            deadline=timestamp(notice.deadline_at),
        )
    )
