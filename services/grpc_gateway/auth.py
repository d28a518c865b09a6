"""Credentials of gateway calls: agent id and key, operator API tokens, Register rate limit.

Agents send ``x-agent-id`` and ``x-agent-key``; operators send
``authorization: Bearer <api token>``. Verified agent keys are cached per
process for a short time; a revocation published on Redis drops the entry.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence

from services.core.credentials import hash_secret, secret_matches
from services.core.errors import PermissionDenied, RequestError, Unauthenticated
from services.core.fleet import agents, apitokens
from services.core.fleet.models import ApiRole, ApiToken
from services.core.keys import register_failures_key
from services.grpc_gateway.runtime import GatewayRuntime

logger = logging.getLogger("agentmgr.grpc_gateway.auth")

AGENT_ID_HEADER = "x-agent-id"
AGENT_KEY_HEADER = "x-agent-key"
AUTHORIZATION_HEADER = "authorization"
BEARER_PREFIX = "bearer "

MAX_CREDENTIAL_LENGTH = 512
"""Maximum length of an accepted agent key or API token. Real ones are under 60 characters."""

INVALID_AGENT_CREDENTIALS = "invalid agent credentials: re-enroll the agent with a new token"


class RateLimited(RequestError):
    """Too many failed calls from one peer, so the caller must wait for the window to pass."""

    grpc_code_name = "RESOURCE_EXHAUSTED"


@dataclasses.dataclass(frozen=True)
class AgentCaller:
    """An agent whose id and key were verified."""

    agent_id: uuid.UUID


@dataclasses.dataclass(frozen=True)
class OperatorCaller:
    """An operator whose API token was verified."""

    token: ApiToken

    @property
    def actor(self) -> str:
        """Name recorded in the audit log and in ``requested_by``."""
        return f"api:{self.token.name}"


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, name: str) -> str:
    """Return the first value of metadata entry ``name``, or an empty string."""
    for key, value in metadata or ():
        if key.lower() == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return ""


class AgentKeyCache:
    """Verified agent key digests, bounded in size and age.

    Not thread-safe: only the event loop thread uses it. ``generation`` grows
    with every revocation, so a verification that started before a revocation
    cannot put the revoked key back into the cache when it completes.
    """

    def __init__(self, *, ttl_seconds: float, max_entries: int) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self.generation = 0
        self._entries: collections.OrderedDict[uuid.UUID, tuple[bytes, float]] = collections.OrderedDict()

    def contains(self, agent_id: uuid.UUID, key: str) -> bool:
        entry = self._entries.get(agent_id)
        if entry is None:
            return False
        digest, expires_at = entry
        if time.monotonic() >= expires_at:
            del self._entries[agent_id]
            return False
        return secret_matches(key, digest)

    def put(self, agent_id: uuid.UUID, key: str, *, generation: int) -> None:
        if self.ttl_seconds <= 0 or generation != self.generation:
            return
        self._entries[agent_id] = (hash_secret(key), time.monotonic() + self.ttl_seconds)
        self._entries.move_to_end(agent_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, agent_id: uuid.UUID) -> None:
        self.generation += 1
        self._entries.pop(agent_id, None)


class Authenticator:
    """Checks the credentials of agent and operator calls."""

    def __init__(self, runtime: GatewayRuntime) -> None:
        self.runtime = runtime
        self.agent_keys = AgentKeyCache(
            ttl_seconds=runtime.settings.agent_auth_cache_seconds,
            max_entries=runtime.settings.agent_auth_cache_size,
        )

    async def authenticate_agent(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> AgentCaller:
        """Verify the agent id and key in ``metadata``.

        Raises:
            Unauthenticated: an entry is missing, or the id is unknown, the key wrong or the
                agent revoked (one message for all three, so it reveals nothing).
            DatabaseError: PostgreSQL is unreachable.
        """
        id_text = metadata_value(metadata, AGENT_ID_HEADER)
        key = metadata_value(metadata, AGENT_KEY_HEADER)
        if not id_text or not key:
            raise Unauthenticated(f"missing metadata: {AGENT_ID_HEADER} and {AGENT_KEY_HEADER} are required")
        if len(key) > MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated(INVALID_AGENT_CREDENTIALS)
        try:
            agent_id = uuid.UUID(id_text)
        except ValueError:
            raise Unauthenticated(INVALID_AGENT_CREDENTIALS) from None

        if self.agent_keys.contains(agent_id, key):
            return AgentCaller(agent_id)
        generation = self.agent_keys.generation
        await self.runtime.db(agents.authenticate_agent, agent_id, key)
        self.agent_keys.put(agent_id, key, generation=generation)
        return AgentCaller(agent_id)

    async def authenticate_operator(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, role: ApiRole
    ) -> OperatorCaller:
        """Verify the bearer API token in ``metadata`` and that its role allows ``role``.

        Raises:
            Unauthenticated: the token is missing, malformed, unknown, expired or revoked.
            PermissionDenied: the token's role is below ``role``.
            DatabaseError: PostgreSQL is unreachable.
        """
        header = metadata_value(metadata, AUTHORIZATION_HEADER)
        if not header:
            raise Unauthenticated(f"missing metadata: {AUTHORIZATION_HEADER}: Bearer <api token>")
        if not header.lower().startswith(BEARER_PREFIX):
            raise Unauthenticated(f"invalid {AUTHORIZATION_HEADER} metadata: expected Bearer <api token>")
        secret = header[len(BEARER_PREFIX):].strip()
        if not secret or len(secret) > MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated("invalid API token: create one with `agentmgr apikey create`")
        token = await self.runtime.db(apitokens.authenticate_api_token, secret)
        caller = OperatorCaller(token)
        try:
            apitokens.require_role(token, role)
        except PermissionDenied as error:
            error.actor = caller.actor  # type: ignore[attr-defined] - read by the audit of denied calls
            raise
        return caller


def peer_host(peer: str) -> str:
    """Return the address part of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("[") and "]" in rest:
        return rest[1:rest.index("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer


class RegisterRateLimiter:
    """Counts failed Register calls per peer address in Redis, shared by every gateway process."""

    def __init__(self, runtime: GatewayRuntime) -> None:
        self.runtime = runtime
        self.limit = runtime.settings.register_failure_limit
        self.window_seconds = runtime.settings.register_failure_window_seconds

    async def check(self, host: str) -> None:
        """Raise ``RateLimited`` when ``host`` used up its failures in the current window."""
        count = await self.runtime.redis.get(register_failures_key(host))
        if count is not None and int(count) >= self.limit:
            raise RateLimited(
                f"too many failed Register calls from {host}: wait {self.window_seconds:g} seconds, "
                "then retry with a valid enrollment token"
            )

    async def record_failure(self, host: str) -> None:
        """Count one failure. The window starts with the first failure."""
        key = register_failures_key(host)
        async with self.runtime.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, int(self.window_seconds + 0.999), nx=True)
            await pipe.execute()
