"""Enrollment tokens against a real PostgreSQL: creation, listing, revocation and use."""

from __future__ import annotations

import datetime
import uuid

import pytest

from services.core import credentials
from services.core.errors import FailedPrecondition, InvalidArgument, InvalidState, NotFound, Unauthenticated
from services.core.fleet import enrollment
from services.core.fleet.listing import PageRequest
from services.core.fleet.models import EnrollmentToken, TokenState
from tests.fleet_support import count_rows, database, fleet_template, fleet_url  # noqa: F401 - fixtures

UTC = datetime.timezone.utc


def now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def create(database, **fields):
    with database.transaction() as conn:
        return enrollment.create_token(conn, created_by=fields.pop("created_by", "alice"), **fields)


def consume(database, secret, **fields):
    with database.transaction() as conn:
        return enrollment.consume_token(conn, secret, **fields)


def test_create_stores_only_hash(database):
    token, secret = create(database, description="lab machines", group="lab", labels={"site": "paris"}, max_uses=3)

    assert secret.startswith(credentials.ENROLLMENT_TOKEN_PREFIX)
    assert len(secret) >= len(credentials.ENROLLMENT_TOKEN_PREFIX) + 43
    assert token.prefix == secret[:12]
    assert token.group == "lab"
    assert token.labels == {"site": "paris"}
    assert token.max_uses == 3
    assert token.use_count == 0
    assert token.state is TokenState.ACTIVE
    assert token.created_at.tzinfo is not None
    assert isinstance(token.id, uuid.UUID)
    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT token_hash FROM enrollment_tokens")
        stored = bytes(cursor.fetchone()[0])
        cursor.execute("SELECT count(*) FROM enrollment_tokens WHERE position(%s::bytea in token_hash) > 0", (secret.encode(),))
        assert cursor.fetchone()[0] == 0
    assert stored == credentials.hash_secret(secret)


def test_create_writes_audit_entry(database):
    token, _ = create(database, created_by="bob")

    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT actor, action, target_id, outcome FROM audit_log")
        assert cursor.fetchall() == [("bob", "token.create", str(token.id), "success")]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_uses": 0}, "max_uses"),
        ({"max_uses": -1}, "max_uses"),
        ({"expires_at": datetime.datetime(2000, 1, 1, tzinfo=UTC)}, "expires_at"),
        ({"expires_at": datetime.datetime(2999, 1, 1)}, "expires_at"),
        ({"group": "bad group"}, "group"),
        ({"labels": {"Bad Key": "x"}}, "labels"),
        ({"labels": {"ok": "line\nbreak"}}, "labels[ok]"),
        ({"description": "x" * 1025}, "description"),
        ({"created_by": ""}, "created_by"),
    ],
)
def test_create_rejects_invalid_field(database, fields, field):
    with pytest.raises(InvalidArgument) as raised:
        create(database, **fields)

    assert raised.value.field == field
    assert raised.value.grpc_code_name == "INVALID_ARGUMENT"
    assert count_rows(database, "enrollment_tokens") == 0


def test_consume_counts_uses_and_last_use(database):
    token, secret = create(database, max_uses=2)
    first_use = datetime.datetime(2030, 1, 1, tzinfo=UTC)

    used = consume(database, secret, now=first_use)

    assert used.use_count == 1
    assert used.last_used_at == first_use
    assert used.id == token.id


def test_consume_rejects_exhausted_token(database):
    _, secret = create(database, max_uses=2)
    consume(database, secret)
    consume(database, secret)

    with pytest.raises(FailedPrecondition) as raised:
        consume(database, secret)

    assert "exhausted" in str(raised.value)
    with database.transaction() as conn:
        assert enrollment.list_tokens(conn, page=PageRequest()).items[0].use_count == 2


def test_consume_rejects_expired_token(database):
    _, secret = create(database, expires_at=now() + datetime.timedelta(hours=1))

    with pytest.raises(FailedPrecondition) as raised:
        consume(database, secret, now=now() + datetime.timedelta(hours=2))

    assert "expired" in str(raised.value)


def test_consume_rejects_revoked_token(database):
    token, secret = create(database)
    with database.transaction() as conn:
        revoked = enrollment.revoke_token(conn, token.id, actor="carol")

    with pytest.raises(FailedPrecondition) as raised:
        consume(database, secret)

    assert revoked.state is TokenState.REVOKED
    assert "revoked" in str(raised.value)
    assert secret not in str(raised.value)


def test_consume_rejects_unknown_token(database):
    create(database)

    with pytest.raises(Unauthenticated) as raised:
        consume(database, credentials.new_secret(credentials.ENROLLMENT_TOKEN_PREFIX))

    assert str(raised.value) == "invalid enrollment token"


def test_token_state_order():
    base = dict(
        id=uuid.uuid4(), prefix="amenr_abcdef", description="", group="", labels={}, use_count=5,
        created_at=now(), created_by="x", last_used_at=None,
    )
    past = now() - datetime.timedelta(seconds=1)
    revoked = EnrollmentToken(**base, max_uses=5, expires_at=past, revoked_at=past)
    expired = EnrollmentToken(**base, max_uses=5, expires_at=past, revoked_at=None)
    exhausted = EnrollmentToken(**base, max_uses=5, expires_at=None, revoked_at=None)
    active = EnrollmentToken(**base, max_uses=None, expires_at=None, revoked_at=None)

    assert revoked.state is TokenState.REVOKED
    assert expired.state is TokenState.EXPIRED
    assert exhausted.state is TokenState.EXHAUSTED
    assert active.state is TokenState.ACTIVE


def test_revoke_twice_names_state(database):
    token, _ = create(database)
    with database.transaction() as conn:
        enrollment.revoke_token(conn, token.id, actor="carol")

    with pytest.raises(InvalidState) as raised:
        with database.transaction() as conn:
            enrollment.revoke_token(conn, token.id, actor="carol")

    assert raised.value.state == "revoked"
    assert "active" in raised.value.allowed
    assert str(token.id) in str(raised.value)


def test_revoke_unknown_token(database):
    with pytest.raises(NotFound) as raised:
        with database.transaction() as conn:
            enrollment.revoke_token(conn, uuid.uuid4(), actor="carol")

    assert raised.value.grpc_code_name == "NOT_FOUND"


def test_list_hides_revoked_by_default(database):
    active_token, _ = create(database, description="active_token")
    revoked_token, _ = create(database, description="revoked_token")
    with database.transaction() as conn:
        enrollment.revoke_token(conn, revoked_token.id, actor="carol")

    with database.transaction() as conn:
        active = enrollment.list_tokens(conn, page=PageRequest())
        every = enrollment.list_tokens(conn, include_revoked=True, page=PageRequest(sort="description"))

    assert [t.id for t in active.items] == [active_token.id]
    assert active.total == 1
    assert [t.description for t in every.items] == ["active_token", "revoked_token"]


def test_get_token_returns_row(database):
    token, _ = create(database, description="one")

    with database.transaction() as conn:
        assert enrollment.get_token(conn, token.id) == token
        with pytest.raises(NotFound):
            enrollment.get_token(conn, uuid.uuid4())
