"""``agentmgr-agent``: install, run, status and uninstall the endpoint agent.

Exit statuses are listed in ``agent.errors.ExitCode``. Every failure prints
one line to stderr with what failed and what to do next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from agent import __version__
from agent.config import AgentSettings, load_config, remove_config
from agent.enroll import install, parse_install_request
from agent.errors import AgentError, ExitCode, LockedError, UsageError
from agent.files import make_private_folder
from agent.journal import Journal
from agent.launcher import Launcher
from agent.logs import bind_context, configure_logging, flush_logs
from agent.session import AgentRunner
from agent.status import StatusFile
from agent.update import is_launched
from agent.versions import VersionStore

logger = logging.getLogger("agentmgr.agent")

LOCK_FILE = "run.lock"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmgr-agent",
        description="Endpoint agent of the Agent Manager: enrolls this host and runs the manager's commands.",
    )
    parser.add_argument("--version", action="version", version=f"agentmgr-agent {__version__}")
    folders = argparse.ArgumentParser(add_help=False)
    folders.add_argument(
        "--config-dir", metavar="DIR",
        help="folder with the manager address, agent id, pinned CA and key "
        "(default: $AGENTMGR_AGENT_CONFIG_DIR, else /etc/agentmgr-agent)",
    )
    folders.add_argument(
        "--state-dir", metavar="DIR",
        help="folder with the command journal and connection state "
        "(default: $AGENTMGR_AGENT_STATE_DIR, else /var/lib/agentmgr-agent)",
    )
    folders.add_argument(
        "--log-dir", metavar="DIR", help="folder of the rotating JSON log (default: $AGENTMGR_AGENT_LOG_DIR, else STATE_DIR/log)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enroll = commands.add_parser("install", parents=[folders], help="enroll this host with an enrollment token")
    enroll.add_argument("--manager", required=True, metavar="HOST:PORT", help="address of the manager's gateway")
    enroll.add_argument("--token", metavar="TOKEN", help="enrollment token (default: $AGENTMGR_AGENT_TOKEN)")
    enroll.add_argument("--ca-fingerprint", metavar="sha256:HEX", help="SHA-256 fingerprint of the manager's CA to pin")
    enroll.add_argument("--ca-file", metavar="PATH", help="PEM file of the manager's CA to pin (instead of, or checked against, the fingerprint)")
    enroll.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label to report; repeatable")
    enroll.add_argument("--replace", action="store_true", help="overwrite an existing install and revoke this machine's old agent")

    commands.add_parser("run", parents=[folders], help="keep the session with the manager open, run its commands and install its updates (foreground)")

    status = commands.add_parser("status", parents=[folders], help="show the install and the last connection state")
    status.add_argument("--output", choices=("text", "json"), default="text", help="output format (default: text)")

    commands.add_parser("uninstall", parents=[folders], help="remove the config and key of this host's agent")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``agentmgr-agent`` command and return its exit status."""
    arguments = build_parser().parse_args(argv)
    try:
        settings = AgentSettings.load(config_dir=arguments.config_dir, state_dir=arguments.state_dir, log_dir=arguments.log_dir)
        handler = {"install": run_install, "run": run_agent, "status": show_status, "uninstall": run_uninstall}[arguments.command]
        return handler(settings, arguments)
    except AgentError as error:
        if logging.getLogger().handlers:
            logger.error("failed: %s (%s)", arguments.command, error, extra={"exit_code": int(error.exit_code)})
        print(f"agentmgr-agent {arguments.command}: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        logger.warning("stopped: %s (interrupted)", arguments.command)
        return int(ExitCode.INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - the one place that turns any error into a status
        logger.exception("failed: %s (unexpected error)", arguments.command)
        print(f"agentmgr-agent {arguments.command}: unexpected error: {error!r}; the log has the traceback", file=sys.stderr)
        return int(ExitCode.FAILURE)
    finally:
        flush_logs()


# Commands.


def run_install(settings: AgentSettings, arguments: argparse.Namespace) -> int:
    request = parse_install_request(
        manager=arguments.manager,
        token=arguments.token or os.environ.get("AGENTMGR_AGENT_TOKEN"),
        ca_fingerprint=arguments.ca_fingerprint,
        ca_file=arguments.ca_file,
        labels=arguments.label,
        replace=arguments.replace,
    )
    configure_logging(settings.log_dir, settings.log_level, stderr=False)
    with bind_context(manager=request.manager):
        config = install(request, config_dir=settings.config_dir, machine_id=settings.machine_id)
    print(config.agent_id)
    folders = "".join(
        f" --{name}-dir {getattr(arguments, name + '_dir')}"
        for name in ("config", "state", "log")
        if getattr(arguments, name + "_dir", None)
    )
    print(
        f"installed: agent {config.agent_id} of manager {config.manager}, config in {settings.config_dir}. "
        f"Start it with `systemctl enable --now agentmgr-agent` or `agentmgr-agent run{folders}`.",
        file=sys.stderr,
    )
    return int(ExitCode.OK)


def run_agent(settings: AgentSettings, arguments: argparse.Namespace) -> int:
    """Run the launcher, or the session loop when this process is the launcher's child."""
    config = load_config(settings.config_dir)
    configure_logging(settings.log_dir, settings.log_level)
    try:
        make_private_folder(settings.state_dir)
    except OSError as error:
        raise UsageError(f"failed to create the state folder {settings.state_dir} ({error}); pass --state-dir or run as root") from error
    if not is_launched():
        # NOTE: the launcher and its child both append to agent.log. When one rotates the file, the
        # other keeps writing to the rotated file until it restarts; the launcher logs only a few lines per start.
        with hold_run_lock(settings.state_dir):
            logger.info("starting: launcher of agentmgr-agent %s (state %s)", __version__, settings.state_dir)
            status = Launcher(settings=settings, store=VersionStore(settings.state_dir)).run()
            logger.info("stopped: launcher (status %d)", status)
        return status
    # The launcher holds the state folder's lock for its child.
    with bind_context(manager=config.manager):
        logger.info(
            "starting: agentmgr-agent %s (manager %s, config %s, state %s)",
            __version__, config.manager, settings.config_dir, settings.state_dir,
        )
        runner = AgentRunner(settings=settings, config=config, journal=Journal(settings.state_dir), status=StatusFile(settings.state_dir))
        asyncio.run(runner.serve())
        if runner.restart_requested:
            logger.info("stopped: agentmgr-agent %s, to restart into the installed update", __version__)
            return int(ExitCode.UPDATE_INSTALLED)
        logger.info("stopped: agentmgr-agent")
    return int(ExitCode.OK)


def show_status(settings: AgentSettings, arguments: argparse.Namespace) -> int:
    config = load_config(settings.config_dir)
    state = StatusFile(settings.state_dir).read() or {}
    versions = VersionStore(settings.state_dir)
    pending = versions.read_pending()
    report: dict[str, Any] = {
        "manager": config.manager,
        "agent_id": config.agent_id,
        "version": __version__,
        "selected_version": versions.current_version() or "installed",
        "pending_update": None if pending is None else f"{pending.version} (rollout {pending.rollout_id})",
        "trusted_publisher_keys": len(config.trusted_publisher_keys),
        "ca_fingerprint": config.ca_fingerprint,
        "installed_at": config.installed_at,
        "config_dir": str(settings.config_dir),
        "state_dir": str(settings.state_dir),
        "connection_state": state.get("state", "never_run"),
        "connection_state_since": state.get("since"),
        "last_connected_at": state.get("last_connected_at"),
        "updated_at": state.get("updated_at"),
        "last_error": state.get("last_error") or None,
        "running_version": state.get("version"),
        "gateway_instance_id": state.get("gateway_instance_id"),
        "run_pid": state.get("pid"),
    }
    write_report(report, arguments.output, sys.stdout)
    return int(ExitCode.OK)


def write_report(report: dict[str, Any], output: str, stream: IO[str]) -> None:
    if output == "json":
        json.dump(report, stream, indent=2)
        stream.write("\n")
        return
    width = max(len(name) for name in report)
    for name, value in report.items():
        stream.write(f"{name.ljust(width)}  {'-' if value is None else value}\n")


def run_uninstall(settings: AgentSettings, arguments: argparse.Namespace) -> int:
    config = load_config(settings.config_dir)
    configure_logging(settings.log_dir, settings.log_level, stderr=False)
    with hold_run_lock(settings.state_dir, required_for="uninstall"):
        removed = remove_config(settings.config_dir)
        StatusFile(settings.state_dir).remove()
    logger.info("uninstalled: agent %s (%d file(s) removed)", config.agent_id, len(removed), extra={"agent_id": config.agent_id})
    print(f"removed: config and key of agent {config.agent_id} from {settings.config_dir}")
    # NOTE: AgentService has no call for an agent to unregister itself, so the manager is not notified.
    print(
        f"The manager was not notified because it has no call for an agent to unregister, so agent {config.agent_id} stays "
        "listed there (offline). An operator deletes it with the panel's DeleteAgent to revoke its key.",
        file=sys.stderr,
    )
    return int(ExitCode.OK)


@contextlib.contextmanager
def hold_run_lock(state_dir: Path, *, required_for: str = "run") -> Iterator[None]:
    """Hold the state folder's exclusive lock, so two agents never share one journal.

    Raises:
        LockedError: another ``agentmgr-agent run`` holds it.
    """
    if not state_dir.is_dir():
        yield
        return
    with open(state_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            action = "stop it first (`systemctl stop agentmgr-agent`)" if required_for == "uninstall" else "stop the other one, or pass another --state-dir"
            raise LockedError(f"another agentmgr-agent run uses the state folder {state_dir}; {action}") from None
        yield


if __name__ == "__main__":
    sys.exit(main())
