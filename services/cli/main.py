"""`agentmgr`: the operator CLI.

On the manager's VM it works from the ``AGENTMGR_`` settings alone and calls
the same domain functions (``services.core.fleet``) that the panel API serves.

Exit statuses: 0 success, 1 unexpected error (for `command run --wait`: the
command failed, timed out, expired or was cancelled), 2 invalid argument or
setting, 3 database or panel API unusable, 9 Redis unusable, 10 not found,
11 conflict with the current state (already exists, revoked, expired),
12 unauthenticated, 13 permission denied, 14 `status` found a part unhealthy.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import sys

from services.cli.common import (
    EXIT_CODES_BY_GRPC_CODE,
    Context,
    add_listing_options,
    duration_seconds,
    identifier,
    label,
    page_request,
    vars_of,
)
from agentmanager.v1 import panel_pb2
from services.cli import fleet, remote, status, updates
from services.cli.output import FORMATS, TABLE, print_record, print_records
from services.core.errors import AgentManagerError, ExitCode, RequestError, SettingsError, exit_code_for
from services.core.fleet import apitokens, audit, enrollment
from services.core.fleet.models import ApiRole, utc_now
from services.core.logs import configure_logging
from services.core.settings import Settings
from services.core.tls import load_tls_material

logger = logging.getLogger("agentmgr.cli")

AUDITED_ACTIONS = {
    ("token", "create"): "token.create",
    ("token", "revoke"): "token.revoke",
    ("apikey", "create"): "apikey.create",
    ("apikey", "revoke"): "apikey.revoke",
    ("agents", "delete"): "agent.delete",
    ("command", "run"): "command.create",
    ("command", "cancel"): "command.cancel",
    ("updates", "publish"): "release.add",
    ("updates", "rollout"): "rollout.create",
    ("updates", "pause"): "rollout.pause",
    ("updates", "resume"): "rollout.resume",
    ("updates", "abort"): "rollout.abort",
}
"""Subcommands that change state, with the audit action that records them."""

REMOTE_GROUPS = ("token", "agents", "command")
"""Command groups that the panel API serves, so they work with --server."""

# Enrollment tokens.


def manager_address(settings: Settings, override: str | None) -> str:
    """Return the HOST:PORT that agents should dial: ``override``, or the listen address."""
    if override:
        return override
    host = settings.grpc_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"


def token_create(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        return remote_token_create(context, arguments)
    expires_at = utc_now() + datetime.timedelta(seconds=arguments.expires_in) if arguments.expires_in else None
    with context.transaction() as connection:
        token, secret = enrollment.create_token(
            connection,
            created_by=context.actor,
            description=arguments.description,
            group=arguments.group,
            labels=dict(arguments.label),
            max_uses=arguments.max_uses,
            expires_at=expires_at,
        )
    manager = manager_address(context.settings, arguments.manager)
    print_new_token(context, manager, vars_of(token), secret, load_tls_material(context.settings).ca_fingerprint)
    return 0


def remote_token_create(context: Context, arguments: argparse.Namespace) -> int:
    request = panel_pb2.CreateEnrollmentTokenRequest(
        description=arguments.description, group=arguments.group, labels=dict(arguments.label),
        max_uses=arguments.max_uses, expires_in=remote.duration(arguments.expires_in) if arguments.expires_in else None,
    )
    reply = context.panel.call("CreateEnrollmentToken", request)
    manager = arguments.manager or context.panel.server
    print_new_token(context, manager, remote.token_record(reply.token), reply.secret, reply.ca_fingerprint)
    return 0


def print_new_token(context: Context, manager: str, token: dict, secret: str, fingerprint: str) -> None:
    install = (
        f"agentmgr-agent install --manager {manager} "
        f"--token {secret} --ca-fingerprint {fingerprint}"
    )
    record = {
        **token,
        "secret": secret,
        "ca_fingerprint": fingerprint,
        "install_command": install,
    }
    print_record(record, context.output)
    if context.output == TABLE:
        print("\nThe token is shown only this once. On the host to enroll, run:\n")
        print(f"  {install}")


TOKEN_COLUMNS = ("id", "prefix", "state", "group", "use_count", "max_uses", "expires_at", "last_used_at", "description")


def token_list(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("ListEnrollmentTokens", panel_pb2.ListEnrollmentTokensRequest(
            include_revoked=arguments.all, page=remote.page(arguments)))
        records, next_token = [remote.token_record(token) for token in reply.tokens], reply.next_page_token
    else:
        with context.transaction() as connection:
            page = enrollment.list_tokens(connection, include_revoked=arguments.all, page=page_request(arguments))
        records, next_token = [vars_of(token) for token in page.items], page.next_page_token
    print_records(records, TOKEN_COLUMNS, context.output, extra={"next_page_token": next_token})
    return 0


def token_revoke(context: Context, arguments: argparse.Namespace) -> int:
    if context.panel:
        reply = context.panel.call("RevokeEnrollmentToken", panel_pb2.RevokeEnrollmentTokenRequest(token_id=str(arguments.token_id)))
        print_record(remote.token_record(reply), context.output)
        return 0
    with context.transaction() as connection:
        token = enrollment.revoke_token(connection, arguments.token_id, actor=context.actor)
    print_record(vars_of(token), context.output)
    return 0


# Operator API tokens.

API_TOKEN_COLUMNS = ("id", "name", "role", "prefix", "created_by", "expires_at", "last_used_at", "revoked_at")


def apikey_create(context: Context, arguments: argparse.Namespace) -> int:
    expires_at = utc_now() + datetime.timedelta(seconds=arguments.expires_in) if arguments.expires_in else None
    with context.transaction() as connection:
        token, secret = apitokens.create_api_token(
            connection, name=arguments.name, role=ApiRole(arguments.role), created_by=context.actor, expires_at=expires_at
        )
    print_record({**vars_of(token), "secret": secret}, context.output)
    if context.output == TABLE:
        print("\nThe token is shown only this once. Panel API calls send it as `authorization: Bearer TOKEN`.")
    return 0


def apikey_list(context: Context, arguments: argparse.Namespace) -> int:
    with context.transaction() as connection:
        page = apitokens.list_api_tokens(connection, include_revoked=arguments.all, page=page_request(arguments))
    print_records([vars_of(token) for token in page.items], API_TOKEN_COLUMNS, context.output,
                  extra={"next_page_token": page.next_page_token})
    return 0


def apikey_revoke(context: Context, arguments: argparse.Namespace) -> int:
    with context.transaction() as connection:
        token = apitokens.revoke_api_token(connection, arguments.token_id, actor=context.actor)
    print_record(vars_of(token), context.output)
    return 0


# The argument tree.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmgr",
        description="Operate the Agent Manager: enrollment tokens, API tokens, agents and commands.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", "-o", choices=FORMATS, default=TABLE, help="table for people (default) or json for scripts")
    parser.add_argument("--server", default=os.environ.get("AGENTMGR_SERVER", ""),
                        help="HOST:PORT of a gateway: use its panel API instead of this VM's database "
                             "(token, agents and command only; default AGENTMGR_SERVER)")
    parser.add_argument("--api-token", default="", help="API token for --server (default AGENTMGR_API_TOKEN)")
    parser.add_argument("--ca-file", default="", help="gateway CA for --server (default AGENTMGR_CA_FILE, else this VM's tls/ca.pem)")
    groups = parser.add_subparsers(dest="command_group", required=True, metavar="COMMAND")

    token = groups.add_parser("token", help="enrollment tokens that admit new agents").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="create a token and print the agent install command")
    create.add_argument("--description", default="", help="free text shown in listings")
    create.add_argument("--group", default="", help="group given to agents enrolled with this token")
    create.add_argument("--label", type=label, action="append", default=[], help="key=value given to agents (repeatable)")
    create.add_argument("--max-uses", type=int, help="number of enrollments allowed (default: unlimited)")
    create.add_argument("--expires-in", type=duration_seconds, help="lifetime such as 30m, 12h or 7d (default: none)")
    create.add_argument("--manager", help="HOST:PORT agents dial, for the install command (default: this host and the gateway port)")
    create.set_defaults(handler=token_create)
    listing = token.add_parser("list", help="list tokens (secrets are never shown again)")
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    add_listing_options(listing)
    listing.set_defaults(handler=token_list)
    revoke = token.add_parser("revoke", help="revoke a token so no more agents enroll with it")
    revoke.add_argument("token_id", type=identifier)
    revoke.set_defaults(handler=token_revoke)

    apikey = groups.add_parser("apikey", help="operator API tokens for the panel gRPC API").add_subparsers(dest="action", required=True)
    create = apikey.add_parser("create", help="create an API token")
    create.add_argument("name", help="who or what uses the token")
    create.add_argument("--role", choices=[role.value for role in ApiRole], default=ApiRole.VIEWER.value,
                        help="viewer (read-only), operator (commands and tokens) or admin (default viewer)")
    create.add_argument("--expires-in", type=duration_seconds, help="lifetime such as 30d (default: none)")
    create.set_defaults(handler=apikey_create)
    listing = apikey.add_parser("list", help="list API tokens")
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    add_listing_options(listing)
    listing.set_defaults(handler=apikey_list)
    revoke = apikey.add_parser("revoke", help="revoke an API token")
    revoke.add_argument("token_id", type=identifier)
    revoke.set_defaults(handler=apikey_revoke)

    fleet.register(groups)
    status.register(groups)
    updates.register(groups)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand and return the exit status."""
    arguments = build_parser().parse_args(argv)
    configure_logging("agentmgr", "WARNING")
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"agentmgr: {error}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    try:
        panel = None
        if arguments.server:
            if arguments.command_group not in REMOTE_GROUPS:
                print(f"agentmgr: {arguments.command_group} works only on the manager's VM, without --server", file=sys.stderr)
                return int(ExitCode.CONFIG)
            panel = remote.client_from(arguments, settings)
        context = Context(settings, arguments.output, panel)
    except RequestError as error:
        print(f"agentmgr: {error}", file=sys.stderr)
        return EXIT_CODES_BY_GRPC_CODE.get(error.grpc_code_name, int(ExitCode.FAILURE))
    try:
        return arguments.handler(context, arguments)
    except RequestError as error:
        print(f"agentmgr: {error}", file=sys.stderr)
        if context.panel is None:
            audit_failure(context, arguments, error)
        return EXIT_CODES_BY_GRPC_CODE.get(error.grpc_code_name, int(ExitCode.FAILURE))
    except AgentManagerError as error:
        print(f"agentmgr: {error}", file=sys.stderr)
        return exit_code_for(error)
    finally:
        context.close()


def audit_failure(context: Context, arguments: argparse.Namespace, error: RequestError) -> None:
    """Record a rejected state-changing subcommand in the audit log, in a transaction of its own.

    Over --server the gateway records it instead. An audit that cannot be
    written is reported on stderr; the subcommand's own error stays the result.
    """
    action = AUDITED_ACTIONS.get((arguments.command_group, arguments.action))
    if action is None:
        return
    target = next((str(getattr(arguments, name)) for name in ("token_id", "agent_id", "command_id", "rollout_id")
                   if getattr(arguments, name, None) is not None), "")
    try:
        with context.transaction() as connection:
            audit.record(connection, actor=context.actor, action=action, target_id=target, outcome="failure",
                         details={"error": str(error)[:500]})
    except AgentManagerError as audit_error:
        print(f"agentmgr: failed to record the failure in the audit log: {audit_error}", file=sys.stderr)


def main() -> int:
    return run()


if __name__ == "__main__":
    sys.exit(main())
