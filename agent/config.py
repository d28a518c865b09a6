"""The agent's settings (environment and flags) and its installed config (files in the config folder).

Defaults live here, not in ``services/core/defaults.py``, because the agent
runs on hosts that do not have the manager's server side. Each
``AGENTMGR_AGENT_`` setting is read in ``AgentSettings.load``, the one place
where flags, the environment and the defaults meet.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import NotInstalledError, UsageError
from agent.files import make_private_folder, remove_file, write_atomically

DEFAULT_CONFIG_DIR = Path("/etc/agentmgr-agent")
"""AGENTMGR_AGENT_CONFIG_DIR: folder with the manager address, agent id, pinned CA and key (mode 0700)."""

DEFAULT_STATE_DIR = Path("/var/lib/agentmgr-agent")
"""AGENTMGR_AGENT_STATE_DIR: folder with the command journal and the connection state file."""

DEFAULT_LOG_DIR_NAME = "log"
"""AGENTMGR_AGENT_LOG_DIR defaults to this folder inside the state folder."""

DEFAULT_LOG_LEVEL = "INFO"
"""AGENTMGR_AGENT_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""

DEFAULT_BACKOFF_BASE_SECONDS = 1.0
"""AGENTMGR_AGENT_BACKOFF_BASE_SECONDS: upper bound, in seconds, of the first reconnect delay.
Each further failure doubles the bound; the delay is drawn uniformly below it (full jitter)."""

DEFAULT_BACKOFF_CAP_SECONDS = 60.0
"""AGENTMGR_AGENT_BACKOFF_CAP_SECONDS: largest reconnect delay bound, in seconds."""

DEFAULT_MAX_CONCURRENT_COMMANDS = 4
"""AGENTMGR_AGENT_MAX_CONCURRENT_COMMANDS: commands that run at once; later ones wait for a slot."""

DEFAULT_KILL_GRACE_SECONDS = 5.0
"""AGENTMGR_AGENT_KILL_GRACE_SECONDS: time, in seconds, between SIGTERM and SIGKILL to the process
group of a command that passed its timeout."""

DEFAULT_UPDATE_HEALTH_TIMEOUT_SECONDS = 120.0
"""AGENTMGR_AGENT_UPDATE_HEALTH_TIMEOUT_SECONDS: time, in seconds, a newly installed version has to
open a session with the manager before the launcher rolls back to the previous version. Keep it
well below the rollout's agent timeout (``agentmgr updates rollout --agent-timeout``), so the
rollback is reported before the manager counts the agent as timed out."""

DEFAULT_MACHINE_ID = ""
"""AGENTMGR_AGENT_MACHINE_ID: machine id to report instead of /etc/machine-id, for cloned images
that share one. Empty means /etc/machine-id, else an id generated once and kept in the config folder."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

CONFIG_FILE = "config.json"
CA_FILE = "ca.pem"
KEY_FILE = "agent.key"
MACHINE_ID_FILE = "machine-id"
TRUSTED_PUBLISHERS_FILE = "trusted_publishers.pub"

_ADDRESS = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})")


def parse_manager_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT`` into host and port.

    Raises:
        UsageError: the text is not of that form or the port is out of range.
    """
    match = _ADDRESS.fullmatch(text.strip())
    port = int(match["port"]) if match else 0
    if match is None or not 1 <= port <= 65535:
        raise UsageError(f"invalid manager address {text!r}: expected HOST:PORT or [IPV6]:PORT, such as manager.example:50051")
    return match["ipv6"] or match["host"], port


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """Folders and behaviour of the agent; the ``DEFAULT_`` constants above give each default."""

    config_dir: Path
    state_dir: Path
    log_dir: Path
    log_level: str
    backoff_base_seconds: float
    backoff_cap_seconds: float
    max_concurrent_commands: int
    kill_grace_seconds: float
    update_health_timeout_seconds: float
    machine_id: str

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config_dir: str | None = None,
        state_dir: str | None = None,
        log_dir: str | None = None,
    ) -> AgentSettings:
        """Resolve every setting: a flag wins over the environment, which wins over the default.

        Raises:
            UsageError: a setting has a value of the wrong form; the message names it.
        """
        env = os.environ if environ is None else environ

        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        def number(name: str, default: float, minimum: float, unit: str = "seconds") -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if not value >= minimum:  # also rejects NaN
                raise UsageError(f"invalid {name}={raw!r}: expected a number of {unit} >= {minimum:g}")
            return value

        resolved_state_dir = Path(state_dir or text("AGENTMGR_AGENT_STATE_DIR", str(DEFAULT_STATE_DIR)))
        level = text("AGENTMGR_AGENT_LOG_LEVEL", DEFAULT_LOG_LEVEL).upper()
        if level not in LOG_LEVELS:
            raise UsageError(f"invalid AGENTMGR_AGENT_LOG_LEVEL={level!r}: expected one of {', '.join(LOG_LEVELS)}")
        concurrency = number("AGENTMGR_AGENT_MAX_CONCURRENT_COMMANDS", DEFAULT_MAX_CONCURRENT_COMMANDS, 1, "commands")
        if concurrency != int(concurrency):
            raise UsageError(f"invalid AGENTMGR_AGENT_MAX_CONCURRENT_COMMANDS={concurrency!r}: expected a whole number >= 1")
        base = number("AGENTMGR_AGENT_BACKOFF_BASE_SECONDS", DEFAULT_BACKOFF_BASE_SECONDS, 0.01)
        cap = number("AGENTMGR_AGENT_BACKOFF_CAP_SECONDS", DEFAULT_BACKOFF_CAP_SECONDS, 0.01)
        if cap < base:
            raise UsageError(
                f"invalid AGENTMGR_AGENT_BACKOFF_CAP_SECONDS={cap}: expected at least "
                f"AGENTMGR_AGENT_BACKOFF_BASE_SECONDS ({base})"
            )
        return cls(
            config_dir=Path(config_dir or text("AGENTMGR_AGENT_CONFIG_DIR", str(DEFAULT_CONFIG_DIR))),
            state_dir=resolved_state_dir,
            log_dir=Path(log_dir or text("AGENTMGR_AGENT_LOG_DIR", str(resolved_state_dir / DEFAULT_LOG_DIR_NAME))),
            log_level=level,
            backoff_base_seconds=base,
            backoff_cap_seconds=cap,
            max_concurrent_commands=int(concurrency),
            kill_grace_seconds=number("AGENTMGR_AGENT_KILL_GRACE_SECONDS", DEFAULT_KILL_GRACE_SECONDS, 0),
            update_health_timeout_seconds=number(
                "AGENTMGR_AGENT_UPDATE_HEALTH_TIMEOUT_SECONDS", DEFAULT_UPDATE_HEALTH_TIMEOUT_SECONDS, 1
            ),
            machine_id=text("AGENTMGR_AGENT_MACHINE_ID", DEFAULT_MACHINE_ID),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstalledConfig:
    """The install that ``install`` stores and ``run`` reads: the manager address, the agent's identity and the pinned CA."""

    manager: str
    """HOST:PORT of the manager's gateway."""
    agent_id: str
    agent_key: str = dataclasses.field(repr=False)
    """The secret that authenticates the agent; kept in its own file with mode 0600."""
    ca_pem: bytes = dataclasses.field(repr=False)
    """The pinned CA certificate; the only root the agent trusts for the manager."""
    ca_fingerprint: str
    labels: dict[str, str]
    installed_at: str
    """ISO 8601 UTC time of the install."""
    trusted_publisher_keys: tuple[str, ...] = ()
    """Publisher public keys pinned at install, one ``ed25519 BASE64 [comment]`` line each; the only
    keys whose signatures make a release installable."""


def is_installed(config_dir: Path) -> bool:
    """Return whether ``config_dir`` contains a complete install (its config.json is written last)."""
    return (config_dir / CONFIG_FILE).is_file()


def load_config(config_dir: Path) -> InstalledConfig:
    """Read the install from ``config_dir``.

    Raises:
        NotInstalledError: the folder contains no complete install, or a file is unreadable.
    """
    if not is_installed(config_dir):
        raise NotInstalledError(
            f"no agent is installed in {config_dir}: run `agentmgr-agent install --manager HOST:PORT "
            "--token TOKEN --ca-fingerprint sha256:HEX` first (or pass the right --config-dir)"
        )
    try:
        document = json.loads((config_dir / CONFIG_FILE).read_text())
        agent_key = (config_dir / KEY_FILE).read_text().strip()
        ca_pem = (config_dir / CA_FILE).read_bytes()
        config = InstalledConfig(
            manager=str(document["manager"]),
            agent_id=str(uuid.UUID(document["agent_id"])),
            agent_key=agent_key,
            ca_pem=ca_pem,
            ca_fingerprint=str(document.get("ca_fingerprint", "")),
            labels={str(key): str(value) for key, value in document.get("labels", {}).items()},
            installed_at=str(document.get("installed_at", "")),
            trusted_publisher_keys=read_trusted_publisher_keys(config_dir),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise NotInstalledError(
            f"the install in {config_dir} is unreadable or incomplete ({error}); "
            "run `agentmgr-agent install ... --replace` to enroll again"
        ) from error
    if not config.agent_key:
        raise NotInstalledError(f"the key file {config_dir / KEY_FILE} is empty; run `agentmgr-agent install ... --replace`")
    return config


def save_config(config_dir: Path, config: InstalledConfig) -> None:
    """Write the install into ``config_dir`` (mode 0700): CA, publisher keys, key (0600), then config.json.

    Each file is replaced atomically, and config.json comes last, so a crash
    leaves either the previous complete install or an incomplete one that
    ``load_config`` rejects.

    Raises:
        OSError: the folder or a file cannot be written.
    """
    make_private_folder(config_dir)
    write_atomically(config_dir / CA_FILE, config.ca_pem, mode=0o644)
    publisher_keys = "".join(f"{line}\n" for line in config.trusted_publisher_keys)
    write_atomically(config_dir / TRUSTED_PUBLISHERS_FILE, publisher_keys.encode(), mode=0o644)
    write_atomically(config_dir / KEY_FILE, config.agent_key.encode() + b"\n", mode=0o600)
    document: dict[str, Any] = {
        "manager": config.manager,
        "agent_id": config.agent_id,
        "ca_fingerprint": config.ca_fingerprint,
        "labels": config.labels,
        "installed_at": config.installed_at,
    }
    write_atomically(config_dir / CONFIG_FILE, json.dumps(document, indent=2).encode() + b"\n", mode=0o600)


def read_trusted_publisher_keys(config_dir: Path) -> tuple[str, ...]:
    """Return the pinned publisher key lines, skipping blank lines and ``#`` comments.

    A missing file (an install made before keys were pinned) means no key is trusted.

    Raises:
        OSError: the file exists but cannot be read.
    """
    try:
        text = (config_dir / TRUSTED_PUBLISHERS_FILE).read_text()
    except FileNotFoundError:
        return ()
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def remove_config(config_dir: Path) -> list[Path]:
    """Delete the install's files (config.json first) and return the ones that existed.

    The generated machine id stays, because it identifies the host, not the install.
    """
    removed = []
    for name in (CONFIG_FILE, KEY_FILE, CA_FILE, TRUSTED_PUBLISHERS_FILE):
        if remove_file(config_dir / name):
            removed.append(config_dir / name)
    return removed


def utc_now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
