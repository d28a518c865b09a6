"""`agentmgr status` (one screen on the whole manager) and `agentmgr audit list`."""

from __future__ import annotations

import argparse
import datetime
import xmlrpc.client
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rq import Queue, Worker
from supervisor.xmlrpc import SupervisorTransport

from services.cli.common import Context, add_listing_options, duration_seconds, page_request, vars_of
from services.cli.output import TABLE, print_record, print_records
from services.core import defaults
from services.core.db import connect
from services.core.errors import AgentManagerError
from services.core.fleet import agents, audit
from services.core.fleet.agents import LivenessThresholds
from services.core.fleet.listing import AuditFilters
from services.core.fleet.models import utc_now
from services.core.redis_client import connect_redis, ping_redis
from services.core.schema import check_schema
from services.core.tls import CA_FILE

HEALTH_TIMEOUT_SECONDS = 3
UNHEALTHY_EXIT_CODE = 14
"""Exit status of `agentmgr status` when any part is unhealthy."""
AUDIT_COLUMNS = ("id", "at", "actor", "action", "target_type", "target_id", "outcome")


def check_database(context: Context) -> dict[str, Any]:
    try:
        connection = connect(context.settings.database_url, application_name="agentmgr-status")
    except AgentManagerError as error:
        return {"ok": False, "error": str(error)}
    try:
        version = check_schema(connection)
        counts = agents.count_by_status(
            connection, now=utc_now(), thresholds=LivenessThresholds.from_settings(context.settings)
        )
        return {"ok": True, "schema_version": version, "agents": {status.value: n for status, n in counts.items()}}
    except AgentManagerError as error:
        return {"ok": False, "error": str(error)}
    finally:
        connection.close()


def check_redis(context: Context) -> dict[str, Any]:
    client = connect_redis(context.settings.redis_url)
    try:
        ping_redis(client)
        queue = Queue(defaults.UPDATES_QUEUE, connection=client)
        workers = Worker.all(queue=queue)
        return {"ok": True, "queue": defaults.UPDATES_QUEUE, "queued_jobs": queue.count, "workers": len(workers)}
    except AgentManagerError as error:
        return {"ok": False, "error": str(error)}


def check_supervisor(context: Context) -> dict[str, Any]:
    socket_path = context.settings.run_dir / "supervisor.sock"
    transport = SupervisorTransport(None, None, f"unix://{socket_path}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport)
    try:
        infos = proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error) as error:
        return {"ok": False, "error": f"supervisord not reachable at {socket_path}: {error}"}
    programs = {}
    for info in infos:
        state = info["statename"]
        if state == "EXITED":
            state = f"EXITED (status {info['exitstatus']})"
        programs[info["name"]] = state
    expected = {"grpc_gateway": "RUNNING", "updater": "RUNNING", "migrate": "EXITED (status 0)"}
    ok = all(programs.get(name, "").startswith(state) for name, state in expected.items())
    return {"ok": ok, "programs": programs}


def check_gateway(context: Context) -> dict[str, Any]:
    host = context.settings.grpc_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    address = f"[{host}]:{context.settings.grpc_port}" if ":" in host else f"{host}:{context.settings.grpc_port}"
    ca_path = context.settings.tls_ca_file or context.settings.tls_dir / CA_FILE
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_path.read_bytes())
    except OSError as error:
        return {"ok": False, "address": address, "error": f"cannot read CA {ca_path}: {error.strerror}"}
    with grpc.secure_channel(address, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            return {"ok": False, "address": address, "error": f"{error.code().name}: {error.details()}"}
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return {"ok": status == "SERVING", "address": address, "health": status}


def status(context: Context, arguments: argparse.Namespace) -> int:
    report = {
        "database": check_database(context),
        "redis": check_redis(context),
        "supervisord": check_supervisor(context),
        "gateway": check_gateway(context),
    }
    healthy = all(part["ok"] for part in report.values())
    if context.output == TABLE:
        for name, part in report.items():
            details = {key: value for key, value in part.items() if key != "ok"}
            print(f"{name:<12} {'ok' if part['ok'] else 'FAILED':<7} {summary(details)}")
    else:
        print_record({"healthy": healthy, **report}, context.output)
    return 0 if healthy else UNHEALTHY_EXIT_CODE


def summary(details: dict[str, Any]) -> str:
    parts = []
    for key, value in details.items():
        if isinstance(value, dict):
            value = ", ".join(f"{name}={item}" for name, item in value.items())
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def audit_list(context: Context, arguments: argparse.Namespace) -> int:
    since = utc_now() - datetime.timedelta(seconds=arguments.since) if arguments.since else None
    filters = AuditFilters(actor=arguments.actor, action=arguments.action_filter, target_id=arguments.target, since=since)
    with context.transaction() as connection:
        page = audit.list_entries(connection, filters=filters, page=page_request(arguments))
    print_records([vars_of(entry) for entry in page.items], AUDIT_COLUMNS, context.output,
                  extra={"next_page_token": page.next_page_token})
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    """Add ``status`` and the ``audit`` command group to the parser."""
    command = groups.add_parser("status", help="database, Redis, supervisord programs, gateway health, queue, agents")
    command.set_defaults(handler=status)
    group = groups.add_parser("audit", help="the append-only log of operator actions").add_subparsers(dest="action", required=True)
    listing = group.add_parser("list", help="list audit entries, oldest first")
    listing.add_argument("--actor", help="who acted, such as cli:root@vm or an API token name")
    listing.add_argument("--action", dest="action_filter", metavar="ACTION", help="such as token.create or agent.delete")
    listing.add_argument("--target", help="target id")
    listing.add_argument("--since", type=duration_seconds, help="only entries this recent, such as 1h or 7d")
    add_listing_options(listing)
    listing.set_defaults(handler=audit_list)
