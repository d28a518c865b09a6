"""The one place where gateway handlers get credentials checked, log ids bound and errors mapped.

Every handler of the agent and panel services is wrapped by ``agent_rpc``,
``panel_rpc(role)`` or ``enrollment_rpc``. The wrapper binds ``method`` (and
``agent_id`` for agents) to the log context, runs the handler, and turns
typed errors into gRPC statuses:

- ``RequestError`` subclasses -> their ``grpc_code_name`` with the message;
- ``DatabaseError``, ``RedisError`` and redis-py errors -> UNAVAILABLE;
- anything else -> INTERNAL, logged with its traceback and the ids.
"""

from __future__ import annotations

import functools
import time
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import redis.exceptions

from services.core.errors import DatabaseError, RedisError, RequestError
from services.core.fleet.models import ApiRole
from services.core import metrics
from services.core.fleet import audit
from services.core.logs import bind_context

logger = logging.getLogger("agentmgr.grpc_gateway.rpc")

Handler = Callable[..., Awaitable[Any]]

UNAVAILABLE_ERRORS = (DatabaseError, RedisError, redis.exceptions.RedisError)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """Return the gRPC status code and details that ``error`` maps to."""
    if isinstance(error, RequestError):
        return grpc.StatusCode[error.grpc_code_name], str(error)
    if isinstance(error, UNAVAILABLE_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, "the manager's database or Redis is unavailable; retry later"
    return grpc.StatusCode.INTERNAL, "internal error; the gateway log has the details"


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    """Log ``error`` and end the call with the status it maps to (raises ``grpc.aio.AbortError``)."""
    code, details = status_for(error)
    fields = {"grpc_code": code.name, "error_type": type(error).__name__}
    if isinstance(error, RequestError):
        logger.info("rejected: %s (%s: %s)", method, code.name, error, extra=fields)
    elif code is grpc.StatusCode.UNAVAILABLE:
        logger.warning("failed: %s (%s)", method, error, extra=fields)
    else:
        logger.error("failed: %s (unexpected error)", method, exc_info=error, extra=fields)
    await context.abort(code, details)


AUDITED_PANEL_METHODS = {
    "CreateEnrollmentToken": "token.create",
    "RevokeEnrollmentToken": "token.revoke",
    "DeleteAgent": "agent.delete",
    "RunCommand": "command.create",
    "CancelCommand": "command.cancel",
}
"""Panel methods that change state, with the audit action that records them."""


async def audit_rejected(servicer: Any, method: str, caller: Any, error: BaseException) -> None:
    """Record a rejected state-changing panel call: denied (role too low) or failed (bad request)."""
    action = AUDITED_PANEL_METHODS.get(method)
    if action is None or not isinstance(error, RequestError):
        return
    actor = getattr(caller, "actor", None) or getattr(error, "actor", None)
    if actor is None:
        return  # unauthenticated callers have no name to record
    outcome = "denied" if error.grpc_code_name == "PERMISSION_DENIED" else "failure"
    try:
        await servicer.runtime.db(audit.record, actor=actor, action=action, outcome=outcome,
                                  details={"error": str(error)[:500]})
    except Exception as audit_error:  # noqa: BLE001 - the call's own status still goes back
        logger.warning("failed: recording %s %s in the audit log (%s)", outcome, action, audit_error)


def _wrap(
    handler: Handler,
    authenticate: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    *,
    audit_rejections: bool = False,
) -> Handler:
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        caller = None
        with bind_context(method=method):
            try:
                caller = await authenticate(self, context)
                ids = {"agent_id": str(caller.agent_id)} if hasattr(caller, "agent_id") else {}
                with bind_context(**ids):
                    return await handler(self, request, context, caller)
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except Exception as error:  # noqa: BLE001 - every error becomes a status here
                code = status_for(error)[0]
                if audit_rejections:
                    await audit_rejected(self, method, caller, error)
                await abort_with(context, error, method)
            finally:
                metrics.RPCS.labels(method=method, code=code.name).inc()
                metrics.RPC_SECONDS.labels(method=method).observe(time.monotonic() - started)
                if code is grpc.StatusCode.UNAUTHENTICATED:
                    metrics.AUTH_FAILURES.labels(method=method).inc()

    wrapper.rpc_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Return the status a handler aborted with, or UNKNOWN when the context does not report it."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN


def agent_rpc(handler: Handler) -> Handler:
    """Wrap an agent handler: requires a valid agent id and key, passes an ``AgentCaller``."""

    async def authenticate(servicer: Any, context: grpc.aio.ServicerContext) -> Any:
        return await servicer.authenticator.authenticate_agent(context.invocation_metadata())

    return _wrap(handler, authenticate)


def panel_rpc(role: ApiRole) -> Callable[[Handler], Handler]:
    """Wrap a panel handler: requires an API token of ``role`` or above, passes an ``OperatorCaller``."""

    def decorate(handler: Handler) -> Handler:
        async def authenticate(servicer: Any, context: grpc.aio.ServicerContext) -> Any:
            return await servicer.authenticator.authenticate_operator(context.invocation_metadata(), role)

        return _wrap(handler, authenticate, audit_rejections=True)

    return decorate


def enrollment_rpc(handler: Handler) -> Handler:
    """Wrap ``Register``, whose credential is the enrollment token in the request. Passes None as caller."""

    async def authenticate(servicer: Any, context: grpc.aio.ServicerContext) -> None:
        return None

    return _wrap(handler, authenticate)
