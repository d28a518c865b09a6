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
