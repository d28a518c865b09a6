"""Run one command line with ``/bin/sh -c`` in its own process group, bounded in time and output.

The command gets a clean environment, no stdin, ``/`` as working folder and a
new session (so a new process group). When the timeout passes, the whole
group gets SIGTERM, then SIGKILL after a grace period, so children that the
shell started die with it. Output beyond the cap is read and discarded (so
the command never blocks on a full pipe) and the result is flagged truncated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time

logger = logging.getLogger("agentmgr.agent.executor")

SHELL = "/bin/sh"
CLEAN_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
READ_CHUNK_BYTES = 64 * 1024
GROUP_EXIT_POLL_SECONDS = 0.05
PIPE_CLOSE_WAIT_SECONDS = 5.0
"""Time to finish reading output after the group was killed, for children that left the group."""


@dataclasses.dataclass(frozen=True)
class Execution:
    """Outcome of one command; ``exit_code`` is None when it did not exit on its own."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_seconds: float
    timed_out: bool
    error: str = ""


class _CappedBuffer:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


async def _drain(stream: asyncio.StreamReader, buffer: _CappedBuffer) -> None:
    while chunk := await stream.read(READ_CHUNK_BYTES):
        buffer.add(chunk)


def _signal_group(process_group: int, signum: int) -> bool:
    """Send ``signum`` to the group; return False when no process of it is left."""
    try:
        os.killpg(process_group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member changed its user id (setuid program); the others still got the signal.
        logger.warning("failed: signal %s to some of process group %d (permission denied)", signum, process_group)
    return True


async def kill_process_group(process_group: int, grace_seconds: float) -> None:
    """Send SIGTERM to the group, wait up to ``grace_seconds`` for it to go, then SIGKILL."""
    if not _signal_group(process_group, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(GROUP_EXIT_POLL_SECONDS)
        if not _signal_group(process_group, 0):
            return
    _signal_group(process_group, signal.SIGKILL)


async def execute(
    command_line: str,
    *,
    timeout_seconds: float,
    max_output_bytes: int,
    kill_grace_seconds: float,
) -> Execution:
    """Run ``command_line`` and return what it did; never raises for a failing command.

    The command ends when the shell has exited and both output pipes are
    closed (a background child that keeps them open counts as running), or
    when ``timeout_seconds`` pass, whichever comes first.
    """
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            SHELL,
            "-c",
            command_line,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=CLEAN_ENVIRONMENT,
            cwd="/",
            start_new_session=True,
        )
    except OSError as error:
        return Execution(None, b"", b"", False, False, time.monotonic() - started, False, f"failed to start {SHELL}: {error}")

    # start_new_session makes the shell the leader of a new group whose id is its pid.
    process_group = process.pid
    stdout, stderr = _CappedBuffer(max_output_bytes), _CappedBuffer(max_output_bytes)
    assert process.stdout is not None and process.stderr is not None
    finished = asyncio.gather(_drain(process.stdout, stdout), _drain(process.stderr, stderr), process.wait())
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(finished), timeout=timeout_seconds)
    except asyncio.TimeoutError:
        timed_out = True
        logger.info("timed out: command after %.1fs (killing its process group %d)", timeout_seconds, process_group)
        await kill_process_group(process_group, kill_grace_seconds)
        try:
            await asyncio.wait_for(finished, timeout=PIPE_CLOSE_WAIT_SECONDS)
        except asyncio.TimeoutError:
            # A child that left the group (setsid) keeps the pipes open, so stop reading them.
            logger.warning("abandoned: output of a process that left the command's process group %d", process_group)
            await process.wait()
    except asyncio.CancelledError:
        # The agent is stopping: leave no process of the command behind.
        await kill_process_group(process_group, kill_grace_seconds)
        finished.cancel()
        raise

    duration = time.monotonic() - started
    returncode = process.returncode
    exit_code = returncode if returncode is not None and returncode >= 0 and not timed_out else None
    error = ""
    if timed_out:
        error = f"timed out after {timeout_seconds:g}s; the process group was killed"
    elif returncode is not None and returncode < 0:
        error = f"killed by signal {_signal_name(-returncode)}"
    return Execution(
        exit_code=exit_code,
        stdout=bytes(stdout.data),
        stderr=bytes(stderr.data),
        stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated,
        duration_seconds=duration,
        timed_out=timed_out,
        error=error,
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
