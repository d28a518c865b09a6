"""`agentmgr --server`: the panel API path gives the same results as the local path."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.gateway_client import Agent, GatewayStack
from tests.support import PROJECT_ROOT, VENV_BIN


@pytest.fixture(scope="module")
def stack(postgres, redis_server, test_root) -> Iterator[GatewayStack]:
    stack = GatewayStack(postgres, redis_server, test_root)
    stack.start_gateway()
    yield stack
    stack.close()


def cli(stack: GatewayStack, *args: str, remote: str | None = None) -> subprocess.CompletedProcess:
    """Run agentmgr locally (remote=None) or through the panel API with the API token ``remote``."""
    gateway = stack.gateways[0]
    options = ["--server", gateway.address, "--api-token", remote] if remote is not None else []
    return subprocess.run(
        [str(VENV_BIN / "agentmgr"), *options, *args],
        env={**os.environ, **gateway.env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )


def json_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_token_commands_match_local(stack):
    admin = stack.api_token("admin")

    created = json_of(cli(stack, "-o", "json", "token", "create", "--group", "web", "--max-uses", "3", remote=admin))
    remote_list = json_of(cli(stack, "-o", "json", "token", "list", remote=admin))
    local_list = json_of(cli(stack, "-o", "json", "token", "list"))
    revoked = json_of(cli(stack, "-o", "json", "token", "revoke", created["id"], remote=admin))

    assert created["install_command"].startswith(f"agentmgr-agent install --manager {stack.gateways[0].address} ")
    assert created["secret"] in created["install_command"]
    assert remote_list == local_list
    assert revoked["state"] == "revoked"


def test_agent_and_command_commands_match_local(stack):
    operator = stack.api_token("operator")
    with stack.gateways[0].channel() as channel:
        agent = Agent.register(channel, stack.enrollment_token(group=f"g-{uuid.uuid4().hex[:6]}"))

    remote_agent = json_of(cli(stack, "-o", "json", "agents", "show", agent.agent_id, remote=operator))
    local_agent = json_of(cli(stack, "-o", "json", "agents", "show", agent.agent_id))
    queued = json_of(cli(stack, "-o", "json", "command", "run", agent.agent_id, "uptime", "--timeout", "20s", remote=operator))
    remote_commands = json_of(cli(stack, "-o", "json", "command", "list", "--agent", agent.agent_id, remote=operator))
    local_commands = json_of(cli(stack, "-o", "json", "command", "list", "--agent", agent.agent_id))
    cancelled = json_of(cli(stack, "-o", "json", "command", "cancel", queued["id"], remote=operator))
    local_command = json_of(cli(stack, "-o", "json", "command", "show", queued["id"]))
    remote_command = json_of(cli(stack, "-o", "json", "command", "show", queued["id"], remote=operator))

    assert remote_agent == local_agent
    assert queued["state"] == "queued"
    assert remote_commands == local_commands
    assert cancelled["state"] == "cancelled"
    assert remote_command == local_command


@pytest.mark.parametrize(
    ("role", "args", "status", "message"),
    [
        ("none", ("token", "list"), 12, ""),
        ("viewer", ("token", "create"), 13, ""),
        ("viewer", ("agents", "show", str(uuid.UUID(int=1))), 10, "not found"),
        ("admin", ("updates", "list"), 2, "only on the manager's VM"),
    ],
)
def test_remote_errors_exit_codes(stack, role, args, status, message):
    token = "amapi_not-a-real-token" if role == "none" else stack.api_token(role)

    result = cli(stack, *args, remote=token)

    assert result.returncode == status, result.stdout + result.stderr
    assert message in result.stderr


def test_denied_panel_call_is_audited(stack):
    viewer = stack.api_token("viewer")

    def denied_entries() -> list[dict]:
        entries = json_of(cli(stack, "-o", "json", "audit", "list", "--action", "token.create", "--limit", "500"))["items"]
        return [entry for entry in entries if entry["outcome"] == "denied"]

    before = denied_entries()
    denied = cli(stack, "token", "create", remote=viewer)
    after = denied_entries()

    assert denied.returncode == 13
    assert len(after) == len(before) + 1
    assert after[-1]["actor"].startswith("api:viewer-")
    assert "role" in after[-1]["details"]["error"]
