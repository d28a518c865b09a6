"""Facts about this host that the agent reports at registration and at every session start."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import platform
import re
import socket
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path

from agentmanager.v1 import common_pb2

from agent import __version__
from agent.config import MACHINE_ID_FILE
from agent.files import make_private_folder, write_atomically

logger = logging.getLogger("agentmgr.agent.hostfacts")

MACHINE_ID_SOURCES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
OS_RELEASE_SOURCES = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
IPV6_INTERFACES_FILE = Path("/proc/net/if_inet6")

FACT_MAX_LENGTH = 64
"""Longest OS name, OS version and architecture the manager accepts; longer values are cut."""
MAX_ADDRESSES = 32
"""Most addresses the manager accepts in one report."""
_MACHINE_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")
_SIOCGIFADDR = 0x8915


def collect_host_facts(config_dir: Path, *, labels: Mapping[str, str], machine_id: str = "") -> common_pb2.HostFacts:
    """Return this host's facts with ``labels``; ``machine_id`` overrides the detected one.

    Raises:
        OSError: no machine id exists and a generated one cannot be stored in ``config_dir``.
    """
    os_name, os_version = read_os_release()
    return common_pb2.HostFacts(
        hostname=socket.gethostname(),
        machine_id=machine_id or read_machine_id(config_dir),
        os_name=os_name[:FACT_MAX_LENGTH],
        os_version=os_version[:FACT_MAX_LENGTH],
        architecture=platform.machine()[:FACT_MAX_LENGTH],
        agent_version=__version__,
        addresses=list_addresses(),
        labels=dict(labels),
    )


def read_machine_id(config_dir: Path) -> str:
    """Return /etc/machine-id, else an id generated once and kept in ``config_dir``.

    Raises:
        OSError: a generated id cannot be written.
    """
    for source in (*MACHINE_ID_SOURCES, config_dir / MACHINE_ID_FILE):
        try:
            text = source.read_text().strip()
        except OSError:
            continue
        if _MACHINE_ID.fullmatch(text):
            return text
        logger.warning("skipped: machine id in %s (not 8 to 128 characters of [A-Za-z0-9._:-])", source)
    generated = uuid.uuid4().hex
    make_private_folder(config_dir)
    write_atomically(config_dir / MACHINE_ID_FILE, generated.encode() + b"\n", mode=0o644)
    logger.info("created: machine id in %s (no /etc/machine-id)", config_dir / MACHINE_ID_FILE)
    return generated


def read_os_release() -> tuple[str, str]:
    """Return the OS name and version from os-release, else from the kernel."""
    for source in OS_RELEASE_SOURCES:
        try:
            lines = source.read_text().splitlines()
        except OSError:
            continue
        fields = {}
        for line in lines:
            name, separator, value = line.partition("=")
            if separator:
                fields[name.strip()] = value.strip().strip("\"'")
        name = fields.get("NAME") or fields.get("ID") or ""
        version = fields.get("VERSION_ID") or fields.get("VERSION") or ""
        if name:
            return name, version
    return platform.system(), platform.release()


def list_addresses() -> list[str]:
    """Return the host's non-loopback, non-link-local interface addresses, IPv4 first, at most 32.

    A failure to read one source is logged at debug and yields fewer addresses,
    never an error, because addresses are informative only.
    """
    found: list[str] = []
    for address in (*_ipv4_addresses(), *_ipv6_addresses()):
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            continue
        if parsed.is_loopback or parsed.is_link_local or parsed.is_unspecified:
            continue
        text = str(parsed)
        if text not in found:
            found.append(text)
    return found[:MAX_ADDRESSES]


def _ipv4_addresses() -> list[str]:
    addresses = []
    try:
        interfaces = socket.if_nameindex()
    except OSError as error:
        logger.debug("failed: listing network interfaces (%s)", error)
        return []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in interfaces:
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # the interface has no IPv4 address
            addresses.append(socket.inet_ntoa(reply[20:24]))
    return addresses


def _ipv6_addresses() -> list[str]:
    try:
        lines = IPV6_INTERFACES_FILE.read_text().splitlines()
    except OSError as error:
        logger.debug("failed: reading %s (%s)", IPV6_INTERFACES_FILE, error)
        return []
    addresses = []
    for line in lines:
        hex_address = line.split()[0] if line.split() else ""
        if len(hex_address) == 32:
            addresses.append(":".join(hex_address[i : i + 4] for i in range(0, 32, 4)))
    return addresses
