"""`agentmgr` end to end against a real PostgreSQL, in both output formats."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from services.core import credentials
from tests.support import PROJECT_ROOT, VENV_BIN, run_program


@pytest.fixture
def cli_env(service_env):
    assert run_program("services.migrate", service_env).returncode == 0
    return service_env


def agentmgr(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "agentmgr"), *args],
        env={**os.environ, **env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )


def test_token_create_prints_install_command(cli_env):
    result = agentmgr(cli_env, "-o", "json", "token", "create", "--max-uses", "2", "--expires-in", "1h",
                      "--group", "web", "--label", "env=prod", "--manager", "mgr.example:50051")

    assert result.returncode == 0, result.stderr
    token = json.loads(result.stdout)
    assert token["secret"].startswith(credentials.ENROLLMENT_TOKEN_PREFIX)
    assert token["ca_fingerprint"].startswith("sha256:")
    assert token["install_command"] == (
        f"agentmgr-agent install --manager mgr.example:50051 --token {token['secret']} "
        f"--ca-fingerprint {token['ca_fingerprint']}"
    )
    assert token["state"] == "active"
    assert token["group"] == "web"
    assert token["labels"] == {"env": "prod"}
    assert token["max_uses"] == 2


def test_token_list_never_shows_secret(cli_env):
    created = json.loads(agentmgr(cli_env, "-o", "json", "token", "create").stdout)

    table = agentmgr(cli_env, "token", "list")
    listing = json.loads(agentmgr(cli_env, "-o", "json", "token", "list").stdout)

    assert table.returncode == 0
    assert created["id"] in table.stdout
    assert created["secret"] not in table.stdout
    assert [item["id"] for item in listing["items"]] == [created["id"]]
    assert "secret" not in listing["items"][0]
    assert listing["next_page_token"] == ""


def test_token_revoke_then_hidden_from_list(cli_env):
    created = json.loads(agentmgr(cli_env, "-o", "json", "token", "create").stdout)

    revoked = agentmgr(cli_env, "-o", "json", "token", "revoke", created["id"])
    again = agentmgr(cli_env, "token", "revoke", created["id"])
    active = json.loads(agentmgr(cli_env, "-o", "json", "token", "list").stdout)
    everything = json.loads(agentmgr(cli_env, "-o", "json", "token", "list", "--all").stdout)

    assert revoked.returncode == 0
    assert json.loads(revoked.stdout)["state"] == "revoked"
    assert again.returncode == 11
    assert "revoked" in again.stderr
    assert active["items"] == []
    assert [item["id"] for item in everything["items"]] == [created["id"]]


def test_apikey_lifecycle(cli_env):
    created = agentmgr(cli_env, "-o", "json", "apikey", "create", "ci-bot", "--role", "operator")
    token = json.loads(created.stdout)
    listing = json.loads(agentmgr(cli_env, "-o", "json", "apikey", "list").stdout)
    revoked = agentmgr(cli_env, "-o", "json", "apikey", "revoke", token["id"])

    assert created.returncode == 0
    assert token["secret"].startswith(credentials.API_TOKEN_PREFIX)
    assert token["role"] == "operator"
    assert [item["name"] for item in listing["items"]] == ["ci-bot"]
    assert json.loads(revoked.stdout)["revoked_at"] is not None


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("token", "revoke", "00000000-0000-0000-0000-000000000000"), 10, "not found"),
        (("token", "revoke", "not-a-uuid"), 2, "invalid id"),
        (("token", "create", "--expires-in", "5x"), 2, "invalid duration"),
        (("token", "create", "--label", "novalue"), 2, "invalid label"),
        (("token", "create", "--max-uses", "0"), 2, "max_uses"),
        (("token", "list", "--limit", "100000"), 2, "page"),
        (("apikey", "create", "x", "--role", "root"), 2, "invalid choice"),
    ],
)
def test_bad_input_exit_codes(cli_env, args, status, message):
    result = agentmgr(cli_env, *args)

    assert result.returncode == status, result.stderr
    assert message in result.stderr


def test_database_down_exit_code(cli_env):
    env = {**cli_env, "AGENTMGR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}

    result = agentmgr(env, "token", "list")

    assert result.returncode == 3
    assert "agentmgr:" in result.stderr


def enroll_agent(env, hostname: str = "web-1", group: str = "web"):
    from services.core.database import Database
    from services.core.fleet import agents, enrollment

    database = Database(env["AGENTMGR_DATABASE_URL"], max_connections=1)
    try:
        with database.transaction() as conn:
            _, secret = enrollment.create_token(conn, created_by="test", group=group)
        with database.transaction() as conn:
            facts = agents.HostFacts(hostname=hostname, machine_id=f"machine-{hostname}-0001", os_name="linux",
                                     os_version="12", architecture="x86_64", agent_version="1.0.0",
                                     addresses=("192.0.2.10",), labels={"env": "prod"})
            agent, _ = agents.register_agent(conn, token_secret=secret, facts=facts)
        return agent.id
    finally:
        database.close()


def test_agents_list_show_delete(cli_env):
    import redis

    web = enroll_agent(cli_env, "web-1", "web")
    enroll_agent(cli_env, "db-1", "db")
    listener = redis.Redis.from_url(cli_env["AGENTMGR_REDIS_URL"]).pubsub()
    listener.subscribe("agentmgr:revocations")

    listing = json.loads(agentmgr(cli_env, "-o", "json", "agents", "list", "--group", "web").stdout)
    shown = json.loads(agentmgr(cli_env, "-o", "json", "agents", "show", str(web)).stdout)
    queued = json.loads(agentmgr(cli_env, "-o", "json", "command", "run", str(web), "uptime").stdout)
    deleted = agentmgr(cli_env, "-o", "json", "agents", "delete", str(web))
    messages = [m for m in iter(lambda: listener.get_message(timeout=2), None) if m["type"] == "message"]
    after = json.loads(agentmgr(cli_env, "-o", "json", "agents", "list").stdout)
    table = agentmgr(cli_env, "agents", "list", "--all")

    assert [item["hostname"] for item in listing["items"]] == ["web-1"]
    assert listing["items"][0]["status"] == "never_connected"
    assert shown["labels"] == {"env": "prod"}
    assert deleted.returncode == 0
    assert json.loads(deleted.stdout)["status"] == "revoked"
    assert json.loads(deleted.stdout)["cancelled_command_ids"] == [queued["id"]]
    assert [json.loads(m["data"])["agent_id"] for m in messages] == [str(web)]
    assert [item["hostname"] for item in after["items"]] == ["db-1"]
    assert "revoked" in table.stdout


def test_command_run_list_cancel(cli_env):
    agent_id = enroll_agent(cli_env)

    queued = agentmgr(cli_env, "-o", "json", "command", "run", str(agent_id), "echo hi", "--timeout", "30s", "--reason", "check")
    command = json.loads(queued.stdout)
    listing = json.loads(agentmgr(cli_env, "-o", "json", "command", "list", "--agent", str(agent_id)).stdout)
    cancelled = json.loads(agentmgr(cli_env, "-o", "json", "command", "cancel", command["id"]).stdout)
    again = agentmgr(cli_env, "command", "cancel", command["id"])
    shown = json.loads(agentmgr(cli_env, "-o", "json", "command", "show", command["id"]).stdout)

    assert queued.returncode == 0, queued.stderr
    assert command["state"] == "queued"
    assert command["timeout_seconds"] == 30
    assert command["reason"] == "check"
    assert [item["id"] for item in listing["items"]] == [command["id"]]
    assert cancelled["state"] == "cancelled"
    assert again.returncode == 11
    assert "allowed states" in again.stderr
    assert shown["state"] == "cancelled"


def test_command_for_unknown_agent(cli_env):
    result = agentmgr(cli_env, "command", "run", "00000000-0000-0000-0000-000000000000", "true")

    assert result.returncode == 10
    assert "not found" in result.stderr


def test_audit_list_filters(cli_env):
    created = json.loads(agentmgr(cli_env, "-o", "json", "token", "create").stdout)
    agentmgr(cli_env, "token", "revoke", created["id"])
    agentmgr(cli_env, "apikey", "create", "bot")

    everything = json.loads(agentmgr(cli_env, "-o", "json", "audit", "list").stdout)
    revokes = json.loads(agentmgr(cli_env, "-o", "json", "audit", "list", "--action", "token.revoke").stdout)
    by_target = json.loads(agentmgr(cli_env, "-o", "json", "audit", "list", "--target", created["id"]).stdout)

    assert [item["action"] for item in everything["items"]] == ["token.create", "token.revoke", "apikey.create"]
    assert all(item["actor"].startswith("cli:") for item in everything["items"])
    assert all(item["outcome"] == "success" for item in everything["items"])
    assert [item["action"] for item in revokes["items"]] == ["token.revoke"]
    assert [item["action"] for item in by_target["items"]] == ["token.create", "token.revoke"]


def test_failed_actions_are_audited(cli_env):
    failed = agentmgr(cli_env, "token", "revoke", "00000000-0000-0000-0000-000000000000")
    entries = json.loads(agentmgr(cli_env, "-o", "json", "audit", "list").stdout)["items"]

    assert failed.returncode == 10
    assert [(entry["action"], entry["outcome"]) for entry in entries] == [("token.revoke", "failure")]
    assert entries[0]["target_id"] == "00000000-0000-0000-0000-000000000000"
    assert "not found" in entries[0]["details"]["error"]
