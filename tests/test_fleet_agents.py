"""Agents against a real PostgreSQL: registration, replacement, authentication, liveness, revocation."""

from __future__ import annotations

import dataclasses
import datetime
import threading
import uuid

import pytest

from services.core import credentials
from services.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    InvalidState,
    NotFound,
    Unauthenticated,
)
from services.core.fleet import agents, commands, enrollment
from services.core.fleet.agents import HostFacts, LivenessThresholds
from services.core.fleet.models import AgentStatus, CommandState
from tests.fleet_support import count_rows, database, fleet_template, fleet_url  # noqa: F401 - fixtures
from tests.support import wait_until

UTC = datetime.timezone.utc
THRESHOLDS = LivenessThresholds(offline_after_seconds=90)
TABLES = ("agents", "enrollment_tokens", "audit_log", "commands")

FACTS = HostFacts(
    hostname="Web-01.Example.com",
    machine_id="4c4c4544-0042-3510-8052-b7c04f4e3732",
    os_name="Debian GNU/Linux",
    os_version="12",
    architecture="x86_64",
    agent_version="1.4.0",
    addresses=("10.0.0.5", "2001:db8::0:1"),
    labels={"role": "web", "site": "agent-side"},
)


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def new_token(database, **fields) -> str:
    with database.transaction() as conn:
        _, secret = enrollment.create_token(conn, created_by="alice", **fields)
    return secret


def register(database, secret, facts=FACTS, **fields):
    with database.transaction() as conn:
        return agents.register_agent(conn, token_secret=secret, facts=facts, actor_peer="ipv4:127.0.0.1:5000", **fields)


def snapshot(database) -> dict[str, int]:
    return {table: count_rows(database, table) for table in TABLES}


def token_uses(database) -> list[int]:
    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT use_count FROM enrollment_tokens ORDER BY created_at")
        return [row[0] for row in cursor.fetchall()]


def test_register_stores_only_key_hash(database):
    secret = new_token(database, group="lab", labels={"site": "paris"})

    agent, key = register(database, secret)

    assert key.startswith(credentials.AGENT_KEY_PREFIX)
    assert len(key) >= len(credentials.AGENT_KEY_PREFIX) + 43
    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT key_hash FROM agents WHERE id = %s", (agent.id,))
        assert bytes(cursor.fetchone()[0]) == credentials.hash_secret(key)
        cursor.execute("SELECT count(*) FROM agents WHERE row_to_json(agents)::text LIKE %s", (f"%{key[6:]}%",))
        assert cursor.fetchone()[0] == 0


def test_register_normalises_and_merges(database):
    secret = new_token(database, group="lab", labels={"site": "paris"})

    agent, _ = register(database, secret)

    assert agent.hostname == "web-01.example.com"
    assert agent.addresses == ("10.0.0.5", "2001:db8::1")
    assert agent.group == "lab"
    assert agent.labels == {"role": "web", "site": "paris"}
    assert agent.first_connected_at is None
    assert token_uses(database) == [1]


def test_register_writes_audit_entry(database):
    secret = new_token(database)

    agent, _ = register(database, secret)

    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT actor, action, target_id FROM audit_log WHERE action LIKE 'agent.%'")
        assert cursor.fetchall() == [("agent:ipv4:127.0.0.1:5000", "agent.register", str(agent.id))]


BAD_FACTS = [
    ("hostname", ""),
    ("hostname", "a" * 64 + ".example.com"),
    ("hostname", ".".join(["abcdefghij"] * 25)),
    ("hostname", "-web.example.com"),
    ("hostname", "web-.example.com"),
    ("hostname", "web_01"),
    ("hostname", "web..example.com"),
    ("hostname", "web 01"),
    ("hostname", "web'; DROP TABLE agents; --"),
    ("machine_id", "short"),
    ("machine_id", "m" * 129),
    ("machine_id", "machine id with spaces"),
    ("machine_id", "machine/id/0001"),
    ("os_name", "x" * 65),
    ("os_version", "12\n"),
    ("architecture", "x86\x1b[31m"),
    ("agent_version", "1.0\x00"),
    ("addresses", ("10.0.0.1", "not-an-ip")),
    ("addresses", ("999.1.1.1",)),
    ("addresses", tuple(f"10.0.0.{n}" for n in range(33))),
    ("labels", {f"k{n}": "v" for n in range(33)}),
    ("labels", {"Upper": "v"}),
    ("labels", {"": "v"}),
    ("labels", {"k" * 64: "v"}),
    ("labels", {"ok": "v" * 256}),
    ("labels", {"ok": "tab\there"}),
]


@pytest.mark.parametrize(("field", "value"), BAD_FACTS)
def test_register_rejects_bad_fact(database, field, value):
    secret = new_token(database)
    before = snapshot(database)
    facts = dataclasses.replace(FACTS, **{field: value})

    with pytest.raises(InvalidArgument) as raised:
        register(database, secret, facts)

    assert raised.value.field.split("[")[0] == field
    assert field in str(raised.value)
    assert snapshot(database) == before
    assert token_uses(database) == [0]


def test_validate_host_facts_accepts_edges():
    facts = dataclasses.replace(
        FACTS,
        hostname=".".join(["a" * 63] * 3) + "." + "b" * 61,
        machine_id="m" * 8,
        addresses=tuple(f"10.0.0.{n}" for n in range(32)),
        labels={f"k{n}": "v" * 255 for n in range(32)},
        os_name="x" * 64,
    )

    checked = agents.validate_host_facts(facts)

    assert len(checked.hostname) == 253
    assert len(checked.addresses) == 32


def make_inactive(database, secret: str, state: str) -> None:
    """Bring the only enrollment token into ``state``: exhausted, expired or revoked."""
    if state == "exhausted":
        register(database, secret, dataclasses.replace(FACTS, machine_id="other-machine-01"))
        return
    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT id FROM enrollment_tokens")
        token_id = cursor.fetchone()[0]
        if state == "expired":
            # expires_at must be in the future at creation, so it is moved into the past here.
            cursor.execute("UPDATE enrollment_tokens SET expires_at = now() - interval '1 second'")
        else:
            enrollment.revoke_token(conn, token_id, actor="carol")


@pytest.mark.parametrize("state", ["exhausted", "expired", "revoked"])
def test_register_rejects_inactive_token(database, state):
    secret = new_token(database, max_uses=1 if state == "exhausted" else None)
    make_inactive(database, secret, state)
    before = snapshot(database)
    uses = token_uses(database)

    with pytest.raises(FailedPrecondition) as raised:
        register(database, secret)

    assert state in str(raised.value)
    assert raised.value.grpc_code_name == "FAILED_PRECONDITION"
    assert snapshot(database) == before
    assert token_uses(database) == uses


def test_register_rejects_unknown_token(database):
    new_token(database)
    before = snapshot(database)

    with pytest.raises(Unauthenticated):
        register(database, credentials.new_secret(credentials.ENROLLMENT_TOKEN_PREFIX))

    assert snapshot(database) == before


def test_register_same_machine_rejected(database):
    secret = new_token(database)
    first, first_key = register(database, secret)
    before = snapshot(database)

    with pytest.raises(AlreadyExists) as raised:
        register(database, secret)

    assert "replace" in str(raised.value)
    assert first_key not in str(raised.value)
    assert snapshot(database) == before
    assert token_uses(database) == [1]
    with database.transaction() as conn:
        assert agents.authenticate_agent(conn, first.id, first_key).id == first.id


def test_register_replace_revokes_old_agent(database):
    secret = new_token(database)
    old, old_key = register(database, secret)
    with database.transaction() as conn:
        pending = commands.create_command(
            conn, agent_id=old.id, command_line="uptime", timeout_seconds=5, expires_in_seconds=60,
            reason="check", requested_by="alice",
        )

    new, new_key = register(database, secret, replace=True)

    assert new.id != old.id
    assert new_key != old_key
    with database.transaction() as conn:
        old_now = agents.get_agent(conn, old.id)
        assert agents.find_replaced_agent(conn, new.id).id == old.id
        assert agents.find_replaced_agent(conn, old.id) is None
        assert commands.get_command(conn, pending.id).state is CommandState.CANCELLED
        with pytest.raises(Unauthenticated):
            agents.authenticate_agent(conn, old.id, old_key)
        assert agents.authenticate_agent(conn, new.id, new_key).id == new.id
        with conn.cursor() as cursor:
            cursor.execute("SELECT action, target_id FROM audit_log WHERE action LIKE 'agent.%' ORDER BY id")
            entries = cursor.fetchall()
    assert old_now.revoked_reason == "replaced"
    assert old_now.replaced_by == new.id
    assert ("agent.replace", str(old.id)) in entries
    assert entries[-1] == ("agent.register", str(new.id))


@pytest.mark.parametrize("case", ["wrong key", "unknown id", "revoked"])
def test_authenticate_rejects(database, case):
    agent, key = register(database, new_token(database))
    agent_id = agent.id
    if case == "wrong key":
        key = credentials.new_secret(credentials.AGENT_KEY_PREFIX)
    elif case == "unknown id":
        agent_id = uuid.uuid4()
    else:
        with database.transaction() as conn:
            agents.revoke_agent(conn, agent.id, actor="carol")

    with pytest.raises(Unauthenticated) as raised:
        with database.transaction() as conn:
            agents.authenticate_agent(conn, agent_id, key)

    assert str(raised.value) == agents.INVALID_CREDENTIALS_MESSAGE


def test_revoke_cancels_pending_commands(database):
    agent, _ = register(database, new_token(database))
    with database.transaction() as conn:
        queued = commands.create_command(
            conn, agent_id=agent.id, command_line="id", timeout_seconds=5, expires_in_seconds=60,
            reason="", requested_by="alice",
        )
        done = commands.create_command(
            conn, agent_id=agent.id, command_line="id", timeout_seconds=5, expires_in_seconds=60,
            reason="", requested_by="alice",
        )
        commands.store_result(
            conn, done.id, agent.id, exit_code=0, stdout=b"", stderr=b"", stdout_truncated=False,
            stderr_truncated=False, duration_ms=1, timed_out=False,
        )

    with database.transaction() as conn:
        revoked, cancelled = agents.revoke_agent(conn, agent.id, actor="carol")

    assert cancelled == [queued.id]
    assert revoked.revoked_reason == "deleted"
    with database.transaction() as conn:
        assert commands.get_command(conn, done.id).state is CommandState.SUCCEEDED
        with conn.cursor() as cursor:
            cursor.execute("SELECT actor, target_id FROM audit_log WHERE action = 'agent.delete'")
            assert cursor.fetchall() == [("carol", str(agent.id))]
        with pytest.raises(InvalidState) as raised:
            agents.revoke_agent(conn, agent.id, actor="carol")
    assert raised.value.state == "revoked"


def test_revoke_unknown_agent(database):
    with pytest.raises(NotFound):
        with database.transaction() as conn:
            agents.revoke_agent(conn, uuid.uuid4(), actor="carol")


def test_record_seen_keeps_latest(database):
    agent, _ = register(database, new_token(database))
    revoked, _ = register(database, new_token(database), dataclasses.replace(FACTS, machine_id="machine-revoked-1"))
    with database.transaction() as conn:
        agents.revoke_agent(conn, revoked.id, actor="carol")
    early = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    late = early + datetime.timedelta(minutes=5)

    with database.transaction() as conn:
        updated = agents.record_seen(conn, {agent.id: late, revoked.id: late, uuid.uuid4(): late})
    with database.transaction() as conn:
        agents.record_seen(conn, {agent.id: early})
        seen = agents.get_agent(conn, agent.id)
        assert agents.get_agent(conn, revoked.id).last_seen_at is None
        assert agents.record_seen(conn, {}) == 0

    assert updated == 1
    assert seen.last_seen_at == late
    assert seen.first_connected_at == late


def row_version(database, agent_id: uuid.UUID) -> str:
    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT xmin::text FROM agents WHERE id = %s", (agent_id,))
        return cursor.fetchone()[0]


def test_reported_facts_written_only_when_changed(database):
    agent, _ = register(database, new_token(database))
    enrolled = row_version(database, agent.id)

    with database.transaction() as conn:
        agents.update_reported_facts(conn, agent.id, FACTS)
    unchanged = row_version(database, agent.id)
    with database.transaction() as conn:
        agents.update_reported_facts(conn, agent.id, dataclasses.replace(FACTS, agent_version="1.5.0", addresses=()))
        stored = agents.get_agent(conn, agent.id)

    assert unchanged == enrolled
    assert row_version(database, agent.id) != enrolled
    assert stored.agent_version == "1.5.0"
    assert tuple(stored.addresses) == ()


def test_derive_status():
    base = agents.Agent(
        id=uuid.uuid4(), machine_id="m" * 8, hostname="h", os_name="", os_version="", architecture="",
        agent_version="", addresses=(), labels={}, group="", created_at=now(), first_connected_at=None,
        last_seen_at=None, revoked_at=None, revoked_reason=None,
    )
    at = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    recent = at - datetime.timedelta(seconds=90)
    old = at - datetime.timedelta(seconds=91)

    def status(agent, **fields):
        return agents.derive_status(agent, now=at, thresholds=THRESHOLDS, **fields)

    assert status(base) is AgentStatus.NEVER_CONNECTED
    assert status(dataclasses.replace(base, last_seen_at=recent)) is AgentStatus.ONLINE
    assert status(dataclasses.replace(base, last_seen_at=old)) is AgentStatus.OFFLINE
    assert status(dataclasses.replace(base, last_seen_at=old), live_seen_at=recent) is AgentStatus.ONLINE
    assert status(base, live_seen_at=old) is AgentStatus.OFFLINE
    assert status(dataclasses.replace(base, last_seen_at=recent, revoked_at=old)) is AgentStatus.REVOKED


def run_in_threads(count: int, work) -> list[object]:
    """Run ``work(index)`` in ``count`` threads at once; return each result or raised error."""
    barrier = threading.Barrier(count)
    outcomes: list[object] = [None] * count

    def target(index: int) -> None:
        barrier.wait(timeout=30)
        try:
            outcomes[index] = work(index)
        except Exception as error:  # noqa: BLE001 - the test inspects every outcome
            outcomes[index] = error

    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_concurrent_registrations_respect_max_uses(database):
    secret = new_token(database, max_uses=3)

    outcomes = run_in_threads(
        8, lambda index: register(database, secret, dataclasses.replace(FACTS, machine_id=f"machine-race-{index:02d}"))
    )

    registered = [outcome for outcome in outcomes if isinstance(outcome, tuple)]
    rejected = [outcome for outcome in outcomes if isinstance(outcome, FailedPrecondition)]
    assert len(registered) == 3
    assert len(rejected) == 5
    assert token_uses(database) == [3]
    assert count_rows(database, "agents") == 3


def test_concurrent_same_machine_one_wins(database):
    secrets = [new_token(database) for _ in range(4)]

    outcomes = run_in_threads(4, lambda index: register(database, secrets[index]))

    registered = [outcome for outcome in outcomes if isinstance(outcome, tuple)]
    rejected = [outcome for outcome in outcomes if isinstance(outcome, AlreadyExists)]
    assert len(registered) == 1
    assert len(rejected) == 3
    assert count_rows(database, "agents") == 1
    assert sorted(token_uses(database)) == [0, 0, 0, 1]


def test_same_machine_insert_race_already_exists(database, fleet_url):
    first_secret, second_secret = new_token(database), new_token(database)
    outcome: list[object] = []

    def second_registration() -> None:
        try:
            outcome.append(register(database, second_secret))
        except Exception as error:  # noqa: BLE001 - inspected below
            outcome.append(error)

    with database.transaction() as conn:
        agents.register_agent(conn, token_secret=first_secret, facts=FACTS)
        # The second registration finds no committed agent for the machine, so it
        # reaches the INSERT and waits there on the unique index until this commits.
        thread = threading.Thread(target=second_registration)
        thread.start()
        wait_until(lambda: blocked_on_lock(fleet_url), timeout=30, what="the second INSERT to wait on a lock")
    thread.join(timeout=30)

    assert len(outcome) == 1
    assert isinstance(outcome[0], AlreadyExists)
    assert count_rows(database, "agents") == 1
    assert sorted(token_uses(database)) == [0, 1]


def blocked_on_lock(url: str) -> bool:
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO agents%%'"
            )
            return cursor.fetchone()[0] == 1
    finally:
        connection.close()
