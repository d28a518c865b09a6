"""Benchmark scenarios. Each one measures against a running ``BenchStack`` and returns its section.

The runner (``bench.run``) decides the order, because several scenarios share a
connected fleet: capacity grows the fleet step by step, and the round trip and
the reconnect storm run at the sizes the capacity steps reached.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import random
import statistics
import threading
import time
import uuid

import redis

from agent.releases import generate_key_pair, load_private_key, manifest_for, parse_public_keys, sign_manifest
from bench import ingest
from bench.report import load_line, percentile, section
from bench.simulator import Credentials, Fleet
from bench.stack import BenchStack, cpu_percent, sample_process
from services.core import routing
from services.core.fleet import commands, releases, rollouts
from services.core.fleet.rollouts import RolloutState, Selection
from services.core.settings import Settings
from services.core.keys import COMMAND_FINISHED_CHANNEL
from services.grpc_gateway.heartbeats import BATCH_SECONDS
from tests.support import free_port

ONLINE_TIMEOUT_SECONDS = 600
FAN_OUT_THREADS = 4
"""Concurrent command inserts during a fan-out; the stack's database pool has 4 connections."""
FAN_OUT_TIMEOUT_SECONDS = 300
MIB = 1024 * 1024


@dataclasses.dataclass
class Context:
    """State shared by the scenarios: the stack, the fleet, enrolled agents and the command line shown."""

    stack: BenchStack
    fleet: Fleet
    command: str
    credentials: list[Credentials] = dataclasses.field(default_factory=list)
    connected: int = 0
    idle_rss_bytes: int = 0
    baseline_streams: int = 0
    baseline_bytes_per_stream: float = 0.0


class FinishedListener:
    """Record when each command id arrives on the gateways' command-finished channel (background thread)."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(COMMAND_FINISHED_CHANNEL)
        self.finished: dict[str, float] = {}
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.listen, daemon=True, name="bench-finished-listener")
        self.thread.start()

    def listen(self) -> None:
        while not self.stopping:
            message = self.pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            command_id = json.loads(message["data"])["command_id"]
            with self.condition:
                self.finished[command_id] = time.monotonic()
                self.condition.notify_all()

    def wait_for(self, command_ids: set[str], timeout: float) -> set[str]:
        """Wait until every id has finished or ``timeout`` passes; return the ids still missing."""
        deadline = time.monotonic() + timeout
        with self.condition:
            while missing := command_ids - self.finished.keys():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return missing
                self.condition.wait(remaining)
        return set()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        self.pubsub.close()


def gateway_samples(stack: BenchStack, window_seconds: float) -> list[dict[str, float]]:
    """Measure each gateway's CPU over ``window_seconds`` and its RSS at the end."""
    before = [sample_process(pid) for pid in stack.gateway_pids]
    time.sleep(window_seconds)
    after = [sample_process(pid) for pid in stack.gateway_pids]
    return [{"rss": end.rss_bytes, "cpu": cpu_percent(start, end)} for start, end in zip(before, after)]


# Enrollment.


def enrollment(context: Context, count: int) -> str:
    """Register ``count`` agents with one token; keep their credentials in ``context``."""
    load_before = load_line()
    credentials, errors, seconds = context.fleet.register(context.stack.enrollment_token(), count, workers=2, concurrency=16)
    context.credentials.extend(credentials)
    rate = len(credentials) / seconds
    verdict = "met" if rate >= 200 else "missed"
    body = [
        "Two client processes with 16 concurrent Register calls each, one enrollment token.",
        "",
        "| registrations | errors | seconds | per second | target (>= 200/s) |",
        "| ---: | --- | ---: | ---: | --- |",
        f"| {len(credentials)} | {errors or 'none'} | {seconds:.1f} | {rate:.0f} | {verdict} |",
        "",
    ]
    return section("bench-enrollment", "Enrollment: registrations per second", context.command, body, load_before=load_before)


# Capacity.


@dataclasses.dataclass
class CapacityStep:
    agents: int
    connect_seconds: float
    samples: list[dict[str, float]]
    client_rss_bytes: int


def measure_idle(context: Context, window_seconds: float) -> None:
    context.idle_rss_bytes = sum(sample["rss"] for sample in gateway_samples(context.stack, window_seconds))


def measure_stream_baseline(context: Context, streams: int) -> None:
    """Measure a bare grpc.aio TLS server's memory per idle stream, the floor under the gateway's memory per agent."""
    tls_dir = context.stack.root / "home" / "tls"
    address = f"127.0.0.1:{free_port()}"
    context.baseline_streams = streams
    context.baseline_bytes_per_stream = ingest.echo_memory_per_stream(
        address, context.stack.ca_certificate, tls_dir, streams=streams, clients=2)


def grow_fleet(context: Context, agents: int, window_seconds: float) -> CapacityStep:
    """Connect agents until ``agents`` are online, let them heartbeat, then sample the gateways."""
    context.fleet.connect(context.credentials[context.connected:agents])
    context.connected = agents
    seconds = context.fleet.wait_online(agents, timeout=ONLINE_TIMEOUT_SECONDS)
    samples = gateway_samples(context.stack, window_seconds)
    client_rss = sum(sample_process(pid).rss_bytes for pid in context.fleet.pids)
    return CapacityStep(agents, seconds, samples, client_rss)


def capacity_section(context: Context, steps: list[CapacityStep], window_seconds: float, load_before: str) -> str:
    heartbeat = Settings.from_env(context.stack.env).heartbeat_interval_seconds
    body = [
        f"{context.stack.gateway_count} gateway process(es) sharing the port (SO_REUSEPORT), heartbeat interval "
        f"{heartbeat:g} s, each agent on its own TLS connection. CPU is averaged over {window_seconds:g} s after all "
        "agents are online, in percent of one core. Memory per agent is the growth of the gateways' RSS over their "
        f"idle RSS ({context.idle_rss_bytes / MIB:.0f} MiB in total) divided by the agents. The baseline is a bare "
        f"grpc.aio echo server in one process with {context.baseline_streams} idle streams, each on its own TLS "
        f"connection and opened one after another, measured in the same run: "
        f"{context.baseline_bytes_per_stream / 1024:.1f} KiB per stream. The agents connect all at once, which "
        "raises the memory per connection of any grpc.aio server, so the ratio includes that effect.",
        "",
        "| agents | time to all online (s) | gateway RSS per process (MiB) | total RSS (MiB) | CPU per process (%) "
        "| KiB per agent | ratio to bare server | simulator RSS (MiB) | target: 10,000 under 1 GiB |",
        "| ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for step in steps:
        total = sum(sample["rss"] for sample in step.samples)
        per_agent = (total - context.idle_rss_bytes) / step.agents / 1024
        verdict = "-"
        if step.agents >= 10_000:
            verdict = "met" if total < 1024 * MIB else "missed"
        rss_each = ", ".join(f"{sample['rss'] / MIB:.0f}" for sample in step.samples)
        cpu_each = ", ".join(f"{sample['cpu']:.0f}" for sample in step.samples)
        body.append(
            f"| {step.agents} | {step.connect_seconds:.1f} | {rss_each} | {total / MIB:.0f} | {cpu_each} "
            f"| {per_agent:.1f} | {per_agent * 1024 / context.baseline_bytes_per_stream:.2f} "
            f"| {step.client_rss_bytes / MIB:.0f} | {verdict} |"
        )
    body.append("")
    return section("bench-capacity", "Capacity: connected, heartbeating agents", context.command, body, load_before=load_before)


# Heartbeat ingest.


def heartbeat_ingest(context: Context, *, streams: int, clients: int, seconds: float) -> str:
    """Flood heartbeats on ``streams`` sessions over ``clients`` processes; compare with the echo server."""
    load_before = load_line()
    stack = context.stack
    credentials, errors, _ = context.fleet.register(stack.enrollment_token(), streams, workers=1, concurrency=8)
    if errors:
        raise RuntimeError(f"failed to register the ingest agents: {errors}")

    shares = [credentials[index::clients] for index in range(clients)]
    tls_dir = stack.root / "home" / "tls"
    echo_address = f"127.0.0.1:{free_port()}"
    echo_rate = ingest.measure_echo(echo_address, stack.ca_certificate, tls_dir, servers=stack.gateway_count, plans=[
        ingest.LoadPlan(echo_address, stack.ca_certificate, "echo", share, seconds) for share in shares])

    metrics_addresses = [gateway.env["AGENTMGR_GATEWAY_METRICS_ADDRESS"] for gateway in stack.gateways]
    gateway_rate = ingest.measure_gateway(metrics_addresses, [
        ingest.LoadPlan(stack.address, stack.ca_certificate, "gateway", share, seconds) for share in shares])
    ratio = gateway_rate / echo_rate

    body = [
        f"{streams} streams over {clients} client processes write Heartbeat messages as fast as HTTP/2 flow "
        f"control allows, for {seconds:g} s (the first {ingest.WARM_UP_SECONDS:g} s not counted). The baseline is "
        f"{stack.gateway_count} bare grpc.aio echo server process(es) on one port with the same TLS certificate, "
        "parsing and writing back each message. The gateway's rate is the growth of `agentmgr_heartbeats_total`; "
        "each heartbeat there updates the last-seen sorted set and the session key in Redis, in batches written "
        f"every {BATCH_SECONDS * 1000:g} ms. The gateway does not answer heartbeats, while the echo server writes "
        "every message back, so the ratio can exceed 1. The clients share "
        "the 2 cores with the servers, so both rates are lower than on a machine with spare cores.",
        "",
        "| server | messages per second | ratio to echo | target (>= 0.5) |",
        "| --- | ---: | ---: | --- |",
        f"| bare grpc.aio echo (baseline) | {echo_rate:.0f} | 1.00 | |",
        f"| gateway Session heartbeats | {gateway_rate:.0f} | {ratio:.2f} | {'met' if ratio >= 0.5 else 'missed'} |",
        "",
    ]
    return section("bench-ingest", "Heartbeat ingest against a bare echo server", context.command, body, load_before=load_before)


# Command round trip and fan-out.


def active_agent_ids(context: Context) -> list[uuid.UUID]:
    return [uuid.UUID(item.agent_id) for item in context.credentials[:context.connected]]


def send_command(stack: BenchStack, agent_id: uuid.UUID) -> str:
    """Create a command as an operator request does and publish it to the agent's gateway; return its id."""
    command = stack.run(
        commands.create_command, agent_id=agent_id, command_line="echo bench", timeout_seconds=60,
        expires_in_seconds=600, reason="benchmark", requested_by="bench",
    )
    routing.publish_to_agent(stack.redis, agent_id, {"kind": "command", "command_id": str(command.id)})
    return str(command.id)


def round_trips(context: Context, count: int) -> list[float]:
    """Send ``count`` commands one after another to random connected agents; return each round trip in seconds."""
    listener = FinishedListener(context.stack.redis)
    agent_ids = active_agent_ids(context)
    latencies = []
    try:
        for _ in range(count):
            started = time.monotonic()
            command_id = send_command(context.stack, random.choice(agent_ids))
            if listener.wait_for({command_id}, timeout=30):
                raise TimeoutError(f"command {command_id} not finished within 30s")
            latencies.append(listener.finished[command_id] - started)
    finally:
        listener.close()
    return latencies


def fan_out(context: Context) -> dict[str, float]:
    """Send one command to every connected agent; return the seconds to queue them all and to store every result.

    Each command gets its own transaction, as one RunCommand call does. A single
    transaction that locks a thousand agent rows FOR SHARE deadlocks with the
    gateways' batched last-seen UPDATE, which locks the same rows in another order.
    """
    listener = FinishedListener(context.stack.redis)
    agent_ids = active_agent_ids(context)
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(FAN_OUT_THREADS) as pool:
            command_ids = set(pool.map(lambda agent_id: send_command(context.stack, agent_id), agent_ids))
        queued = time.monotonic() - started
        missing = listener.wait_for(command_ids, timeout=FAN_OUT_TIMEOUT_SECONDS)
        finished = time.monotonic() - started
    finally:
        listener.close()
    return {"agents": len(agent_ids), "queued": queued, "finished": finished, "missing": len(missing)}


def round_trip_section(context: Context, results: list[tuple[int, list[float]]], fan_outs: list[dict[str, float]],
                       load_before: str) -> str:
    body = [
        "The round trip starts when a command is created in PostgreSQL "
        "(`services.core.fleet.commands.create_command`, as an operator's RunCommand does) and published with "
        "`routing.publish_to_agent`. It ends when the gateway announces the stored result on "
        "`agentmgr:commands:finished`. The time includes the insert, Redis routing, delivery on the stream, "
        "the simulated agent's ack and result, and their storage. Commands are sent one after another to random "
        "connected agents.",
        "",
        "| agents connected | commands | p50 (ms) | p99 (ms) | max (ms) | target: p99 < 50 ms with 1,000 |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for agents, latencies in results:
        p99 = percentile(latencies, 0.99) * 1000
        verdict = "-"
        if agents == 1000:
            verdict = "met" if p99 < 50 else "missed"
        body.append(
            f"| {agents} | {len(latencies)} | {statistics.median(latencies) * 1000:.1f} | {p99:.1f} "
            f"| {max(latencies) * 1000:.1f} | {verdict} |")
    body += [
        "",
        "Fan-out: one command to every connected agent, each created in its own transaction and published at once, "
        f"{FAN_OUT_THREADS} at a time.",
        "",
        "| agents | seconds to queue all | seconds until every result is stored | results per second | missing |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in fan_outs:
        body.append(
            f"| {result['agents']} | {result['queued']:.1f} | {result['finished']:.1f} "
            f"| {result['agents'] / result['finished']:.0f} | {result['missing']} |")
    body.append("")
    return section("bench-commands", "Command round trip and fan-out", context.command, body, load_before=load_before)


# Reconnect storm.


def open_sessions(stack: BenchStack) -> int:
    """Sum the gateways' ``agentmgr_connected_agents`` gauges: agent sessions open on the server side."""
    return int(ingest.metric_sum(
        [gateway.env["AGENTMGR_GATEWAY_METRICS_ADDRESS"] for gateway in stack.gateways], "agentmgr_connected_agents"))


def wait_sessions(stack: BenchStack, count: int, *, timeout: float) -> None:
    """Wait until the gateways hold ``count`` sessions; raise TimeoutError with the count reached."""
    deadline = time.monotonic() + timeout
    sessions = 0
    while sessions < count:
        try:
            sessions = open_sessions(stack)
        except OSError:
            sessions = 0  # The metrics endpoint starts shortly after the gRPC port.
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sessions} of {count} sessions open on the gateways after {timeout:g}s")
        time.sleep(0.5)


def reconnect_storm(context: Context) -> str:
    """Restart every gateway under the connected fleet; measure the time until all agents are online again."""
    load_before = load_line()
    fleet, stack = context.fleet, context.stack
    errors_before = fleet.status()["errors"]
    started = time.monotonic()
    stack.stop_gateways()
    stopped = time.monotonic()
    stack.start_gateways()
    listening = time.monotonic()
    error = ""
    try:
        # The simulator's own count lags when its processes are starved of CPU, because a
        # worker notices a dead stream only when its event loop runs. So both counts must agree.
        wait_sessions(stack, context.connected, timeout=ONLINE_TIMEOUT_SECONDS)
        fleet.wait_online(context.connected, timeout=ONLINE_TIMEOUT_SECONDS)
    except TimeoutError as timeout:
        error = str(timeout)
    online_at = time.monotonic()
    status = fleet.status()
    sessions = open_sessions(stack)
    errors = {code: count - errors_before.get(code, 0) for code, count in status["errors"].items()
              if count != errors_before.get(code, 0)}
    total = online_at - started
    verdict = "met" if not error and total <= 60 else "missed"
    body = [
        f"Every gateway process gets SIGTERM (sessions end with UNAVAILABLE) and is started again while "
        f"{context.connected} agents keep reconnecting with jittered exponential backoff from 0.5 s up to 5 s.",
        "",
        "| agents | stop (s) | start until listening (s) | listening until all online (s) | total (s) "
        "| online at the end (simulator / gateways) | client errors during the storm | target: all within 60 s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        f"| {context.connected} | {stopped - started:.1f} | {listening - stopped:.1f} | {online_at - listening:.1f} "
        f"| {total:.1f} | {status['online']} / {sessions} | {errors or 'none'} | {verdict} |",
        "",
    ]
    if error:
        body += [f"Not all agents came back: {error}", ""]
    return section("bench-reconnect", "Reconnect storm: gateway restart under load", context.command, body, load_before=load_before)


# Rollout.


def publish_release(stack: BenchStack, version: str, size_bytes: int) -> releases.Release:
    """Sign a random artifact of ``size_bytes`` and store it as a release, as `agentmgr updates publish` does."""
    pem, public_line = generate_key_pair()
    artifact = stack.root / f"agent-{version}.tar.gz"
    artifact.write_bytes(os.urandom(size_bytes))
    manifest_bytes, signature = sign_manifest(
        load_private_key(pem), manifest_for(artifact, version=version, os_name="linux", architecture="any"))
    store = releases.store_from_settings(Settings.from_env(stack.env))
    release, _ = stack.run(
        releases.add_release, store, manifest_bytes=manifest_bytes, signature=signature,
        trusted_keys=parse_public_keys(public_line), open_artifact=lambda: io.BytesIO(artifact.read_bytes()),
        source="bench", actor="bench",
    )
    return release


def rollout(context: Context, agents: int, *, size_bytes: int, max_parallel: int) -> str:
    """Connect ``agents`` agents, roll a release of ``size_bytes`` out to them and time it until completed."""
    load_before = load_line()
    stack, fleet = context.stack, context.fleet
    fleet.connect(context.credentials[:agents])
    context.connected = agents
    fleet.wait_online(agents, timeout=ONLINE_TIMEOUT_SECONDS)

    version = f"2.0.{uuid.uuid4().hex[:6]}"
    release = publish_release(stack, version, size_bytes)
    stack.start_updater()

    try:
        started = time.monotonic()
        created, _ = stack.run(
            rollouts.create_rollout, target_version=version,
            selection=Selection(agent_ids=tuple(uuid.UUID(item.agent_id) for item in context.credentials[:agents])),
            waves=[100], max_parallel=max_parallel, failure_threshold_percent=5, agent_timeout_seconds=600,
            created_by="bench",
        )
        deadline = started + ONLINE_TIMEOUT_SECONDS
        state = created.state
        while time.monotonic() < deadline:
            state = stack.run(rollouts.get_rollout, created.id).state
            if state not in (RolloutState.PENDING, RolloutState.RUNNING):
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started
        progress = {state: count for state, count in stack.run(rollouts.progress, created.id).items() if count}
    finally:
        stack.stop_updater()

    status = fleet.status()
    megabytes = release.size_bytes * progress.get("succeeded", 0) / MIB
    body = [
        f"A signed release of {release.size_bytes / MIB:.1f} MiB, one wave of all {agents} agents, "
        f"at most {max_parallel} in flight, with the updater worker (`python -m services.updater`) advancing the "
        "rollout. Each simulated agent downloads the artifact with DownloadArtifact (retrying when every download "
        "slot is busy), checks its SHA-256, reconnects with the new version in Hello and reports "
        "UPDATE_STATE_SUCCEEDED.",
        "",
        "| agents | final state | seconds | agents per second | MiB per second served | agents by state | client errors |",
        "| ---: | --- | ---: | ---: | ---: | --- | --- |",
        f"| {agents} | {state.value} | {seconds:.1f} | {progress.get('succeeded', 0) / seconds:.1f} "
        f"| {megabytes / seconds:.0f} | {progress} | {status['errors'] or 'none'} |",
        "",
    ]
    return section("bench-rollout", f"Rollout: {agents} agents, {release.size_bytes / MIB:.0f} MiB artifact",
                   context.command, body, load_before=load_before)

