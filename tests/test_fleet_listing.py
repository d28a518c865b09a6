"""Listings against a real PostgreSQL: pages, sort allow-lists, filters and SQL-looking values."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import uuid

import pytest

from services.core.errors import InvalidArgument
from services.core.fleet import agents, commands, enrollment
from services.core.fleet.agents import HostFacts, LivenessThresholds
from services.core.fleet.listing import MAX_PAGE_SIZE, AgentFilters, CommandFilters, PageRequest
from services.core.fleet.models import AgentStatus, CommandState
from tests.fleet_support import count_rows, database, fleet_template, fleet_url  # noqa: F401 - fixtures

UTC = datetime.timezone.utc
THRESHOLDS = LivenessThresholds(offline_after_seconds=90)
HOSTNAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"]

SQL_LOOKING = [
    "'; DROP TABLE agents; --",
    "x' OR '1'='1",
    "%",
    "_",
    "\\",
    "a%' OR hostname ILIKE '%",
    "$$; DELETE FROM agents; $$",
    "1; SELECT pg_sleep(5)",
]


@pytest.fixture
def fleet(database) -> dict[str, uuid.UUID]:
    """Seven agents named after HOSTNAMES; bravo is revoked, charlie online, delta offline."""
    ids: dict[str, uuid.UUID] = {}
    with database.transaction() as conn:
        _, lab = enrollment.create_token(conn, created_by="alice", group="lab", labels={"env": "test"})
        _, prod = enrollment.create_token(conn, created_by="alice", group="prod")
    for index, hostname in enumerate(HOSTNAMES):
        with database.transaction() as conn:
            agent, _ = agents.register_agent(
                conn,
                token_secret=lab if index % 2 == 0 else prod,
                facts=HostFacts(hostname=hostname, machine_id=f"machine-{index:04d}", labels={"n": str(index)}),
            )
        ids[hostname] = agent.id
    now = datetime.datetime.now(UTC)
    with database.transaction() as conn:
        agents.record_seen(conn, {ids["charlie"]: now, ids["delta"]: now - datetime.timedelta(minutes=10)})
        agents.revoke_agent(conn, ids["bravo"], actor="carol")
    return ids


def list_agents(database, filters=None, page=None, now=None):
    with database.transaction() as conn:
        return agents.list_agents(
            conn,
            filters=filters or AgentFilters(),
            page=page or PageRequest(),
            now=now or datetime.datetime.now(UTC),
            thresholds=THRESHOLDS,
        )


def hostnames(page) -> list[str]:
    return [agent.hostname for agent in page.items]


def test_default_hides_revoked(database, fleet):
    page = list_agents(database)

    assert hostnames(page) == ["alpha", "charlie", "delta", "echo", "foxtrot", "golf"]
    assert page.total == 6
    assert page.next_page_token == ""


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (AgentStatus.ONLINE, ["charlie"]),
        (AgentStatus.OFFLINE, ["delta"]),
        (AgentStatus.NEVER_CONNECTED, ["alpha", "echo", "foxtrot", "golf"]),
        (AgentStatus.REVOKED, ["bravo"]),
    ],
)
def test_status_filter(database, fleet, status, expected):
    assert hostnames(list_agents(database, AgentFilters(status=status))) == expected


def test_status_filter_moves_with_now(database, fleet):
    later = datetime.datetime.now(UTC) + datetime.timedelta(seconds=200)

    online = list_agents(database, AgentFilters(status=AgentStatus.ONLINE), now=later)
    offline = list_agents(database, AgentFilters(status=AgentStatus.OFFLINE), now=later)

    assert hostnames(online) == []
    assert hostnames(offline) == ["charlie", "delta"]


def test_group_label_hostname_filters(database, fleet):
    assert hostnames(list_agents(database, AgentFilters(group="prod"))) == ["delta", "foxtrot"]
    assert hostnames(list_agents(database, AgentFilters(label={"env": "test"}))) == ["alpha", "charlie", "echo", "golf"]
    assert hostnames(list_agents(database, AgentFilters(label={"env": "test", "n": "4"}))) == ["echo"]
    assert hostnames(list_agents(database, AgentFilters(hostname_contains="HA"))) == ["alpha", "charlie"]
    assert hostnames(list_agents(database, AgentFilters(include_revoked=True, hostname_contains="v"))) == ["bravo"]


@pytest.mark.parametrize("value", SQL_LOOKING)
def test_sql_looking_filters_match_nothing(database, fleet, value):
    before = count_rows(database, "agents")

    by_hostname = list_agents(database, AgentFilters(hostname_contains=value))
    by_group = list_agents(database, AgentFilters(group=value))
    by_label = list_agents(database, AgentFilters(label={"env": value}))
    with database.transaction() as conn:
        by_requester = commands.list_commands(conn, filters=CommandFilters(requested_by=value), page=PageRequest())

    assert by_hostname.items == []
    assert by_hostname.total == 0
    assert by_label.items == []
    assert by_requester.items == []
    assert by_group.items == []
    assert count_rows(database, "agents") == before


def test_overlong_filter_rejected(database, fleet):
    with pytest.raises(InvalidArgument) as raised:
        list_agents(database, AgentFilters(group="g" * 64))

    assert raised.value.field == "group"


def test_pages_cover_all_rows_once(database, fleet):
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = list_agents(database, AgentFilters(include_revoked=True), PageRequest(page_size=3, page_token=token))
        assert len(page.items) <= 3
        assert page.total == 7
        seen += hostnames(page)
        token = page.next_page_token
        if not token:
            break

    assert seen == sorted(HOSTNAMES)


def test_pages_descending_by_nullable_column(database, fleet):
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = list_agents(
            database, page=PageRequest(page_size=2, page_token=token, sort="last_seen_at", descending=True)
        )
        seen += hostnames(page)
        token = page.next_page_token
        if not token:
            break

    assert seen[:2] == ["charlie", "delta"]
    assert sorted(seen) == ["alpha", "charlie", "delta", "echo", "foxtrot", "golf"]


def test_page_stable_when_rows_are_added(database, fleet):
    first = list_agents(database, page=PageRequest(page_size=2))
    with database.transaction() as conn:
        _, secret = enrollment.create_token(conn, created_by="alice")
        agents.register_agent(conn, token_secret=secret, facts=HostFacts(hostname="aardvark", machine_id="machine-9999"))

    second = list_agents(database, page=PageRequest(page_size=2, page_token=first.next_page_token))

    assert hostnames(first) == ["alpha", "charlie"]
    assert hostnames(second) == ["delta", "echo"]


@pytest.mark.parametrize("page_size", [-1, MAX_PAGE_SIZE + 1])
def test_page_size_limits(database, fleet, page_size):
    with pytest.raises(InvalidArgument) as raised:
        list_agents(database, page=PageRequest(page_size=page_size))

    assert raised.value.field == "page_size"
    assert str(MAX_PAGE_SIZE) in str(raised.value)


def test_page_size_max_and_default(database, fleet):
    assert len(list_agents(database, page=PageRequest(page_size=MAX_PAGE_SIZE)).items) == 6
    assert len(list_agents(database, page=PageRequest(page_size=0)).items) == 6


@pytest.mark.parametrize("sort", ["key_hash", "hostname; DROP TABLE agents", "id", "HOSTNAME"])
def test_sort_outside_allow_list(database, fleet, sort):
    with pytest.raises(InvalidArgument) as raised:
        list_agents(database, page=PageRequest(sort=sort))

    assert raised.value.field == "sort"
    assert "hostname" in str(raised.value)
    assert "last_seen_at" in str(raised.value)
    assert count_rows(database, "agents") == 7


@pytest.mark.parametrize("sort", ["hostname", "created_at", "last_seen_at", "group", "machine_id", "os_name", "agent_version"])
def test_sort_allow_list_works(database, fleet, sort):
    ascending = list_agents(database, page=PageRequest(sort=sort))
    descending = list_agents(database, page=PageRequest(sort=sort, descending=True))

    assert len(ascending.items) == 6
    assert [a.id for a in descending.items] == [a.id for a in reversed(ascending.items)]


def forged(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        "not base64 !",
        base64.urlsafe_b64encode(b"not json").decode(),
        forged([1, 2]),
        forged({"v": 99, "s": "hostname", "d": False, "k": "a", "i": str(uuid.uuid4())}),
        forged({"v": 1, "s": "key_hash", "d": False, "k": "a", "i": str(uuid.uuid4())}),
        forged({"v": 1, "s": "hostname", "d": False, "k": "a", "i": "1; DROP TABLE agents"}),
        forged({"v": 1, "s": "created_at", "d": False, "k": "'; DROP TABLE agents; --", "i": str(uuid.uuid4())}),
        forged({"v": 1, "s": "hostname", "d": False, "k": 5, "i": str(uuid.uuid4())}),
        "A" * 5000,
    ],
)
def test_invalid_page_token_rejected(database, fleet, token):
    with pytest.raises(InvalidArgument) as raised:
        list_agents(database, page=PageRequest(page_token=token))

    assert raised.value.field == "page_token"
    assert count_rows(database, "agents") == 7


def test_page_token_bound_to_sort(database, fleet):
    first = list_agents(database, page=PageRequest(page_size=2))

    with pytest.raises(InvalidArgument) as raised:
        list_agents(database, page=PageRequest(page_size=2, page_token=first.next_page_token, sort="created_at"))

    assert raised.value.field == "page_token"


def test_command_filters_and_pages(database, fleet):
    charlie, delta = fleet["charlie"], fleet["delta"]
    created = []
    with database.transaction() as conn:
        for index in range(5):
            created.append(
                commands.create_command(
                    conn, agent_id=charlie if index < 3 else delta, command_line=f"echo {index}", timeout_seconds=5,
                    expires_in_seconds=60, reason="", requested_by="alice" if index % 2 == 0 else "bob",
                )
            )
        commands.cancel_command(conn, created[0].id, actor="alice")

    with database.transaction() as conn:
        for_charlie = commands.list_commands(conn, filters=CommandFilters(agent_id=charlie), page=PageRequest())
        by_bob = commands.list_commands(conn, filters=CommandFilters(requested_by="bob"), page=PageRequest())
        cancelled = commands.list_commands(
            conn, filters=CommandFilters(state=CommandState.CANCELLED), page=PageRequest()
        )
        first = commands.list_commands(conn, filters=CommandFilters(), page=PageRequest(page_size=4, descending=True))
        rest = commands.list_commands(
            conn, filters=CommandFilters(), page=PageRequest(page_size=4, descending=True, page_token=first.next_page_token)
        )
        with pytest.raises(InvalidArgument):
            commands.list_commands(conn, filters=CommandFilters(), page=PageRequest(sort="stdout"))

    assert for_charlie.total == 3
    assert [c.command_line for c in by_bob.items] == ["echo 1", "echo 3"]
    assert [c.id for c in cancelled.items] == [created[0].id]
    assert len(first.items) == 4
    assert rest.next_page_token == ""
    assert [c.id for c in first.items + rest.items] == [c.id for c in reversed(created)]


def test_token_listing_pages(database):
    with database.transaction() as conn:
        for index in range(5):
            enrollment.create_token(conn, created_by="alice", description=f"token {index}")

    with database.transaction() as conn:
        first = enrollment.list_tokens(conn, page=PageRequest(page_size=2, sort="description"))
        second = enrollment.list_tokens(conn, page=PageRequest(page_size=2, sort="description", page_token=first.next_page_token))

    assert [t.description for t in first.items + second.items] == ["token 0", "token 1", "token 2", "token 3"]
    assert first.total == 5


def test_escape_like():
    from services.core.fleet.listing import escape_like

    assert escape_like("a%b_c\\d") == "a\\%b\\_c\\\\d"
    assert dataclasses.is_dataclass(PageRequest())
