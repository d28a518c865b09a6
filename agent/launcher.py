"""The launcher behind ``agentmgr-agent run``: starts the selected agent version as a child process,
puts a newly installed version on trial, and rolls it back when it does not become healthy.

The launcher is the code the agent was installed with, and it never
updates itself, so a broken release cannot break the launcher. It runs
``python -P -m agent run ...`` with ``PYTHONPATH`` set to the folder that
``updates/current`` selects, or unset when there is none, so that the
installed code runs. It forwards SIGTERM and SIGINT to the child and exits
with the child's exit status. The exception is ``ExitCode.UPDATE_INSTALLED``,
after which it starts the newly selected version.

A version on trial (``updates/pending.json`` exists) must open a session
with the manager within ``AGENTMGR_AGENT_UPDATE_HEALTH_TIMEOUT_SECONDS``;
it then writes ``updates/healthy.json``. If the child exits first, or the
time runs out, the launcher stops it, selects the previous version again,
records the rollout as rolled back with the reason, and starts the previous
version, which reports ROLLED_BACK on its next session.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from agent.config import AgentSettings
from agent.errors import ExitCode
from agent.update import LAUNCHER_PID_ENV
from agent.versions import PendingUpdate, RolloutRecord, UpdateState, VersionStore

logger = logging.getLogger("agentmgr.agent.launcher")

POLL_SECONDS = 0.2
"""Interval at which the launcher checks a child on trial for health or exit."""
MAX_RESTARTS_WITHOUT_PENDING = 3
"""Restarts requested by a child with no pending update before the launcher gives up (a child bug)."""
PR_SET_PDEATHSIG = 1


def ask_kernel_for_parent_death_signal() -> None:
    """Make the kernel send SIGTERM to this child when the launcher dies (Linux only), so no agent is orphaned."""
    library = ctypes.util.find_library("c")
    if library is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(library, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Launcher:
    """Runs the selected agent version and supervises the trial of a new one."""

    def __init__(self, *, settings: AgentSettings, store: VersionStore) -> None:
        self.settings = settings
        self.store = store
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None
        """The first SIGTERM or SIGINT received; the launcher then exits with the child."""

    # Lifecycle.

    def run(self) -> int:
        """Start children until one exits for a reason other than an update; return its exit status."""
        self.install_signal_handlers()
        restarts_without_pending = 0
        while True:
            pending = self.store.read_pending()
            if pending is not None and self.store.current_version() != pending.version:
                # A crash between the pending record and the switch: nothing new was selected.
                self.roll_back(pending, f"the switch to version {pending.version} did not complete")
                continue

            self.child = self.start_child()
            if self.stop_signal is not None:
                # The signal arrived while no child was running.
                self.child.send_signal(self.stop_signal)
            if pending is not None and not self.watch_trial(pending):
                continue
            status = self.wait_child()

            if self.stop_signal is not None or status != ExitCode.UPDATE_INSTALLED:
                return status
            if self.store.read_pending() is None:
                restarts_without_pending += 1
                if restarts_without_pending > MAX_RESTARTS_WITHOUT_PENDING:
                    logger.error("stopped: the agent asked %d times in a row to restart without a pending update",
                                 restarts_without_pending)
                    return int(ExitCode.FAILURE)
            else:
                restarts_without_pending = 0
            logger.info("restarting: into version %s", self.store.current_version() or "installed")

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle_signal)

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        """Forward the signal to the child and remember to exit with it."""
        if self.stop_signal is None:
            self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    # Children.

    def start_child(self) -> subprocess.Popen[bytes]:
        version = self.store.current_version()
        if version is not None and not self.store.version_dir(version).is_dir():
            logger.warning("missing: selected version %s in %s; selecting the installed code", version, self.store.versions)
            self.store.select(None)
            version = None
        environment = dict(os.environ)
        environment[LAUNCHER_PID_ENV] = str(os.getpid())
        if version is not None:
            folder = str(self.store.version_dir(version))
            inherited = environment.get("PYTHONPATH")
            environment["PYTHONPATH"] = folder if not inherited else f"{folder}{os.pathsep}{inherited}"
        # -P keeps the working folder off sys.path, so only PYTHONPATH or the install provide `agent`.
        command = [
            sys.executable, "-P", "-m", "agent", "run",
            "--config-dir", str(self.settings.config_dir),
            "--state-dir", str(self.settings.state_dir),
            "--log-dir", str(self.settings.log_dir),
        ]
        child = subprocess.Popen(command, env=environment, preexec_fn=ask_kernel_for_parent_death_signal)
        logger.info("started: agent version %s (pid %d)", version or "installed", child.pid, extra={"child_pid": child.pid})
        return child

    def wait_child(self) -> int:
        """Wait for the child to exit and return its status (128 + N after signal N, as shells report it)."""
        assert self.child is not None
        while True:
            try:
                status = self.child.wait()
                break
            except InterruptedError:
                continue
        status = 128 - status if status < 0 else status
        level = logging.INFO if status in (ExitCode.OK, ExitCode.UPDATE_INSTALLED) or self.stop_signal else logging.WARNING
        logger.log(level, "exited: agent (pid %d, status %d)", self.child.pid, status, extra={"exit_code": status})
        return status

    def stop_child(self) -> None:
        """Stop the child with SIGTERM, then SIGKILL after the kill grace plus a margin for its commands."""
        assert self.child is not None
        if self.child.poll() is not None:
            return
        self.child.send_signal(signal.SIGTERM)
        try:
            self.child.wait(timeout=self.settings.kill_grace_seconds + 5)
        except subprocess.TimeoutExpired:
            logger.warning("killing: agent (pid %d) did not stop after SIGTERM", self.child.pid)
            self.child.kill()
            self.child.wait()

    # Trial and rollback.

    def watch_trial(self, pending: PendingUpdate) -> bool:
        """Wait until the child on trial is healthy or gone; return False when it was stopped and a child must start again.

        That is the case after a rollback, and when the child became healthy
        only while it was being stopped. A stop signal during the trial ends
        the watch with the pending record kept, so the next start tries the
        new version again.
        """
        assert self.child is not None
        timeout = self.settings.update_health_timeout_seconds
        deadline = time.monotonic() + timeout
        logger.info("trying: version %s for up to %gs", pending.version, timeout, extra={"rollout_id": pending.rollout_id})
        while True:
            if self.store.is_healthy(pending):
                self.accept(pending)
                return True
            status = self.child.poll()
            if status is not None:
                if self.stop_signal is not None:
                    return True
                status = 128 - status if status < 0 else status
                self.roll_back(pending, f"version {pending.version} exited with status {status} before it opened a session")
                return False
            if time.monotonic() >= deadline:
                self.stop_child()
                # The child may have become healthy while it was stopping.
                if self.store.is_healthy(pending):
                    self.accept(pending)
                    return False
                self.roll_back(pending, f"version {pending.version} opened no session within {timeout:g}s")
                return False
            time.sleep(POLL_SECONDS)

    def accept(self, pending: PendingUpdate) -> None:
        """Keep the version on trial: clear the pending record and delete versions no longer needed."""
        self.store.clear_pending(pending.rollout_id)
        removed = self.store.prune_versions({pending.version, pending.previous_version or ""})
        logger.info(
            "updated: version %s is healthy; %s stays installed for the next rollback%s",
            pending.version, pending.previous_version or "the installed code",
            f" (removed {', '.join(removed)})" if removed else "",
            extra={"rollout_id": pending.rollout_id, "release_id": pending.release_id},
        )

    def roll_back(self, pending: PendingUpdate, reason: str) -> None:
        """Select the previous version again and record the rollback for the next session to report."""
        try:
            self.store.select(pending.previous_version)
        except FileNotFoundError:
            logger.warning("missing: previous version %s; selecting the installed code", pending.previous_version)
            self.store.select(None)
        self.store.write_record(RolloutRecord(
            rollout_id=pending.rollout_id, release_id=pending.release_id, version=pending.version,
            state=UpdateState.ROLLED_BACK, reason=reason, agent_version="", report_pending=True,
        ))
        self.store.clear_pending(pending.rollout_id)
        logger.warning(
            "rolled back: to version %s (%s)", pending.previous_version or "installed", reason,
            extra={"rollout_id": pending.rollout_id, "release_id": pending.release_id},
        )
