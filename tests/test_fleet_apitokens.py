"""Operator API tokens against a real PostgreSQL: creation, authentication, roles, revocation."""

from __future__ import annotations

import datetime
import uuid

import pytest

from services.core import credentials
from services.core.errors import InvalidArgument, InvalidState, NotFound, PermissionDenied, Unauthenticated
from services.core.fleet import apitokens
from services.core.fleet.listing import PageRequest
from services.core.fleet.models import ApiRole
from tests.fleet_support import count_rows, database, fleet_template, fleet_url  # noqa: F401 - fixtures

UTC = datetime.timezone.utc


def create(database, **fields):
    values = dict(name="ci", role=ApiRole.OPERATOR, created_by="root")
    values.update(fields)
    with database.transaction() as conn:
        return apitokens.create_api_token(conn, **values)


def authenticate(database, secret, **fields):
    with database.transaction() as conn:
        return apitokens.authenticate_api_token(conn, secret, **fields)


def test_create_stores_only_hash(database):
    token, secret = create(database)

    assert secret.startswith(credentials.API_TOKEN_PREFIX)
    assert token.prefix == secret[:12]
    assert token.role is ApiRole.OPERATOR
    with database.transaction() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT token_hash FROM api_tokens")
        assert bytes(cursor.fetchone()[0]) == credentials.hash_secret(secret)
        cursor.execute("SELECT actor, action, target_id FROM audit_log")
        assert cursor.fetchall() == [("root", "apikey.create", str(token.id))]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"role": "superuser"}, "role"),
        ({"expires_at": datetime.datetime(2000, 1, 1, tzinfo=UTC)}, "expires_at"),
    ],
)
def test_create_rejects_invalid_field(database, fields, field):
    with pytest.raises(InvalidArgument) as raised:
        create(database, **fields)

    assert raised.value.field == field
    assert count_rows(database, "api_tokens") == 0


def test_authenticate_records_use_once_a_minute(database):
    _, secret = create(database)
    first = datetime.datetime.now(UTC)

    used = authenticate(database, secret, now=first)
    soon = authenticate(database, secret, now=first + datetime.timedelta(seconds=30))
    later = authenticate(database, secret, now=first + datetime.timedelta(seconds=61))

    assert used.last_used_at == first
    assert soon.last_used_at == first
    assert later.last_used_at == first + datetime.timedelta(seconds=61)


@pytest.mark.parametrize("case", ["unknown", "revoked", "expired"])
def test_authenticate_rejects(database, case):
    token, secret = create(database, expires_at=datetime.datetime.now(UTC) + datetime.timedelta(hours=1))
    at = None
    if case == "unknown":
        secret = credentials.new_secret(credentials.API_TOKEN_PREFIX)
    elif case == "revoked":
        with database.transaction() as conn:
            apitokens.revoke_api_token(conn, token.id, actor="root")
    else:
        at = datetime.datetime.now(UTC) + datetime.timedelta(hours=2)

    with pytest.raises(Unauthenticated) as raised:
        authenticate(database, secret, now=at)

    assert str(raised.value) == apitokens.INVALID_TOKEN_MESSAGE


def test_require_role_order(database):
    roles = [ApiRole.VIEWER, ApiRole.OPERATOR, ApiRole.ADMIN]
    tokens = {role: create(database, name=role.value, role=role)[0] for role in roles}

    for held_role in roles:
        for needed in roles:
            if held_role.rank >= needed.rank:
                apitokens.require_role(tokens[held_role], needed)
            else:
                with pytest.raises(PermissionDenied) as raised:
                    apitokens.require_role(tokens[held_role], needed)
                assert needed.value in str(raised.value)
                assert raised.value.grpc_code_name == "PERMISSION_DENIED"


def test_revoke_and_list(database):
    active_token, _ = create(database, name="active_token")
    revoked_token, _ = create(database, name="revoked_token")

    with database.transaction() as conn:
        apitokens.revoke_api_token(conn, revoked_token.id, actor="root")
        active = apitokens.list_api_tokens(conn, page=PageRequest())
        every = apitokens.list_api_tokens(conn, include_revoked=True, page=PageRequest(sort="name"))
        with pytest.raises(InvalidState):
            apitokens.revoke_api_token(conn, revoked_token.id, actor="root")
        with pytest.raises(NotFound):
            apitokens.revoke_api_token(conn, uuid.uuid4(), actor="root")

    assert [t.id for t in active.items] == [active_token.id]
    assert [t.name for t in every.items] == ["active_token", "revoked_token"]
