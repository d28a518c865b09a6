"""The audit log against a real PostgreSQL: entries per action, filters, append-only table."""

from __future__ import annotations

import datetime

import psycopg2
import pytest

from services.core.fleet import agents, apitokens, audit, commands, enrollment
from services.core.fleet.agents import HostFacts
from services.core.fleet.listing import AuditFilters, PageRequest
from services.core.fleet.models import ApiRole
from tests.fleet_support import count_rows, database, fleet_template, fleet_url  # noqa: F401 - fixtures

UTC = datetime.timezone.utc


def run_every_audited_action(database) -> None:
    with database.transaction() as conn:
        token, secret = enrollment.create_token(conn, created_by="alice")
    with database.transaction() as conn:
        agent, _ = agents.register_agent(
            conn, token_secret=secret, facts=HostFacts(hostname="web-01", machine_id="machine-0001"), actor_peer="p1"
        )
    with database.transaction() as conn:
        agents.register_agent(
            conn, token_secret=secret, facts=HostFacts(hostname="web-01", machine_id="machine-0001"),
            replace=True, actor_peer="p2",
        )
        enrollment.revoke_token(conn, token.id, actor="alice")
    with database.transaction() as conn:
        new_agent = agents.list_agents(
            conn, filters=agents.AgentFilters(), page=PageRequest(),
            now=datetime.datetime.now(UTC), thresholds=agents.LivenessThresholds(90),
        ).items[0]
        assert agents.find_replaced_agent(conn, new_agent.id).id == agent.id
        command = commands.create_command(
            conn, agent_id=new_agent.id, command_line="id", timeout_seconds=5, expires_in_seconds=60,
            reason="check", requested_by="bob",
        )
        commands.cancel_command(conn, command.id, actor="bob")
        api_token, _ = apitokens.create_api_token(conn, name="ci", role=ApiRole.VIEWER, created_by="root")
        apitokens.revoke_api_token(conn, api_token.id, actor="root")
        agents.revoke_agent(conn, new_agent.id, actor="carol")


def test_every_action_is_audited(database):
    run_every_audited_action(database)

    with database.transaction() as conn:
        page = audit.list_entries(conn, filters=AuditFilters(), page=PageRequest())

    actions = [entry.action for entry in page.items]
    assert actions == [
        "token.create",
        "agent.register",
        "agent.replace",
        "agent.register",
        "token.revoke",
        "command.create",
        "command.cancel",
        "apikey.create",
        "apikey.revoke",
        "agent.delete",
    ]
    assert all(entry.outcome == "success" for entry in page.items)
    assert page.items[1].actor == "agent:p1"
    assert page.items[-1].actor == "carol"
    assert page.items[-1].at.tzinfo is not None


def test_list_entries_filters(database):
    run_every_audited_action(database)

    with database.transaction() as conn:
        by_bob = audit.list_entries(conn, filters=AuditFilters(actor="bob"), page=PageRequest())
        registers = audit.list_entries(conn, filters=AuditFilters(action="agent.register"), page=PageRequest())
        future = audit.list_entries(
            conn, filters=AuditFilters(since=datetime.datetime.now(UTC) + datetime.timedelta(hours=1)),
            page=PageRequest(),
        )
        target = registers.items[0].target_id
        by_target = audit.list_entries(conn, filters=AuditFilters(target_id=target), page=PageRequest())
        sql_looking = audit.list_entries(conn, filters=AuditFilters(actor="' OR '1'='1"), page=PageRequest())
        newest = audit.list_entries(conn, filters=AuditFilters(), page=PageRequest(page_size=3, descending=True))

    assert [e.action for e in by_bob.items] == ["command.create", "command.cancel"]
    assert registers.total == 2
    assert future.items == []
    assert {e.action for e in by_target.items} == {"agent.register", "agent.replace"}
    assert sql_looking.items == []
    assert [e.action for e in newest.items] == ["agent.delete", "apikey.revoke", "apikey.create"]
    assert newest.next_page_token != ""


def test_record_keeps_details(database):
    with database.transaction() as conn:
        audit.record(conn, actor="root", action="rollout.pause", target_type="rollout", target_id="r1",
                     outcome="denied", details={"why": "viewer"})
        entries = audit.list_entries(conn, filters=AuditFilters(), page=PageRequest()).items

    assert entries[0].outcome == "denied"
    assert entries[0].details == {"why": "viewer"}
    with pytest.raises(ValueError):
        with database.transaction() as conn:
            audit.record(conn, actor="root", action="x", outcome="maybe")


def test_audit_entry_gone_with_rolled_back_action(database):
    with pytest.raises(RuntimeError):
        with database.transaction() as conn:
            enrollment.create_token(conn, created_by="alice")
            raise RuntimeError("caller fails after the action")

    assert count_rows(database, "audit_log") == 0


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log", "TRUNCATE audit_log"],
)
def test_audit_log_rejects_changes(database, statement):
    with database.transaction() as conn:
        audit.record(conn, actor="root", action="token.create")

    with pytest.raises(psycopg2.errors.RaiseException) as raised:
        with database.transaction() as conn, conn.cursor() as cursor:
            cursor.execute(statement)

    assert "append-only" in str(raised.value)
    with database.transaction() as conn:
        entries = audit.list_entries(conn, filters=AuditFilters(), page=PageRequest()).items
    assert [e.actor for e in entries] == ["root"]
