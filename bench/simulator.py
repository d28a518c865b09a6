"""Simulated agents that speak the real agent protocol, spread over worker processes.

Each simulated agent owns one grpc.aio channel with a local subchannel pool, so
it opens its own TCP connection, as a fleet of real hosts would. It registers
with an enrollment token, opens the Session over TLS (pinning the gateway's CA),
sends Hello, and heartbeats at the announced interval. It replies to
CommandRequest with CommandAck and CommandResult from an in-process executor,
and to UpdateNotice by downloading the artifact and reconnecting with the new
version.

``Fleet`` runs in the benchmark's process and drives ``worker_main`` in child
processes (multiprocessing, spawn start method) over pipes. Each child keeps at
most ``AGENTS_PER_WORKER`` agents, which stays under a 20,000 open-files limit.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import time
import uuid
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from agentmanager.v1 import agent_pb2, agent_pb2_grpc, common_pb2

logger = logging.getLogger("bench.simulator")

AGENTS_PER_WORKER = 2500
"""Agents per worker process: each needs one socket, well under 20,000 open files."""

INITIAL_VERSION = "1.0.0"
RECONNECT_DELAY_MIN_SECONDS = 0.5
RECONNECT_DELAY_MAX_SECONDS = 5.0
REGISTER_TIMEOUT_SECONDS = 30.0
DOWNLOAD_TIMEOUT_SECONDS = 300.0
DOWNLOAD_ATTEMPTS = 20
RETRIED_DOWNLOAD_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
WORKER_REPLY_TIMEOUT_SECONDS = 120.0


@dataclasses.dataclass(frozen=True)
class Credentials:
    """An enrolled agent: its id and key, and the machine facts it registered with."""

    agent_id: str
    agent_key: str
    hostname: str
    machine_id: str


@dataclasses.dataclass
class AgentCounters:
    """Counts that one worker process keeps for all of its agents."""

    online: int = 0
    sessions_opened: int = 0
    heartbeats_sent: int = 0
    commands_run: int = 0
    updates_succeeded: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    versions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


def host_facts(credentials: Credentials, version: str) -> common_pb2.HostFacts:
    return common_pb2.HostFacts(
        hostname=credentials.hostname,
        machine_id=credentials.machine_id,
        os_name="Linux",
        os_version="6.1",
        architecture="x86_64",
        agent_version=version,
        addresses=["192.0.2.10"],
        labels={"bench": "simulator"},
    )


def new_identity(index: int) -> tuple[str, str]:
    """Return a host name and a machine id that no other simulated agent uses."""
    machine_id = uuid.uuid4().hex
    return f"sim-{index}-{machine_id[:8]}.bench.test", machine_id


def execute(command_line: str) -> tuple[int, bytes, bytes]:
    """Run ``command_line`` in process, without spawning anything: return exit code, stdout, stderr.

    Only ``echo WORDS``, ``true`` and ``false`` are understood. Anything else
    exits 127, as /bin/sh does for an unknown command.
    """
    if command_line == "true":
        return 0, b"", b""
    if command_line == "false":
        return 1, b"", b""
    if command_line == "echo" or command_line.startswith("echo "):
        return 0, command_line[5:].encode() + b"\n", b""
    return 127, b"", f"sh: {command_line.split()[0] if command_line.split() else ''}: not found\n".encode()


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(seconds * 1_000_000_000))
    return message


def now_timestamp() -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.GetCurrentTime()
    return message


def channel_options() -> list[tuple[str, Any]]:
    """Return the options that give each channel its own TCP connection and a quick reconnect."""
    return [
        # Without a local pool, channels to one address share a subchannel and so one connection.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", int(RECONNECT_DELAY_MAX_SECONDS * 1000)),
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ]


class SimulatedAgent:
    """One agent: a channel, a session loop with reconnects, and the protocol's replies."""

    def __init__(self, credentials: Credentials, channel: grpc.aio.Channel, counters: AgentCounters) -> None:
        self.credentials = credentials
        self.channel = channel
        self.stub = agent_pb2_grpc.AgentServiceStub(channel)
        self.counters = counters
        self.version = INITIAL_VERSION
        self.metadata = (("x-agent-id", credentials.agent_id), ("x-agent-key", credentials.agent_key))
        self.executed: set[str] = set()
        self.pending_update: agent_pb2.UpdateStatus | None = None
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        counters.versions[self.version] += 1

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()

    async def run(self) -> None:
        """Keep a session open until stopped, reconnecting with capped exponential backoff and jitter."""
        failures = 0
        while not self.stopping:
            try:
                reached_settings = await self.run_session()
            except grpc.aio.AioRpcError as error:
                self.counters.errors[error.code().name] += 1
                reached_settings = False
            if reached_settings and self.pending_update is not None:
                continue  # The agent "restarts" into its new version at once.
            failures = 0 if reached_settings else failures + 1
            ceiling = min(RECONNECT_DELAY_MAX_SECONDS, RECONNECT_DELAY_MIN_SECONDS * 2 ** min(failures, 8))
            await asyncio.sleep(random.uniform(RECONNECT_DELAY_MIN_SECONDS, ceiling))

    async def run_session(self) -> bool:
        """Run one Session stream until it ends; return whether the gateway sent SessionSettings."""
        outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        hello = agent_pb2.Hello(agent_version=self.version, facts=host_facts(self.credentials, self.version))
        outbox.put_nowait(agent_pb2.AgentMessage(hello=hello))

        async def requests():
            while (item := await outbox.get()) is not None:
                yield item

        call = self.stub.Session(requests(), metadata=self.metadata, wait_for_ready=True)
        online = False
        background: list[asyncio.Task[None]] = []
        try:
            async for message in call:
                kind = message.WhichOneof("body")
                if kind == "settings":
                    online = True
                    self.counters.online += 1
                    self.counters.sessions_opened += 1
                    background.append(asyncio.create_task(self.heartbeat(outbox, message.settings)))
                    if self.pending_update is not None:
                        outbox.put_nowait(agent_pb2.AgentMessage(update_status=self.pending_update))
                        self.pending_update = None
                        self.counters.updates_succeeded += 1
                elif kind == "command_request":
                    self.answer_command(outbox, message.command_request)
                elif kind == "update_notice":
                    background.append(asyncio.create_task(self.install_update(outbox, message.update_notice)))
        finally:
            for task in background:
                task.cancel()
            if online:
                self.counters.online -= 1
            outbox.put_nowait(None)
            call.cancel()
        return online

    async def heartbeat(self, outbox: asyncio.Queue, settings: common_pb2.SessionSettings) -> None:
        interval = settings.heartbeat_interval.ToNanoseconds() / 1e9
        # Spread the first beat over one interval, so a fleet that connected together does not beat together.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_at=now_timestamp())))
            self.counters.heartbeats_sent += 1
            await asyncio.sleep(interval)

    def answer_command(self, outbox: asyncio.Queue, request: agent_pb2.CommandRequest) -> None:
        # Delivery is at least once: a command id seen before is not run again.
        if request.command_id in self.executed:
            return
        self.executed.add(request.command_id)
        started = time.monotonic()
        outbox.put_nowait(agent_pb2.AgentMessage(
            command_ack=agent_pb2.CommandAck(command_id=request.command_id, started_at=now_timestamp())))
        exit_code, stdout, stderr = execute(request.command_line)
        outbox.put_nowait(agent_pb2.AgentMessage(command_result=agent_pb2.CommandResult(
            command_id=request.command_id, exit_code=exit_code, stdout=stdout, stderr=stderr,
            duration=duration(time.monotonic() - started))))
        self.counters.commands_run += 1

    async def install_update(self, outbox: asyncio.Queue, notice: agent_pb2.UpdateNotice) -> None:
        """Download the artifact, check its SHA-256, then end the session to come back as the new version."""
        digest = hashlib.sha256()
        received = 0
        for attempt in range(DOWNLOAD_ATTEMPTS):
            request = agent_pb2.DownloadArtifactRequest(release_id=notice.release_id, offset=received)
            try:
                async for chunk in self.stub.DownloadArtifact(request, metadata=self.metadata, timeout=DOWNLOAD_TIMEOUT_SECONDS):
                    digest.update(chunk.data)
                    received += len(chunk.data)
                break
            except grpc.aio.AioRpcError as error:
                # RESOURCE_EXHAUSTED means every download slot was busy: retry, resuming at the offset reached.
                self.counters.errors[f"download {error.code().name}"] += 1
                if error.code() not in RETRIED_DOWNLOAD_CODES or attempt + 1 == DOWNLOAD_ATTEMPTS:
                    return
                await asyncio.sleep(random.uniform(RECONNECT_DELAY_MIN_SECONDS, RECONNECT_DELAY_MAX_SECONDS))
        if received != notice.size_bytes or digest.hexdigest() != notice.sha256:
            self.counters.errors["download checksum mismatch"] += 1
            outbox.put_nowait(agent_pb2.AgentMessage(update_status=agent_pb2.UpdateStatus(
                rollout_id=notice.rollout_id, release_id=notice.release_id, state=agent_pb2.UPDATE_STATE_FAILED,
                agent_version=self.version, reason=f"artifact of {received} bytes does not match the notice")))
            return
        self.counters.versions[self.version] -= 1
        self.version = notice.version
        self.counters.versions[self.version] += 1
        self.pending_update = agent_pb2.UpdateStatus(
            rollout_id=notice.rollout_id, release_id=notice.release_id, state=agent_pb2.UPDATE_STATE_SUCCEEDED,
            agent_version=notice.version)
        outbox.put_nowait(None)  # Half-close: the gateway ends the stream and run() reconnects.


# Worker process side.


class Worker:
    """The agents of one worker process, and the replies to the requests ``Fleet`` sends it."""

    def __init__(self, address: str, ca_certificate: bytes) -> None:
        self.address = address
        self.credentials = grpc.ssl_channel_credentials(root_certificates=ca_certificate)
        self.counters = AgentCounters()
        self.agents: list[SimulatedAgent] = []

    def new_channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.address, self.credentials, options=channel_options())

    async def register(self, token: str, first_index: int, count: int, concurrency: int) -> dict[str, Any]:
        """Register ``count`` agents over ``concurrency`` channels; return credentials, errors and seconds."""
        channels = [self.new_channel() for _ in range(max(1, concurrency))]
        enrolled: list[Credentials] = []
        errors: collections.Counter[str] = collections.Counter()
        indexes = iter(range(first_index, first_index + count))

        async def register_loop(channel: grpc.aio.Channel) -> None:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            for index in indexes:
                hostname, machine_id = new_identity(index)
                facts = host_facts(Credentials("", "", hostname, machine_id), INITIAL_VERSION)
                try:
                    response = await stub.Register(
                        agent_pb2.RegisterRequest(enrollment_token=token, facts=facts),
                        timeout=REGISTER_TIMEOUT_SECONDS, wait_for_ready=True)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1
                    continue
                enrolled.append(Credentials(response.agent_id, response.agent_key, hostname, machine_id))

        started = time.monotonic()
        await asyncio.gather(*(register_loop(channel) for channel in channels))
        elapsed = time.monotonic() - started
        for channel in channels:
            await channel.close()
        return {"credentials": enrolled, "errors": dict(errors), "seconds": elapsed}

    def connect(self, credentials: list[Credentials]) -> int:
        for item in credentials:
            agent = SimulatedAgent(item, self.new_channel(), self.counters)
            self.agents.append(agent)
            agent.start()
        return len(self.agents)

    def status(self) -> dict[str, Any]:
        counters = self.counters
        return {
            "agents": len(self.agents),
            "online": counters.online,
            "sessions_opened": counters.sessions_opened,
            "heartbeats_sent": counters.heartbeats_sent,
            "commands_run": counters.commands_run,
            "updates_succeeded": counters.updates_succeeded,
            "errors": dict(counters.errors),
            "versions": {version: count for version, count in counters.versions.items() if count},
        }

    async def stop(self) -> None:
        await asyncio.gather(*(agent.stop() for agent in self.agents), return_exceptions=True)
        self.agents.clear()


async def serve_requests(connection: multiprocessing.connection.Connection, worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    while True:
        sequence, operation, arguments = await loop.run_in_executor(None, connection.recv)
        if operation == "register":
            reply: Any = await worker.register(**arguments)
        elif operation == "connect":
            reply = worker.connect(**arguments)
        elif operation == "status":
            reply = worker.status()
        elif operation == "stop":
            await worker.stop()
            connection.send((sequence, worker.status()))
            return
        else:
            reply = ValueError(f"unknown worker request {operation!r}")
        connection.send((sequence, reply))


def worker_main(connection: multiprocessing.connection.Connection, address: str, ca_certificate: bytes) -> None:
    """Serve ``Fleet`` requests over ``connection`` until it sends "stop" (child process entry point)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    asyncio.run(serve_requests(connection, Worker(address, ca_certificate)))


# Benchmark process side.


class Fleet:
    """Worker processes of simulated agents, driven from the benchmark's process."""

    def __init__(self, address: str, ca_certificate: bytes, *, agents_per_worker: int = AGENTS_PER_WORKER) -> None:
        self.address = address
        self.ca_certificate = ca_certificate
        self.agents_per_worker = agents_per_worker
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
        self.loads: list[int] = []
        self.sequence = 0

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self.workers if process.pid is not None]

    def ensure_workers(self, count: int) -> None:
        while len(self.workers) < count:
            ours, theirs = self.context.Pipe()
            process = self.context.Process(
                target=worker_main, args=(theirs, self.address, self.ca_certificate), daemon=True,
                name=f"bench-agents-{len(self.workers)}")
            process.start()
            theirs.close()
            self.workers.append((process, ours))
            self.loads.append(0)

    def request_all(self, requests: list[tuple[int, str, dict[str, Any]]]) -> list[Any]:
        """Send each (worker index, operation, arguments) and return the replies in the same order.

        Each request carries a sequence number, so a reply that arrives after its
        request timed out is dropped instead of being taken for the next reply.

        Raises:
            TimeoutError: a worker sent no reply within WORKER_REPLY_TIMEOUT_SECONDS.
        """
        self.sequence += 1
        for index, operation, arguments in requests:
            self.workers[index][1].send((self.sequence, operation, arguments))
        replies = []
        for index, operation, _ in requests:
            connection = self.workers[index][1]
            deadline = time.monotonic() + WORKER_REPLY_TIMEOUT_SECONDS
            while True:
                if not connection.poll(max(deadline - time.monotonic(), 0)):
                    raise TimeoutError(f"worker {index} sent no reply to {operation} within {WORKER_REPLY_TIMEOUT_SECONDS}s")
                sequence, reply = connection.recv()
                if sequence == self.sequence:
                    break
            if isinstance(reply, Exception):
                raise reply
            replies.append(reply)
        return replies

    def register(self, token: str, count: int, *, workers: int = 2, concurrency: int = 16) -> tuple[list[Credentials], dict[str, int], float]:
        """Register ``count`` agents from ``workers`` processes; return credentials, errors by code and seconds."""
        self.ensure_workers(workers)
        shares = split(count, workers)
        requests = []
        first = 0
        for index, share in enumerate(shares):
            requests.append((index, "register", {"token": token, "first_index": first, "count": share, "concurrency": concurrency}))
            first += share
        started = time.monotonic()
        replies = self.request_all(requests)
        elapsed = time.monotonic() - started
        credentials = [item for reply in replies for item in reply["credentials"]]
        errors: collections.Counter[str] = collections.Counter()
        for reply in replies:
            errors.update(reply["errors"])
        return credentials, dict(errors), elapsed

    def connect(self, credentials: list[Credentials]) -> None:
        """Start agents for ``credentials``, filling workers up to ``agents_per_worker`` each."""
        remaining = list(credentials)
        requests = []
        index = 0
        while remaining:
            self.ensure_workers(index + 1)
            room = self.agents_per_worker - self.loads[index]
            if room > 0:
                batch, remaining = remaining[:room], remaining[room:]
                self.loads[index] += len(batch)
                requests.append((index, "connect", {"credentials": batch}))
            index += 1
        self.request_all(requests)

    def status(self) -> dict[str, Any]:
        """Sum the counters of every worker."""
        replies = self.request_all([(index, "status", {}) for index in range(len(self.workers))])
        return merge_status(replies)

    def wait_online(self, count: int, *, timeout: float, interval: float = 0.25) -> float:
        """Wait until ``count`` agents have an open session; return the seconds it took.

        Raises:
            TimeoutError: fewer are online after ``timeout`` seconds; the message has the counts.
        """
        started = time.monotonic()
        while True:
            status = self.status()
            if status["online"] >= count:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{status['online']} of {count} agents online after {timeout:g}s (errors: {status['errors']})")
            time.sleep(interval)

    def stop(self) -> dict[str, Any]:
        """Close every agent, end the worker processes and return their final counters."""
        replies = []
        for index, (process, connection) in enumerate(self.workers):
            try:
                replies.extend(self.request_all([(index, "stop", {})]))
            except (TimeoutError, EOFError, BrokenPipeError, ConnectionResetError) as error:
                logger.warning("failed: stopping agent worker %s (%s)", process.pid, error)
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
        self.workers.clear()
        self.loads.clear()
        return merge_status(replies)


def split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` shares that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def merge_status(replies: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"agents": 0, "online": 0, "sessions_opened": 0, "heartbeats_sent": 0,
                             "commands_run": 0, "updates_succeeded": 0}
    errors: collections.Counter[str] = collections.Counter()
    versions: collections.Counter[str] = collections.Counter()
    for reply in replies:
        for key in total:
            total[key] += reply[key]
        errors.update(reply["errors"])
        versions.update(reply["versions"])
    total["errors"] = dict(errors)
    total["versions"] = dict(versions)
    return total


def established_connections(pid: int, remote_port: int) -> int:
    """Count the established TCP connections that process ``pid`` has open to ``remote_port``.

    Matches the socket inodes in /proc/PID/fd against /proc/net/tcp and tcp6,
    so it counts only this process's sockets (Linux only).
    """
    inodes = set()
    fd_folder = f"/proc/{pid}/fd"
    for name in os.listdir(fd_folder):
        try:
            target = os.readlink(f"{fd_folder}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    remote, state, inode = fields[2], fields[3], fields[9]
                    if state == "01" and int(remote.rsplit(":", 1)[1], 16) == remote_port and inode in inodes:
                        count += 1
        except FileNotFoundError:
            continue
    return count
