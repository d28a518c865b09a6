"""`agentmgr agents ...` and `agentmgr command ...` on the manager's VM."""

from __future__ import annotations

import argparse
import time

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


def agent_records(context: Context, items: list) -> list[dict]:
    """Return agents as records with their derived status, using Redis for fresh heartbeats."""
    client = connect_redis(context.settings.redis_url)
    ping_redis(client)
    live = routing.live_seen_at(client, [agent.id for agent in items])
    thresholds = LivenessThresholds.from_settings(context.settings)
    now = utc_now()
    records = []
    for agent in items:
        record = vars_of(agent)
        record["status"] = agents.derive_status(agent, now=now, thresholds=thresholds, live_seen_at=live.get(agent.id))
        if live.get(agent.id) and (agent.last_seen_at is None or live[agent.id] > agent.last_seen_at):
            record["last_seen_at"] = live[agent.id]
        records.append(record)
    return records


def agents_list(context: Context, arguments: argparse.Namespace) -> int:
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
    with context.transaction() as connection:
        agent = agents.get_agent(connection, arguments.agent_id)
    print_record(agent_records(context, [agent])[0], context.output)
    return 0


def agents_delete(context: Context, arguments: argparse.Namespace) -> int:
    with context.transaction() as connection:
        agent, cancelled = agents.revoke_agent(connection, arguments.agent_id, actor=context.actor, reason=arguments.reason)
    client = connect_redis(context.settings.redis_url)
    routing.publish_revocation(client, agent.id)
    print_record({**vars_of(agent), "status": AgentStatus.REVOKED, "cancelled_command_ids": cancelled}, context.output)
    return 0


def command_record(command: commands.Command) -> dict:
    record = vars_of(command)
    for stream in ("stdout", "stderr"):
        record[stream] = (getattr(command, stream) or b"").decode("utf-8", errors="replace")
    return record


def command_run(context: Context, arguments: argparse.Namespace) -> int:
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
    if command.state not in FINAL_STATES:
        return 0
    return 0 if command.state == CommandState.SUCCEEDED else 1


def command_show(context: Context, arguments: argparse.Namespace) -> int:
    with context.transaction() as connection:
        command = commands.get_command(connection, arguments.command_id)
    print_record(command_record(command), context.output)
    return 0


def command_list(context: Context, arguments: argparse.Namespace) -> int:
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
    with context.transaction() as connection:
        command = commands.cancel_command(connection, arguments.command_id, actor=context.actor)
    print_record(command_record(command), context.output)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    """Add the ``agents`` and ``command`` command groups to the parser."""
    group = groups.add_parser("agents", help="enrolled agents").add_subparsers(dest="action", required=True)
    listing = group.add_parser("list", help="list agents with their derived status")
    listing.add_argument("--status", choices=[status.value for status in AgentStatus])
    listing.add_argument("--group")
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
    run.add_argument("--timeout", type=duration_seconds, default=60, help="longest run time, such as 30s or 5m (default 60s)")
    run.add_argument("--expires-in", type=duration_seconds, help="drop the command if not started by then (default: AGENTMGR_COMMAND_EXPIRES_SECONDS)")
    run.add_argument("--reason", default="", help="why, for the audit log")
    run.add_argument("--wait", type=float, default=0, help="seconds to wait for the result (capped by AGENTMGR_COMMAND_WAIT_MAX_SECONDS)")
    run.set_defaults(handler=command_run)
    show = group.add_parser("show", help="one command with its output")
    show.add_argument("command_id", type=identifier)
    show.set_defaults(handler=command_show)
    listing = group.add_parser("list", help="list commands")
    listing.add_argument("--agent", type=identifier)
    listing.add_argument("--state", choices=[state.value for state in CommandState])
    listing.add_argument("--requested-by")
    add_listing_options(listing)
    listing.set_defaults(handler=command_list)
    cancel = group.add_parser("cancel", help="cancel a command that has not finished")
    cancel.add_argument("command_id", type=identifier)
    cancel.set_defaults(handler=command_cancel)
