"""The ``grpc_gateway`` program: verify the schema, load TLS, serve gRPC."""

from __future__ import annotations

import asyncio
import sys

from services.core.program import run_program
from services.core.redis_client import wait_for_redis
from services.core.settings import Settings
from services.core.startup import verify_schema
from services.core.tls import load_tls_material
from services.grpc_gateway.app import serve

SERVICE = "grpc_gateway"


def run(settings: Settings) -> int:
    """Check the schema, Redis and the TLS files, then serve until a stop signal."""
    verify_schema(settings, SERVICE)
    wait_for_redis(settings.redis_url, timeout_seconds=settings.db_wait_seconds).close()
    tls = load_tls_material(settings)
    asyncio.run(serve(settings, tls))
    return 0


def main() -> int:
    return run_program(SERVICE, run)


if __name__ == "__main__":
    sys.exit(main())
