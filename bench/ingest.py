"""Heartbeat ingest: the gateway's Session stream against a bare grpc.aio echo server.

Both servers get the same load: client processes that each open several
TLS connections and write Heartbeat messages on a bidirectional stream as fast
as flow control lets them. The gateway's rate is the growth of its
``agentmgr_heartbeats_total`` counter; the echo server's rate is the number of
echoed messages the clients read. Both are counted over the same window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import multiprocessing.synchronize
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from agentmanager.v1 import agent_pb2, agent_pb2_grpc
from bench.simulator import INITIAL_VERSION, Credentials, channel_options, host_facts
from bench.stack import sample_process

ECHO_METHOD = "/bench.Echo/Echo"
WARM_UP_SECONDS = 2.0


def run_echo_server(address: str, key_file: str, cert_file: str) -> None:
    """Serve ECHO_METHOD over TLS until killed: each AgentMessage read is written back (child process entry point)."""

    async def echo(request_iterator, context):
        async for message in request_iterator:
            yield message

    async def serve() -> None:
        handler = grpc.method_handlers_generic_handler("bench.Echo", {
            "Echo": grpc.stream_stream_rpc_method_handler(
                echo, request_deserializer=agent_pb2.AgentMessage.FromString,
                response_serializer=agent_pb2.AgentMessage.SerializeToString),
        })
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])
        server.add_secure_port(address, credentials)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Load of one client process: the server it targets, its streams and the duration."""

    address: str
    ca_certificate: bytes
    target: str
    """"gateway" (AgentService.Session, after Hello) or "echo" (ECHO_METHOD)."""
    credentials: list[Credentials]
    """One agent per stream for the gateway; for the echo server only the length counts."""
    seconds: float


def run_load(plan: LoadPlan, results: multiprocessing.Queue) -> None:
    """Write heartbeats on every stream for ``plan.seconds``; put (echoed after warm-up, seconds) (child entry point)."""
    results.put(asyncio.run(load(plan)))


async def load(plan: LoadPlan) -> tuple[int, float]:
    credentials = grpc.ssl_channel_credentials(root_certificates=plan.ca_certificate)
    heartbeat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat())
    echoed = 0
    counting = False
    stop_at = time.monotonic() + plan.seconds

    async def stream(agent: Credentials) -> None:
        async with grpc.aio.secure_channel(plan.address, credentials, options=channel_options()) as channel:
            if plan.target == "gateway":
                metadata = (("x-agent-id", agent.agent_id), ("x-agent-key", agent.agent_key))
                call = agent_pb2_grpc.AgentServiceStub(channel).Session(metadata=metadata, wait_for_ready=True)
                hello = agent_pb2.Hello(agent_version=INITIAL_VERSION, facts=host_facts(agent, INITIAL_VERSION))
                await call.write(agent_pb2.AgentMessage(hello=hello))
                await call.read()  # SessionSettings
            else:
                method = channel.stream_stream(
                    ECHO_METHOD, request_serializer=agent_pb2.AgentMessage.SerializeToString,
                    response_deserializer=agent_pb2.AgentMessage.FromString)
                call = method(wait_for_ready=True)

                async def read_echoes() -> None:
                    nonlocal echoed
                    async for _ in call:
                        if counting:
                            echoed += 1

                reader = asyncio.create_task(read_echoes())
            while time.monotonic() < stop_at:
                await call.write(heartbeat)
            await call.done_writing()
            if plan.target == "echo":
                await reader
            else:
                call.cancel()

    async def start_counting() -> None:
        nonlocal counting
        await asyncio.sleep(WARM_UP_SECONDS)
        counting = True

    counter = asyncio.create_task(start_counting())
    await asyncio.gather(*(stream(agent) for agent in plan.credentials))
    await counter
    return echoed, plan.seconds - WARM_UP_SECONDS


def metric_sum(metrics_addresses: list[str], name: str) -> float:
    """Sum the unlabelled metric ``name`` over the gateways' Prometheus endpoints."""
    total = 0.0
    for address in metrics_addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(f"{name} "):
                    total += float(line.split()[1])
    return total


def heartbeats_counted(metrics_addresses: list[str]) -> float:
    """Sum ``agentmgr_heartbeats_total`` over the gateways."""
    return metric_sum(metrics_addresses, "agentmgr_heartbeats_total")


def drive(plans: list[LoadPlan]) -> tuple[list[multiprocessing.process.BaseProcess], multiprocessing.Queue]:
    """Start one client process per plan; each puts its result on the returned queue."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=run_load, args=(plan, results), daemon=True) for plan in plans]
    for process in processes:
        process.start()
    return processes, results


def echo_server_process(context: Any, address: str, tls_dir: Path) -> multiprocessing.process.BaseProcess:
    """Return an unstarted echo server process for ``address`` with the gateway's TLS files in ``tls_dir``."""
    return context.Process(
        target=run_echo_server, args=(address, str(tls_dir / "server.key"), str(tls_dir / "server.pem")), daemon=True)


def measure_echo(address: str, ca_certificate: bytes, tls_dir: Path, *, servers: int, plans: list[LoadPlan]) -> float:
    """Start ``servers`` echo processes on ``address``, run ``plans`` against them and return messages per second."""
    context = multiprocessing.get_context("spawn")
    echo_servers = [echo_server_process(context, address, tls_dir) for _ in range(servers)]
    for server in echo_servers:
        server.start()
    try:
        time.sleep(1.0)
        processes, results = drive(plans)
        replies = [results.get(timeout=plans[0].seconds + 60) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        return sum(echoed for echoed, _ in replies) / replies[0][1]
    finally:
        for server in echo_servers:
            server.kill()
            server.join()


def measure_gateway(metrics_addresses: list[str], plans: list[LoadPlan]) -> float:
    """Run ``plans`` against the gateways and return heartbeats stored per second over the counting window."""
    processes, results = drive(plans)
    time.sleep(WARM_UP_SECONDS + 0.5)
    before, started = heartbeats_counted(metrics_addresses), time.monotonic()
    time.sleep(plans[0].seconds - WARM_UP_SECONDS - 1.0)
    after, ended = heartbeats_counted(metrics_addresses), time.monotonic()
    for _ in processes:
        results.get(timeout=60)
    for process in processes:
        process.join(timeout=30)
    return (after - before) / (ended - started)


if __name__ == "__main__":
    run_echo_server(*sys.argv[1:4])


# Memory baseline: idle streams on the bare echo server.


def hold_streams(address: str, ca_certificate: bytes, count: int, ready: multiprocessing.Queue,
                 release: multiprocessing.synchronize.Event) -> None:
    """Open ``count`` echo streams, each on its own TLS connection, and keep them idle until ``release`` is set.

    The streams open one after another: a burst of thousands of handshakes leaves
    the server with more memory per connection, by an amount that varies from run
    to run, and the baseline is meant to be the stable floor. Each stream writes
    one Heartbeat and reads its echo, so it is fully set up on the server. Puts
    the number of streams open on ``ready`` (child process entry point).
    """

    async def run() -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_certificate)
        heartbeat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat())
        channels, calls = [], []
        for _ in range(count):
            channel = grpc.aio.secure_channel(address, credentials, options=channel_options())
            call = channel.stream_stream(
                ECHO_METHOD, request_serializer=agent_pb2.AgentMessage.SerializeToString,
                response_deserializer=agent_pb2.AgentMessage.FromString)(wait_for_ready=True)
            await call.write(heartbeat)
            await call.read()
            channels.append(channel)
            calls.append(call)
        ready.put(len(calls))
        while not release.is_set():
            await asyncio.sleep(0.5)
        for channel in channels:
            await channel.close()

    asyncio.run(run())


def echo_memory_per_stream(address: str, ca_certificate: bytes, tls_dir: Path, *, streams: int, clients: int) -> float:
    """Return the bare echo server's RSS growth per idle TLS stream, in bytes, with ``streams`` open."""
    context = multiprocessing.get_context("spawn")
    server = echo_server_process(context, address, tls_dir)
    server.start()
    ready, release = context.Queue(), context.Event()
    holders: list[multiprocessing.process.BaseProcess] = []
    try:
        time.sleep(1.0)
        idle = sample_process(server.pid).rss_bytes
        share = streams // clients
        holders = [context.Process(target=hold_streams, args=(address, ca_certificate, share, ready, release), daemon=True)
                   for _ in range(clients)]
        for holder in holders:
            holder.start()
        opened = sum(ready.get(timeout=300) for _ in holders)
        time.sleep(2.0)
        return (sample_process(server.pid).rss_bytes - idle) / opened
    finally:
        release.set()
        for holder in holders:
            holder.join(timeout=30)
        server.kill()
        server.join()
