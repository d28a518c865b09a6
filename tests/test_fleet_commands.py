"""Commands against a real PostgreSQL: creation, delivery states, results, cancellation, expiry."""

from __future__ import annotations

import dataclasses
import datetime
import uuid

import pytest

from services.core.errors import FailedPrecondition, InvalidArgument, InvalidState, NotFound
from services.core.fleet import agents, commands, enrollment
from services.core.fleet.agents import HostFacts
from services.core.fleet.models import FINAL_STATES, PENDING_STATES, CommandState
from tests.fleet_support import count_rows, database, fleet_template, fleet_url  # noqa: F401 - fixtures

UTC = datetime.timezone.utc
FACTS = HostFacts(hostname="db-01", machine_id="machine-db-0001")


@pytest.fixture
def agent_id(database) -> uuid.UUID:
    with database.transaction() as conn:
        _, secret = enrollment.create_token(conn, created_by="alice")
    with database.transaction() as conn:
        agent, _ = agents.register_agent(conn, token_secret=secret, facts=FACTS)
    return agent.id


def other_agent(database) -> uuid.UUID:
    with database.transaction() as conn:
        _, secret = enrollment.create_token(conn, created_by="alice")
        agent, _ = agents.register_agent(
            conn, token_secret=secret, facts=dataclasses.replace(FACTS, machine_id="machine-db-0002")
        )
    return agent.id


def create(database, agent_id, **fields):
    values = dict(command_line="uname -a", timeout_seconds=30, expires_in_seconds=600, reason="inventory",
                  requested_by="alice")
    values.update(fields)
    with database.transaction() as conn:
        return commands.create_command(conn, agent_id=agent_id, **values)


def result(database, command_id, agent_id, **fields):
    values = dict(exit_code=0, stdout=b"Linux\n", stderr=b"", stdout_truncated=False, stderr_truncated=False,
                  duration_ms=12, timed_out=False)
    values.update(fields)
    with database.transaction() as conn:
        return commands.store_result(conn, command_id, agent_id, **values)


def get(database, command_id):
    with database.transaction() as conn:
        return commands.get_command(conn, command_id)


def test_state_groups_cover_every_state():
    assert PENDING_STATES | FINAL_STATES == set(CommandState)
    assert not PENDING_STATES & FINAL_STATES
    assert CommandState.PENDING_STATES == PENDING_STATES
    assert CommandState.FINAL_STATES == FINAL_STATES


def test_create_queues_and_audits(database, agent_id):
    command = create(database, agent_id)

    assert command.state is CommandState.QUEUED
    assert command.agent_id == agent_id
    assert command.expires_at - command.created_at == datetime.timedelta(seconds=600)
    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT actor, target_id FROM audit_log WHERE action = 'command.create'")
        assert cursor.fetchall() == [("alice", str(command.id))]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"command_line": ""}, "command_line"),
        ({"command_line": "   "}, "command_line"),
        ({"command_line": "x" * 8193}, "command_line"),
        ({"command_line": "echo \x00"}, "command_line"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": 86401}, "timeout_seconds"),
        ({"expires_in_seconds": 0}, "expires_in_seconds"),
        ({"expires_in_seconds": 30 * 86400 + 1}, "expires_in_seconds"),
        ({"reason": "a\nb"}, "reason"),
        ({"requested_by": ""}, "requested_by"),
    ],
)
def test_create_rejects_invalid_field(database, agent_id, fields, field):
    before = count_rows(database, "commands")

    with pytest.raises(InvalidArgument) as raised:
        create(database, agent_id, **fields)

    assert raised.value.field == field
    assert count_rows(database, "commands") == before


def test_create_accepts_limits(database, agent_id):
    command = create(database, agent_id, command_line="x" * 8192, timeout_seconds=86400,
                     expires_in_seconds=30 * 86400)

    assert command.timeout_seconds == 86400


def test_create_for_unknown_or_revoked_agent(database, agent_id):
    with pytest.raises(NotFound):
        create(database, uuid.uuid4())
    with database.transaction() as conn:
        agents.revoke_agent(conn, agent_id, actor="carol")

    with pytest.raises(FailedPrecondition) as raised:
        create(database, agent_id)

    assert "revoked" in str(raised.value)
    assert count_rows(database, "commands") == 0


def test_delivery_lifecycle(database, agent_id):
    command = create(database, agent_id)

    with database.transaction() as conn:
        assert [c.id for c in commands.pending_for_agent(conn, agent_id)] == [command.id]
        assert commands.mark_sent(conn, command.id, agent_id) is True
        assert commands.mark_sent(conn, command.id, agent_id) is False
    with database.transaction() as conn:
        # A sent command is delivered again after a reconnect.
        assert [c.state for c in commands.pending_for_agent(conn, agent_id)] == [CommandState.SENT]
        assert commands.mark_running(conn, command.id, agent_id) is True
        assert commands.mark_running(conn, command.id, agent_id) is False
        assert commands.pending_for_agent(conn, agent_id) == []

    assert result(database, command.id, agent_id) is True
    done = get(database, command.id)
    assert done.state is CommandState.SUCCEEDED
    assert done.stdout == b"Linux\n"
    assert done.stderr == b""
    assert done.exit_code == 0
    assert done.duration_ms == 12
    assert done.sent_at is not None
    assert done.started_at is not None
    assert done.finished_at is not None


def test_mark_sent_other_agent_is_false(database, agent_id):
    command = create(database, agent_id)
    stranger = other_agent(database)

    with database.transaction() as conn:
        assert commands.mark_sent(conn, command.id, stranger) is False
        assert commands.mark_running(conn, command.id, stranger) is False

    assert get(database, command.id).state is CommandState.QUEUED


def test_pending_oldest_first(database, agent_id):
    first = create(database, agent_id, command_line="echo 1")
    second = create(database, agent_id, command_line="echo 2")

    with database.transaction() as conn:
        pending = commands.pending_for_agent(conn, agent_id)

    assert [c.id for c in pending] == [first.id, second.id]


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"exit_code": 0}, CommandState.SUCCEEDED),
        ({"exit_code": 2}, CommandState.FAILED),
        ({"exit_code": None, "error": "executable not found"}, CommandState.FAILED),
        ({"exit_code": 0, "error": "output pipe broke"}, CommandState.FAILED),
        ({"exit_code": None, "timed_out": True}, CommandState.TIMED_OUT),
    ],
)
def test_result_sets_state(database, agent_id, fields, state):
    command = create(database, agent_id)

    assert result(database, command.id, agent_id, **fields) is True

    assert get(database, command.id).state is state


def test_duplicate_result_is_ignored(database, agent_id):
    command = create(database, agent_id)
    result(database, command.id, agent_id, stdout=b"first")

    assert result(database, command.id, agent_id, exit_code=1, stdout=b"second") is False

    stored = get(database, command.id)
    assert stored.state is CommandState.SUCCEEDED
    assert stored.stdout == b"first"


def test_result_for_other_agent_not_found(database, agent_id):
    command = create(database, agent_id)
    stranger = other_agent(database)

    with pytest.raises(NotFound):
        result(database, command.id, stranger)
    with pytest.raises(NotFound):
        result(database, uuid.uuid4(), agent_id)

    assert get(database, command.id).state is CommandState.QUEUED


def test_result_output_truncated(database, agent_id):
    command = create(database, agent_id)
    stdout = bytes(range(256)) * 8

    with database.transaction() as conn:
        commands.store_result(
            conn, command.id, agent_id, exit_code=0, stdout=stdout, stderr=b"e" * 100, stdout_truncated=False,
            stderr_truncated=True, duration_ms=1, timed_out=False, max_output_bytes=1000,
        )

    stored = get(database, command.id)
    assert stored.stdout == stdout[:1000]
    assert stored.stdout_truncated is True
    assert stored.stderr == b"e" * 100
    assert stored.stderr_truncated is True


@pytest.mark.parametrize(("fields", "field"), [({"exit_code": 2**31}, "exit_code"), ({"duration_ms": -1}, "duration_ms")])
def test_result_rejects_out_of_range(database, agent_id, fields, field):
    command = create(database, agent_id)

    with pytest.raises(InvalidArgument) as raised:
        result(database, command.id, agent_id, **fields)

    assert raised.value.field == field
    assert get(database, command.id).state is CommandState.QUEUED


@pytest.mark.parametrize("delivered", [None, "sent", "running"])
def test_cancel_pending(database, agent_id, delivered):
    command = create(database, agent_id)
    with database.transaction() as conn:
        if delivered:
            commands.mark_sent(conn, command.id, agent_id)
        if delivered == "running":
            commands.mark_running(conn, command.id, agent_id)

    with database.transaction() as conn:
        cancelled = commands.cancel_command(conn, command.id, actor="bob")

    assert cancelled.state is CommandState.CANCELLED
    assert cancelled.finished_at is not None
    assert result(database, command.id, agent_id) is False
    assert get(database, command.id).state is CommandState.CANCELLED
    with database.transaction() as conn:
        assert commands.pending_for_agent(conn, agent_id) == []
        with conn.cursor() as cursor:
            cursor.execute("SELECT actor, target_id FROM audit_log WHERE action = 'command.cancel'")
            assert cursor.fetchall() == [("bob", str(command.id))]


def test_cancel_finished_names_states(database, agent_id):
    command = create(database, agent_id)
    result(database, command.id, agent_id)

    with pytest.raises(InvalidState) as raised:
        with database.transaction() as conn:
            commands.cancel_command(conn, command.id, actor="bob")

    assert raised.value.state == "succeeded"
    assert raised.value.allowed == ("queued", "sent", "running")
    assert str(command.id) in str(raised.value)
    assert raised.value.grpc_code_name == "FAILED_PRECONDITION"


def test_cancel_unknown_command(database):
    with pytest.raises(NotFound):
        with database.transaction() as conn:
            commands.cancel_command(conn, uuid.uuid4(), actor="bob")


def test_expired_command_never_pending(database, agent_id):
    queued = create(database, agent_id, expires_in_seconds=60)
    sent = create(database, agent_id, expires_in_seconds=60)
    running = create(database, agent_id, expires_in_seconds=60)
    later = create(database, agent_id, expires_in_seconds=3600)
    with database.transaction() as conn:
        commands.mark_sent(conn, sent.id, agent_id)
        commands.mark_running(conn, running.id, agent_id)
    in_two_minutes = datetime.datetime.now(UTC) + datetime.timedelta(minutes=2)

    with database.transaction() as conn:
        pending = commands.pending_for_agent(conn, agent_id, now=in_two_minutes)

    assert [c.id for c in pending] == [later.id]
    assert get(database, queued.id).state is CommandState.EXPIRED
    assert get(database, sent.id).state is CommandState.EXPIRED
    assert get(database, running.id).state is CommandState.RUNNING
    with database.transaction() as conn:
        assert commands.mark_sent(conn, queued.id, agent_id) is False
    assert result(database, queued.id, agent_id) is False


def test_expire_due_returns_ids(database, agent_id):
    soon = create(database, agent_id, expires_in_seconds=60)
    create(database, agent_id, expires_in_seconds=3600)
    in_two_minutes = datetime.datetime.now(UTC) + datetime.timedelta(minutes=2)

    with database.transaction() as conn:
        assert commands.expire_due(conn) == []
        expired = commands.expire_due(conn, now=in_two_minutes)
        again = commands.expire_due(conn, now=in_two_minutes)

    assert expired == [soon.id]
    assert again == []
