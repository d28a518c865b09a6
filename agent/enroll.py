"""The ``install`` command: pin the manager's CA, register with an enrollment token, store the result."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import grpc

from agentmanager.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from agent.config import InstalledConfig, is_installed, load_config, parse_manager_address, save_config, utc_now_text
from agent.errors import AlreadyInstalledError, RejectedError, UnreachableError, UsageError
from agent.files import make_private_folder, remove_file, write_atomically
from agent.hostfacts import collect_host_facts
from agent.trust import fingerprint_of_pem, load_ca_file, normalize_fingerprint, pin_ca_by_fingerprint

logger = logging.getLogger("agentmgr.agent.enroll")

REGISTER_TIMEOUT_SECONDS = 20.0
_LABEL_KEY = re.compile(r"[a-z0-9_./-]{1,63}")
LABEL_VALUE_MAX_LENGTH = 255


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstallRequest:
    """The arguments of ``install``, checked by ``parse_install_request``."""

    manager: str
    token: str = dataclasses.field(repr=False)
    ca_fingerprint: str | None
    ca_file: Path | None
    labels: dict[str, str]
    replace: bool


def parse_label(text: str) -> tuple[str, str]:
    """Split ``key=value`` and check both parts the way the manager does.

    Raises:
        UsageError: the label is malformed.
    """
    key, separator, value = text.partition("=")
    if not separator or not _LABEL_KEY.fullmatch(key):
        raise UsageError(f"invalid --label {text!r}: expected key=value with a key of 1 to 63 characters of [a-z0-9_./-]")
    if len(value) > LABEL_VALUE_MAX_LENGTH or not value.isprintable():
        raise UsageError(f"invalid --label {key}: the value must be at most {LABEL_VALUE_MAX_LENGTH} printable characters")
    return key, value


def parse_install_request(
    *, manager: str, token: str | None, ca_fingerprint: str | None, ca_file: str | None, labels: list[str], replace: bool
) -> InstallRequest:
    """Check the arguments of ``install`` before anything touches the network or the disk.

    Raises:
        UsageError: an argument is missing or malformed.
    """
    parse_manager_address(manager)
    if not token:
        raise UsageError("missing enrollment token: pass --token TOKEN (or set AGENTMGR_AGENT_TOKEN) from `agentmgr token create`")
    if ca_fingerprint is None and ca_file is None:
        raise UsageError("missing CA pin: pass --ca-fingerprint sha256:HEX (printed by `agentmgr token create`) or --ca-file PATH")
    return InstallRequest(
        manager=manager.strip(),
        token=token.strip(),
        ca_fingerprint=None if ca_fingerprint is None else normalize_fingerprint(ca_fingerprint),
        ca_file=None if ca_file is None else Path(ca_file),
        labels=dict(parse_label(label) for label in labels),
        replace=replace,
    )


def install(request: InstallRequest, *, config_dir: Path, machine_id: str = "") -> InstalledConfig:
    """Pin the CA, register this host and write the install into ``config_dir``; return it.

    Nothing is written before the CA matches. The folder is checked for
    writing before Register, so a registration is not lost to a read-only disk.

    Raises:
        AlreadyInstalledError: ``config_dir`` contains an install and ``replace`` is false.
        CAMismatchError: the manager's CA does not match the pin.
        UnreachableError: the manager cannot be reached.
        RejectedError: the manager rejected the registration.
        UsageError: ``config_dir`` cannot be written.
    """
    if is_installed(config_dir) and not request.replace:
        raise AlreadyInstalledError(_already_installed_message(config_dir))

    # Trust: nothing is written until the CA matches the pin.
    host, port = parse_manager_address(request.manager)
    if request.ca_file is not None:
        ca_pem = load_ca_file(request.ca_file, request.ca_fingerprint)
    else:
        assert request.ca_fingerprint is not None
        ca_pem = pin_ca_by_fingerprint(host, port, request.ca_fingerprint)
    fingerprint = fingerprint_of_pem(ca_pem)
    logger.info("pinned: CA %s of manager %s", fingerprint, request.manager, extra={"manager": request.manager})

    check_writable(config_dir)
    facts = collect_host_facts(config_dir, labels=request.labels, machine_id=machine_id)
    response = register(request, ca_pem, facts)

    config = InstalledConfig(
        manager=request.manager,
        agent_id=response.agent_id,
        agent_key=response.agent_key,
        ca_pem=ca_pem,
        ca_fingerprint=fingerprint,
        labels=request.labels,
        installed_at=utc_now_text(),
        trusted_publisher_keys=tuple(response.trusted_publisher_keys),
    )
    try:
        save_config(config_dir, config)
    except OSError as error:
        raise UsageError(
            f"registered as agent {response.agent_id}, but writing {config_dir} failed ({error}); "
            "free space or fix permissions, then run install again with --replace and a token"
        ) from error
    logger.info(
        "installed: agent %s in %s (group %s, %d trusted publisher key(s))",
        response.agent_id, config_dir, response.group or "none", len(response.trusted_publisher_keys),
        extra={"agent_id": response.agent_id, "manager": request.manager},
    )
    if not response.trusted_publisher_keys:
        logger.warning(
            "pinned: no publisher keys, because the manager trusts none; this agent rejects every update "
            "until it is installed again after the manager sets AGENTMGR_UPDATES_TRUSTED_KEYS_FILE",
            extra={"agent_id": response.agent_id},
        )
    return config


def _already_installed_message(config_dir: Path) -> str:
    try:
        agent_id = load_config(config_dir).agent_id
    except Exception:  # noqa: BLE001 - only for the message
        agent_id = "unknown"
    return (
        f"an agent is already installed in {config_dir} (agent id {agent_id}); nothing was changed. "
        "Pass --replace to enroll again (the manager revokes the old agent), or run `agentmgr-agent uninstall` first"
    )


def check_writable(config_dir: Path) -> None:
    """Create ``config_dir`` with mode 0700 and prove a file can be written in it.

    Raises:
        UsageError: the folder cannot be created or written.
    """
    probe = config_dir / ".write-test"
    try:
        make_private_folder(config_dir)
        write_atomically(probe, b"", mode=0o600)
        remove_file(probe)
    except OSError as error:
        raise UsageError(
            f"failed to write the config folder {config_dir} ({error.strerror or error}); "
            "run install as root, or pass --config-dir with a folder you can write"
        ) from error


def register(request: InstallRequest, ca_pem: bytes, facts: common_pb2.HostFacts) -> agent_pb2.RegisterResponse:
    """Call Register over TLS pinned to ``ca_pem``.

    Raises:
        UnreachableError: the call failed without a reply from the manager.
        RejectedError: the manager rejected the request; the message carries its reason.
    """
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    message = agent_pb2.RegisterRequest(enrollment_token=request.token, facts=facts, replace=request.replace)
    with grpc.secure_channel(request.manager, credentials) as channel:
        try:
            return agent_pb2_grpc.AgentServiceStub(channel).Register(message, timeout=REGISTER_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            raise _register_error(request.manager, error) from None


def _register_error(manager: str, error: grpc.RpcError) -> Exception:
    code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnreachableError(
            f"Register at {manager} failed ({code.name}: {details}); check that the gateway runs and that "
            "its server certificate names this address (a certificate from another CA fails here too)"
        )
    hints = {
        grpc.StatusCode.UNAUTHENTICATED: "check the token, or ask an operator for a new one (`agentmgr token create`)",
        grpc.StatusCode.ALREADY_EXISTS: "pass --replace to revoke the existing agent of this machine and enroll again",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "too many failed registrations from this address; wait a minute and retry",
        grpc.StatusCode.FAILED_PRECONDITION: "ask an operator for a new token",
        grpc.StatusCode.INVALID_ARGUMENT: "fix the named value (a --label, or the host's name) and retry",
    }
    hint = hints.get(code, "see the manager's gateway log")
    return RejectedError(f"the manager rejected the registration ({code.name}: {details}); {hint}")
