"""The commands a session delivers: each id runs at most once, within a limit of concurrent runs.

``CommandRunner`` journals every id before its process starts, sends
CommandAck and CommandResult through the current session, and keeps each
result in the journal until the manager confirms it with ResultStored.
Commands outlive a lost session, and their results are resent on the next.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from google.protobuf import duration_pb2, timestamp_pb2

from agentmanager.v1 import agent_pb2

from agent.executor import execute
from agent.journal import EntryState, Journal, command_key
from agent.logs import bind_context

logger = logging.getLogger("agentmgr.agent.commands")

FALLBACK_TIMEOUT_SECONDS = 3600.0
"""Timeout of a command whose request carries none (the gateway always sets one)."""
STOP_SECONDS = 15.0
"""Time running commands get at shutdown to be killed and reaped."""

Sender = Callable[[agent_pb2.AgentMessage], bool]
"""Queues a message on the current session and returns False while disconnected."""


def seconds_of(message: duration_pb2.Duration) -> float:
    return message.seconds + message.nanos / 1_000_000_000


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(seconds * 1_000_000_000))
    return message


def timestamp_now() -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.GetCurrentTime()
    return message


class CommandRunner:
    """Accepts CommandRequests, runs them in slots and reports their results; one per agent process."""

    def __init__(
        self,
        *,
        journal: Journal,
        send: Sender,
        max_concurrent: int,
        kill_grace_seconds: float,
        max_output_bytes: Callable[[], int],
    ) -> None:
        self.journal = journal
        self.send = send
        self.kill_grace_seconds = kill_grace_seconds
        self.max_output_bytes = max_output_bytes
        """Returns the output cap of the current session, read when a command starts."""
        self.slots = asyncio.Semaphore(max_concurrent)
        self.running: set[str] = set()
        """Ids of commands accepted in this process and not finished, including those waiting for a slot."""
        self.started_count = 0
        """Commands that hold a slot and run now."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.tasks_by_id: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()
        """Ids an operator cancelled while they waited or ran in this process."""
        self.stopping = False

    def report_interrupted(self) -> None:
        """Turn the journal entries of commands that an earlier process left running into results."""
        for command_id in self.journal.interrupted():
            result = agent_pb2.CommandResult(
                command_id=command_id,
                error="interrupted: the agent stopped while the command ran; it is not run again",
            )
            self.journal.record_result(result)
            logger.warning("interrupted: command %s (the agent stopped while it ran)", command_id, extra={"command_id": command_id})

    def resend_unconfirmed(self) -> None:
        results = self.journal.unconfirmed_results()
        for result in results:
            self.send(agent_pb2.AgentMessage(command_result=result))
        if results:
            logger.info("resent: %d result(s) the manager has not confirmed", len(results), extra={"results": len(results)})

    async def stop(self) -> None:
        """Cancel every command, which kills its process group; safe to call twice."""
        self.stopping = True
        tasks = [task for task in self.tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_SECONDS)
            logger.info("stopped: %d running command(s) killed (%d did not stop in time)", len(tasks), len(pending))

    def confirm_result(self, command_id: str) -> None:
        try:
            known = self.journal.mark_stored(command_id)
        except ValueError:
            logger.warning("skipped: result confirmation with invalid command id %r", command_id[:64])
            return
        except OSError as error:
            logger.error("failed: recording the stored result of command %s (%s)", command_id, error, extra={"command_id": command_id})
            return
        if known:
            logger.debug("confirmed: result of command %s", command_id, extra={"command_id": command_id})

    def accept(self, request: agent_pb2.CommandRequest) -> None:
        """Start ``request`` unless its id ran already, is running, or it expired."""
        try:
            command_id = command_key(request.command_id)
        except ValueError:
            logger.warning("skipped: command request with invalid id %r", request.command_id[:64])
            return
        with bind_context(command_id=command_id):
            if command_id in self.running:
                logger.info("skipped: command %s (already running)", command_id)
                return
            state = self.journal.state(command_id)
            if state is EntryState.FINISHED:
                # The manager may have lost the result: send the kept copy again.
                kept = self.journal.result(command_id)
                if kept is not None:
                    self.send(agent_pb2.AgentMessage(command_result=kept))
                logger.info("skipped: command %s (already run; result resent)", command_id)
                return
            if state is not None:
                logger.info("skipped: command %s (already run)", command_id)
                return
            self.running.add(command_id)
            task = asyncio.create_task(self.run(command_id, request))
            self.tasks.add(task)
            self.tasks_by_id[command_id] = task
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(lambda _: self.tasks_by_id.pop(command_id, None))

    def cancel(self, command_id_text: str) -> None:
        """Stop a command an operator cancelled: kill its process group, or never start it."""
        try:
            command_id = command_key(command_id_text)
        except ValueError:
            logger.warning("skipped: cancellation with invalid command id %r", command_id_text[:64])
            return
        task = self.tasks_by_id.get(command_id)
        if task is None or task.done():
            logger.info("skipped: cancellation of command %s (not running here)", command_id, extra={"command_id": command_id})
            return
        self.cancelled.add(command_id)
        task.cancel()
        logger.info("cancelling: command %s (by an operator)", command_id, extra={"command_id": command_id})

    async def run(self, command_id: str, request: agent_pb2.CommandRequest) -> None:
        """Run one accepted command in a slot, journal its result and send it."""
        try:
            async with self.slots:
                if self.stopping:
                    return
                if request.HasField("expires_at") and request.expires_at.ToDatetime(datetime.timezone.utc) <= datetime.datetime.now(datetime.timezone.utc):
                    result = agent_pb2.CommandResult(
                        command_id=command_id,
                        error=f"not started: the command expired at {request.expires_at.ToJsonString()} before the agent could start it",
                    )
                    self.finish(result)
                    return
                try:
                    self.journal.record_started(command_id)
                except OSError as error:
                    logger.error("failed: journaling command %s (%s); not running it", command_id, error)
                    self.send(agent_pb2.AgentMessage(command_result=agent_pb2.CommandResult(
                        command_id=command_id, error=f"not started: the agent cannot write its journal ({error})",
                    )))
                    return
                self.send(agent_pb2.AgentMessage(command_ack=agent_pb2.CommandAck(command_id=command_id, started_at=timestamp_now())))
                timeout = seconds_of(request.timeout)
                if timeout <= 0:
                    logger.warning("defaulted: command %s has no timeout; using %gs", command_id, FALLBACK_TIMEOUT_SECONDS)
                    timeout = FALLBACK_TIMEOUT_SECONDS
                logger.info("started: command %s (timeout %gs)", command_id, timeout)
                self.started_count += 1
                try:
                    execution = await execute(
                        request.command_line,
                        timeout_seconds=timeout,
                        max_output_bytes=self.max_output_bytes(),
                        kill_grace_seconds=self.kill_grace_seconds,
                    )
                except asyncio.CancelledError:
                    if command_id not in self.cancelled:
                        raise
                    # execute() killed the process group before it let the cancellation through.
                    logger.info("cancelled: command %s (process group killed)", command_id)
                    self.finish(agent_pb2.CommandResult(command_id=command_id, error="cancelled by an operator"))
                    return
                finally:
                    self.started_count -= 1
                result = agent_pb2.CommandResult(
                    command_id=command_id,
                    exit_code=execution.exit_code,
                    stdout=execution.stdout,
                    stderr=execution.stderr,
                    stdout_truncated=execution.stdout_truncated,
                    stderr_truncated=execution.stderr_truncated,
                    duration=duration(execution.duration_seconds),
                    timed_out=execution.timed_out,
                    error=execution.error,
                )
                logger.info(
                    "finished: command %s (exit code %s%s)", command_id, execution.exit_code,
                    ", timed out" if execution.timed_out else "",
                    extra={"exit_code": execution.exit_code, "timed_out": execution.timed_out,
                           "duration_seconds": round(execution.duration_seconds, 3)},
                )
                self.finish(result)
        except asyncio.CancelledError:
            if command_id not in self.cancelled:
                raise
            logger.info("cancelled: command %s before it started", command_id)
        finally:
            self.running.discard(command_id)
            self.cancelled.discard(command_id)

    def finish(self, result: agent_pb2.CommandResult) -> None:
        """Keep ``result`` in the journal and send it if a session is open."""
        try:
            self.journal.record_result(result)
        except OSError as error:
            # Sent anyway; only a resend after a reconnect is lost.
            logger.error("failed: journaling the result of command %s (%s)", result.command_id, error)
        if not self.send(agent_pb2.AgentMessage(command_result=result)):
            logger.info("kept: result of command %s until the manager is reachable", result.command_id)
