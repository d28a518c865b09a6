"""The start gate: a supervisord event listener that starts services after ``migrate``.

``updater`` and ``grpc_gateway`` have ``autostart=false``. This listener waits
for ``migrate`` to exit with status 0 and then starts them through
supervisord's XML-RPC interface. It also looks at ``migrate``'s state when it
starts itself, so a restarted gate does not miss an exit that happened while it
was down. Its stdout carries only the event listener protocol; it logs JSON to
stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import xmlrpc.client
from typing import Any, TextIO

from supervisor import childutils
from supervisor.states import ProcessStates

from services.core.logs import configure_logging, flush_logs

logger = logging.getLogger("agentmgr.start_gate")

SERVICE = "start_gate"
DEFAULT_DEPENDENTS = ("updater", "grpc_gateway")

# supervisord XML-RPC fault codes (supervisor/xmlrpc.py, Faults).
FAULT_BAD_NAME = 10
FAULT_ALREADY_STARTED = 60


class StartGate:
    """Start ``dependents`` each time ``migration_program`` exits with status 0."""

    def __init__(self, rpc: Any, *, migration_program: str = "migrate", dependents: tuple[str, ...] = DEFAULT_DEPENDENTS) -> None:
        self.rpc = rpc
        self.migration_program = migration_program
        self.dependents = dependents

    def check_on_start(self) -> None:
        """Start the dependents if ``migrate`` already exited with status 0."""
        try:
            info = self.rpc.supervisor.getProcessInfo(self.migration_program)
        except (xmlrpc.client.Fault, OSError) as error:
            logger.error("failed: read state of %s (%s)", self.migration_program, error, extra={"program": self.migration_program})
            return
        state = info["statename"]
        logger.info(
            "checked: %s is %s (exit status %s)",
            self.migration_program,
            state,
            info["exitstatus"],
            extra={"program": self.migration_program, "state": state, "exit_status": info["exitstatus"]},
        )
        if info["state"] == ProcessStates.EXITED and info["exitstatus"] == 0:
            self.start_dependents()

    def handle_event(self, headers: dict[str, str], payload: str) -> None:
        """React to one event; only ``PROCESS_STATE_EXITED`` of ``migrate`` matters."""
        if headers.get("eventname") != "PROCESS_STATE_EXITED":
            return
        fields = childutils.get_headers(payload)
        if fields.get("processname") != self.migration_program:
            return
        if fields.get("expected") == "1":
            logger.info("exited: %s (expected)", self.migration_program, extra={"program": self.migration_program})
            self.start_dependents()
            return
        status = self._exit_status()
        logger.error(
            "exited: %s (exit status %s; not starting %s)",
            self.migration_program,
            status,
            ", ".join(self.dependents),
            extra={"program": self.migration_program, "exit_status": status, "not_started": list(self.dependents)},
        )

    def start_dependents(self) -> None:
        """Ask supervisord to start every dependent program group."""
        for name in self.dependents:
            try:
                self.rpc.supervisor.startProcess(f"{name}:*", False)
            except xmlrpc.client.Fault as fault:
                if fault.faultCode == FAULT_ALREADY_STARTED:
                    logger.info("skipped: %s (already running)", name, extra={"program": name})
                    continue
                logger.error("failed: start %s (%s)", name, fault.faultString, extra={"program": name, "fault_code": fault.faultCode})
                continue
            except OSError as error:
                logger.error("failed: start %s (%s)", name, error, extra={"program": name})
                continue
            logger.info("started: %s", name, extra={"program": name})

    def _exit_status(self) -> int | None:
        try:
            return self.rpc.supervisor.getProcessInfo(self.migration_program)["exitstatus"]
        except (xmlrpc.client.Fault, OSError):
            return None


def serve(gate: StartGate, stdin: TextIO, stdout: TextIO) -> None:
    """Speak the event listener protocol on ``stdin``/``stdout`` until stdin closes."""
    gate.check_on_start()
    while True:
        childutils.listener.ready(stdout)
        line = stdin.readline()
        if not line:
            logger.info("stopping: %s (stdin closed)", SERVICE)
            return
        headers = childutils.get_headers(line)
        payload = stdin.read(int(headers["len"]))
        try:
            gate.handle_event(headers, payload)
        except Exception:
            logger.exception("failed: handle event %s", headers.get("eventname"))
        childutils.listener.send("OK", stdout)


def main(argv: list[str] | None = None) -> int:
    """Run the start gate under supervisord."""
    parser = argparse.ArgumentParser(prog="python -m services.migrate.gate", description=__doc__.splitlines()[0])
    parser.add_argument("--after", default="migrate", help="one-shot program that must exit 0 first")
    parser.add_argument(
        "--start",
        action="append",
        help="program or group to start after it (repeatable; default: updater and grpc_gateway)",
    )
    arguments = parser.parse_args(argv)
    configure_logging(SERVICE, os.environ.get("AGENTMGR_LOG_LEVEL", "INFO").upper(), stream=sys.stderr)
    if "SUPERVISOR_SERVER_URL" not in os.environ:
        logger.error("failed: %s must run as a supervisord event listener (SUPERVISOR_SERVER_URL is unset)", SERVICE)
        return 2
    gate = StartGate(
        childutils.getRPCInterface(os.environ),
        migration_program=arguments.after,
        dependents=tuple(arguments.start or DEFAULT_DEPENDENTS),
    )
    logger.info("starting: %s", SERVICE, extra={"after": gate.migration_program, "dependents": list(gate.dependents)})
    try:
        serve(gate, sys.stdin, sys.stdout)
    finally:
        flush_logs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
