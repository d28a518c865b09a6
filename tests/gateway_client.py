"""A small synchronous client of the gateway for tests, and a gateway process to point it at.

``GatewayProcess`` runs the real ``python -m services.grpc_gateway`` over real
TLS. ``AgentSession`` drives one Session stream from a thread. By itself it sends
only Hello and heartbeats, so each test decides what the agent does.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentmanager.v1 import agent_pb2, agent_pb2_grpc, common_pb2, panel_pb2_grpc
from tests.support import PROJECT_ROOT, wait_until

CALL_TIMEOUT_SECONDS = 15.0


class GatewayProcess:
    """``python -m services.grpc_gateway`` with a given environment, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.address = env["AGENTMGR_GRPC_ADDRESS"]
        self.process: subprocess.Popen | None = None

    @property
    def ca_certificate(self) -> bytes:
        return (Path(self.env["AGENTMGR_HOME"]) / "tls" / "ca.pem").read_bytes()

    def start(self) -> GatewayProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.grpc_gateway"],
                env={**os.environ, **self.env}, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, timeout=60, what=f"gateway on {self.address} (log: {self.log_path})")
        return self

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.process.returncode}: {self.log_tail()}")
        return any(record.get("message", "").startswith("listening:") for record in self.log_records())

    def log_records(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """Send SIGTERM and return the exit status (None if it was not running)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """Send SIGKILL, as a crash would, and wait for the process to end."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def channel(self) -> grpc.Channel:
        return secure_channel(self.address, self.ca_certificate)


def secure_channel(address: str, ca_certificate: bytes, **options: Any) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_certificate)
    return grpc.secure_channel(address, credentials, options=list(options.items()))


def host_facts(**overrides: Any) -> common_pb2.HostFacts:
    """Return valid host facts with a new machine id. Keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "hostname": f"host-{uuid.uuid4().hex[:8]}.example.test",
        "machine_id": uuid.uuid4().hex,
        "os_name": "Linux",
        "os_version": "6.1",
        "architecture": "x86_64",
        "agent_version": "0.1.0",
        "addresses": ["192.0.2.10", "2001:db8::10"],
        "labels": {"env": "test"},
    }
    fields.update(overrides)
    return common_pb2.HostFacts(**fields)


def seconds(value: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(value * 1_000_000_000))
    return message


def panel_stub(channel: grpc.Channel) -> panel_pb2_grpc.PanelServiceStub:
    return panel_pb2_grpc.PanelServiceStub(channel)


def bearer(api_token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_token}"),)


def agent_metadata(agent_id: str, agent_key: str) -> tuple[tuple[str, str], ...]:
    return (("x-agent-id", agent_id), ("x-agent-key", agent_key))


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_SECONDS).status


class Agent:
    """An enrolled test agent: its id, key and a channel to one gateway."""

    def __init__(self, channel: grpc.Channel, agent_id: str, agent_key: str) -> None:
        self.channel = channel
        self.agent_id = agent_id
        self.agent_key = agent_key

    @classmethod
    def register(cls, channel: grpc.Channel, token: str, **fact_overrides: Any) -> Agent:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        response = stub.Register(
            agent_pb2.RegisterRequest(enrollment_token=token, facts=host_facts(**fact_overrides)),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return cls(channel, response.agent_id, response.agent_key)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return agent_metadata(self.agent_id, self.agent_key)

    def on(self, channel: grpc.Channel) -> Agent:
        """Return the same agent talking to another gateway."""
        return Agent(channel, self.agent_id, self.agent_key)

    def open_session(self, *, heartbeat: bool = True, metadata: Any = None) -> AgentSession:
        return AgentSession(self.channel, metadata if metadata is not None else self.metadata, heartbeat=heartbeat)


class AgentSession:
    """One Session stream. Hello is sent at once, and received messages queue up in ``received``."""

    _CLOSE = object()

    def __init__(self, channel: grpc.Channel, metadata: Any, *, heartbeat: bool = True) -> None:
        self.outgoing: queue.Queue[Any] = queue.Queue()
        self.received: queue.Queue[agent_pb2.ServerMessage] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self.settings: common_pb2.SessionSettings | None = None
        self.heartbeat = heartbeat
        self.send(agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_version="0.1.0")))
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        self.call = stub.Session(self._requests(), metadata=metadata)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[agent_pb2.AgentMessage]:
        while True:
            try:
                item = self.outgoing.get(timeout=self._heartbeat_interval())
            except queue.Empty:
                if self.heartbeat and self.settings is not None:
                    yield agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat())
                continue
            if item is self._CLOSE:
                return
            yield item

    def _heartbeat_interval(self) -> float:
        if self.settings is None:
            return 0.2
        interval = self.settings.heartbeat_interval
        return interval.seconds + interval.nanos / 1e9

    def _read(self) -> None:
        try:
            for message in self.call:
                if message.WhichOneof("body") == "settings":
                    self.settings = message.settings
                self.received.put(message)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()

    def send(self, message: agent_pb2.AgentMessage) -> None:
        self.outgoing.put(message)

    def next_message(self, timeout: float = 10.0, *, kind: str | None = None) -> agent_pb2.ServerMessage:
        """Return the next received message of ``kind`` (any kind if None), failing after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind or 'message'} within {timeout}s (stream error: {self.error})")
            try:
                message = self.received.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            if kind is None or message.WhichOneof("body") == kind:
                return message

    def expect_nothing(self, kind: str, within: float) -> None:
        """Fail if a message of ``kind`` arrives within ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                message = self.received.get(timeout=0.1)
            except queue.Empty:
                continue
            assert message.WhichOneof("body") != kind, f"unexpected {kind}: {message}"

    def wait_settings(self, timeout: float = 10.0) -> common_pb2.SessionSettings:
        return self.next_message(timeout, kind="settings").settings

    def wait_ended(self, timeout: float = 10.0) -> grpc.RpcError | None:
        """Wait until the server ends the stream and return its error (None for a clean end)."""
        assert self.ended.wait(timeout), f"stream still open after {timeout}s"
        return self.error

    def report_result(self, command_id: str, *, exit_code: int = 0, stdout: bytes = b"", stderr: bytes = b"") -> None:
        self.send(agent_pb2.AgentMessage(command_ack=agent_pb2.CommandAck(command_id=command_id)))
        self.send(
            agent_pb2.AgentMessage(
                command_result=agent_pb2.CommandResult(
                    command_id=command_id, exit_code=exit_code, stdout=stdout, stderr=stderr, duration=seconds(0.05)
                )
            )
        )

    def close(self) -> None:
        """Half-close the stream and cancel it if the server keeps it open."""
        self.outgoing.put(self._CLOSE)
        if not self.ended.wait(2):
            self.call.cancel()
            self.ended.wait(5)


class GatewayStack:
    """A migrated database, a Redis database and the environment for gateways that share them."""

    _redis_numbers = iter(range(900, 1000))

    def __init__(self, postgres: Any, redis_server: Any, root: Path, **settings: str) -> None:
        from services.core.database import Database
        from services.core.settings import Settings
        from services.migrate.main import migrate
        from tests.support import free_port

        name = f"g_{uuid.uuid4().hex[:12]}"
        self.postgres = postgres
        self.database_name = name
        self.database_url = postgres.create_database(name)
        self.redis_url = redis_server.url_for(next(self._redis_numbers))
        self.root = root
        self.home = root / f"gateway-home-{name}"
        self.home.mkdir()
        self.home.chmod(0o755)
        self._free_port = free_port
        self.base_env = {
            "AGENTMGR_HOME": str(self.home),
            "AGENTMGR_DATABASE_URL": self.database_url,
            "AGENTMGR_REDIS_URL": self.redis_url,
            "AGENTMGR_LOG_LEVEL": "INFO",
            **TEST_SETTINGS,
            **settings,
        }
        migrate(Settings.from_env(self.base_env))
        self.database = Database(self.database_url, max_connections=4, application_name="agentmgr-test")
        self.gateways: list[GatewayProcess] = []
        import redis

        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.flushdb()

    def start_gateway(self, **settings: str) -> GatewayProcess:
        env = {**self.base_env, "AGENTMGR_GRPC_ADDRESS": f"127.0.0.1:{self._free_port()}", **settings}
        gateway = GatewayProcess(env, self.root / f"gateway-{self.database_name}-{len(self.gateways)}.log")
        self.gateways.append(gateway)
        return gateway.start()

    def run(self, operation: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run a fleet function in one transaction on this stack's database."""
        with self.database.transaction() as connection:
            return operation(connection, *args, **kwargs)

    def count(self, table: str, where: str = "TRUE", parameters: tuple[Any, ...] = ()) -> int:
        with self.database.transaction() as connection, connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {table} WHERE {where}", parameters)
            return cursor.fetchone()[0]

    def enrollment_token(self, **options: Any) -> str:
        from services.core.fleet import enrollment

        return self.run(enrollment.create_token, created_by="test", **options)[1]

    def api_token(self, role: str) -> str:
        from services.core.fleet import apitokens
        from services.core.fleet.models import ApiRole

        return self.run(apitokens.create_api_token, name=f"{role}-{uuid.uuid4().hex[:6]}", role=ApiRole(role), created_by="test")[1]

    def close(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        self.database.close()
        self.redis.flushdb()
        self.redis.close()
        self.postgres.drop_database(self.database_name)


TEST_SETTINGS = {
    "AGENTMGR_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "AGENTMGR_OFFLINE_AFTER_SECONDS": "3",
    "AGENTMGR_LIVENESS_FLUSH_SECONDS": "0.3",
    "AGENTMGR_GRPC_SHUTDOWN_GRACE_SECONDS": "2",
    "AGENTMGR_GRPC_MAX_MESSAGE_BYTES": str(64 * 1024),
    "AGENTMGR_REGISTER_FAILURE_LIMIT": "5",
    "AGENTMGR_COMMAND_WAIT_MAX_SECONDS": "10",
    "AGENTMGR_GATEWAY_METRICS_ADDRESS": "",
    "AGENTMGR_UPDATER_METRICS_ADDRESS": "",
}
"""Short intervals so that liveness and routing tests finish in seconds."""


# Module-scoped fixtures: test modules import the ones they use, so each module gets its own stack.


@pytest.fixture(scope="module")
def stack(postgres: Any, redis_server: Any, test_root: Path) -> Iterator[GatewayStack]:
    """A migrated database and a Redis database for one test module; gateways start on request."""
    stack = GatewayStack(postgres, redis_server, test_root)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def gateway(stack: GatewayStack) -> GatewayProcess:
    return stack.start_gateway()


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    channel = gateway.channel()
    yield channel
    channel.close()
