"""`agentmgr agents ...` and `agentmgr command ...` on the manager's VM."""

from __future__ import annotations

import argparse
import time

from agentmanager.v1 import common_pb2, panel_pb2
from services.cli import remote
from services.cli.common import Context, add_listing_options, duration_seconds, identifier, label, page_request, vars_of
from services.cli.output import print_record, print_records
from services.core import routing
from services.core.fleet import agents, commands
from services.core.fleet.agents import LivenessThresholds
from services.core.fleet.listing import AgentFilters, CommandFilters
from services.core.fleet.models import FINAL_STATES, AgentStatus, CommandState, utc_now
from services.core.redis_client import connect_redis, ping_redis

AGENT_COLUMNS = ("id", "hostname", "status", "group", "agent_version", "os_name", "last_seen_at", "labels")
COMMAND_COLUMNS = ("id", "agent_id", "state", "exit_code", "command_line", "requested_by", "created_at")
WAIT_POLL_SECONDS = 0.2


def agent_fields(agent: agents.Agent) -> dict:
    """Return the agent's fields that both the local and the --server output carry."""
    record = vars_of(agent)
    record.pop("replaced_by")
    return record


def agent_records(context: Context, items: list) -> list[dict]:
    """Return agents as records with their derived status, using Redis for fresh heartbeats."""
    client = connect_redis(context.settings.redis_url)
    ping_redis(client)
    live = routing.live_seen_at(client, [agent.id for agent in items])
    thresholds = LivenessThresholds.from_settings(context.settings)
    now = utc_now()
    records = []
    for agent in items:
        record = agent_fields(agent)
        record["status"] = agents.derive_status(agent, now=now, thresholds=thresholds, live_seen_at=live.get(agent.id))
        if live.get(agent.id) and (agent.last_seen_at is None or live[agent.id] > agent.last_seen_at):
            record["last_seen_at"] = live[agent.id]
        records.append(record)
    return records


def agents_list(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("ListAgents", panel_pb2.ListAgentsRequest(
            status=common_pb2.AgentStatus.Value(f"AGENT_STATUS_{arguments.status.upper()}") if arguments.status else 0,
            group=arguments.group or "", labels=dict(arguments.label), hostname_contains=arguments.hostname or "",
            include_revoked=arguments.all, page=remote.page(arguments)))
        print_records([remote.agent_record(agent) for agent in reply.agents], AGENT_COLUMNS, context.output,
                      extra={"next_page_token": reply.next_page_token, "total": reply.total if reply.HasField("total") else None})
        return 0
    filters = AgentFilters(
        status=AgentStatus(arguments.status) if arguments.status else None,
        group=arguments.group,
        label=dict(arguments.label),
        hostname_contains=arguments.hostname or "",
        include_revoked=arguments.all,
    )
    with context.transaction() as connection:
        page = agents.list_agents(
            connection, filters=filters, page=page_request(arguments), now=utc_now(),
            thresholds=LivenessThresholds.from_settings(context.settings),
        )
    print_records(agent_records(context, page.items), AGENT_COLUMNS, context.output,
                  extra={"next_page_token": page.next_page_token, "total": page.total})
    return 0


def agents_show(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("GetAgent", panel_pb2.GetAgentRequest(agent_id=str(arguments.agent_id)))
        print_record(remote.agent_record(reply), context.output)
        return 0
    with context.transaction() as connection:
        agent = agents.get_agent(connection, arguments.agent_id)
    print_record(agent_records(context, [agent])[0], context.output)
    return 0


def agents_delete(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("DeleteAgent", panel_pb2.DeleteAgentRequest(
            agent_id=str(arguments.agent_id), reason=arguments.reason))
        record = {**remote.agent_record(reply.agent), "cancelled_command_ids": list(reply.cancelled_command_ids)}
        print_record(record, context.output)
        return 0
    with context.transaction() as connection:
        agent, cancelled = agents.revoke_agent(connection, arguments.agent_id, actor=context.actor, reason=arguments.reason)
    client = connect_redis(context.settings.redis_url)
    routing.publish_revocation(client, agent.id)
    record = agent_fields(agent)
    print_record({**record, "status": AgentStatus.REVOKED, "cancelled_command_ids": cancelled}, context.output)
    return 0


def command_record(command: commands.Command) -> dict:
    record = vars_of(command)
    for stream in ("stdout", "stderr"):
        record[stream] = (getattr(command, stream) or b"").decode("utf-8", errors="replace")
    return record


def exit_status(state: str) -> int:
    """Return 0 unless the command ended without success (exit status 1)."""
    return 1 if state in FINAL_STATES and state != CommandState.SUCCEEDED else 0


def command_run(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        request = panel_pb2.RunCommandRequest(
            agent_id=str(arguments.agent_id), command_line=arguments.command_line,
            timeout=remote.duration(arguments.timeout), reason=arguments.reason,
            expires_in=remote.duration(arguments.expires_in) if arguments.expires_in else None,
            wait=remote.duration(arguments.wait) if arguments.wait else None,
        )
        record = remote.command_record(context.panel.call("RunCommand", request, timeout=arguments.wait + 30))
        print_record(record, context.output)
        return exit_status(CommandState(record["state"]))
    with context.transaction() as connection:
        command = commands.create_command(
            connection,
            agent_id=arguments.agent_id,
            command_line=arguments.command_line,
            timeout_seconds=arguments.timeout,
            expires_in_seconds=arguments.expires_in or int(context.settings.command_expires_seconds),
            reason=arguments.reason,
            requested_by=context.actor,
        )
    client = connect_redis(context.settings.redis_url)
    routing.publish_to_agent(client, command.agent_id, {"kind": "command", "command_id": str(command.id)})
    deadline = time.monotonic() + min(arguments.wait, context.settings.command_wait_max_seconds)
    while command.state not in FINAL_STATES and time.monotonic() < deadline:
        time.sleep(WAIT_POLL_SECONDS)
        with context.transaction() as connection:
            command = commands.get_command(connection, command.id)
    print_record(command_record(command), context.output)
    return exit_status(command.state)


def command_show(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("GetCommand", panel_pb2.GetCommandRequest(command_id=str(arguments.command_id)))
        print_record(remote.command_record(reply), context.output)
        return 0
    with context.transaction() as connection:
        command = commands.get_command(connection, arguments.command_id)
    print_record(command_record(command), context.output)
    return 0


def command_list(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("ListCommands", panel_pb2.ListCommandsRequest(
            agent_id=str(arguments.agent) if arguments.agent else "",
            state=common_pb2.CommandState.Value(f"COMMAND_STATE_{arguments.state.upper()}") if arguments.state else 0,
            requested_by=arguments.requested_by or "", page=remote.page(arguments)))
        print_records([remote.command_record(item) for item in reply.commands], COMMAND_COLUMNS, context.output,
                      extra={"next_page_token": reply.next_page_token})
        return 0
    filters = CommandFilters(
        agent_id=arguments.agent,
        state=CommandState(arguments.state) if arguments.state else None,
        requested_by=arguments.requested_by,
    )
    with context.transaction() as connection:
        page = commands.list_commands(connection, filters=filters, page=page_request(arguments))
    print_records([command_record(item) for item in page.items], COMMAND_COLUMNS, context.output,
                  extra={"next_page_token": page.next_page_token})
    return 0


def command_cancel(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("CancelCommand", panel_pb2.CancelCommandRequest(command_id=str(arguments.command_id)))
        print_record(remote.command_record(reply), context.output)
        return 0
    with context.transaction() as connection:
        command = commands.cancel_command(connection, arguments.command_id, actor=context.actor)
    client = connect_redis(context.settings.redis_url)
    routing.publish_to_agent(client, command.agent_id, {"kind": "cancel_command", "command_id": str(command.id)})
    print_record(command_record(command), context.output)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    """Add the ``agents`` and ``command`` command groups to the parser."""
    group = groups.add_parser("agents", help="enrolled agents").add_subparsers(dest="action", required=True)
    listing = group.add_parser("list", help="list agents with their derived status")
    listing.add_argument("--status", choices=[status.value for status in AgentStatus], help="only agents with this status")
    listing.add_argument("--group", help="only agents of this group")
    listing.add_argument("--label", type=label, action="append", default=[], help="key=value that must match (repeatable)")
    listing.add_argument("--hostname", help="case-insensitive part of the hostname")
    listing.add_argument("--all", action="store_true", help="include revoked agents")
    add_listing_options(listing)
    listing.set_defaults(handler=agents_list)
    show = group.add_parser("show", help="one agent's facts and status")
    show.add_argument("agent_id", type=identifier)
    show.set_defaults(handler=agents_show)
    delete = group.add_parser("delete", help="revoke an agent: its key stops working and its stream closes")
    delete.add_argument("agent_id", type=identifier)
    delete.add_argument("--reason", default="deleted", help="recorded with the revocation")
    delete.set_defaults(handler=agents_delete)

    group = groups.add_parser("command", help="commands run on agents").add_subparsers(dest="action", required=True)
    run = group.add_parser("run", help="queue a command; with --wait, print its result")
    run.add_argument("agent_id", type=identifier)
    run.add_argument("command_line", help="run by the agent with /bin/sh -c")
    run.add_argument("--timeout", type=duration_seconds, default=60, help="maximum run time, such as 30s or 5m (default 60s)")
    run.add_argument("--expires-in", type=duration_seconds, help="drop the command if not started by then (default: AGENTMGR_COMMAND_EXPIRES_SECONDS)")
    run.add_argument("--reason", default="", help="why, for the audit log")
    run.add_argument("--wait", type=float, default=0, help="seconds to wait for the result (capped by AGENTMGR_COMMAND_WAIT_MAX_SECONDS)")
    run.set_defaults(handler=command_run)
    show = group.add_parser("show", help="one command with its output")
    show.add_argument("command_id", type=identifier)
    show.set_defaults(handler=command_show)
    listing = group.add_parser("list", help="list commands")
    listing.add_argument("--agent", type=identifier, help="only commands of this agent id")
    listing.add_argument("--state", choices=[state.value for state in CommandState], help="only commands in this state")
    listing.add_argument("--requested-by", help="only commands of this requester, such as cli:root@vm")
    add_listing_options(listing)
    listing.set_defaults(handler=command_list)
    cancel = group.add_parser("cancel", help="cancel a command that has not finished")
    cancel.add_argument("command_id", type=identifier)
    cancel.set_defaults(handler=command_cancel)
