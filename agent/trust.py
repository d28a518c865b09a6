"""Pin the manager's CA on first contact: read the certificates the gateway presents, unverified,
and keep the one whose SHA-256 fingerprint the operator gave.

Reading the chain without verification is safe here because nothing from the
connection is trusted until a certificate matches the fingerprint, which came
to the operator over another channel (``agentmgr token create``). Every later
connection verifies the server against that CA alone.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import CAMismatchError, UnreachableError, UsageError

PROBE_TIMEOUT_SECONDS = 10.0
_FINGERPRINT = re.compile(r"sha256:([0-9a-f]{64})")


def normalize_fingerprint(text: str) -> str:
    """Return ``sha256:`` and 64 lower-case hex digits; colons and case in the input are ignored.

    Raises:
        UsageError: the text is not a SHA-256 fingerprint.
    """
    candidate = text.strip().lower()
    if candidate.startswith("sha256:"):
        candidate = "sha256:" + candidate[len("sha256:") :].replace(":", "")
    if not _FINGERPRINT.fullmatch(candidate):
        raise UsageError(
            f"invalid --ca-fingerprint {text!r}: expected sha256: followed by 64 hex digits, "
            "as `agentmgr token create` prints it"
        )
    return candidate


def fingerprint_of_der(der: bytes) -> str:
    return f"sha256:{hashlib.sha256(der).hexdigest()}"


def fingerprint_of_pem(pem: bytes) -> str:
    """Return the fingerprint of the first certificate in ``pem``.

    Raises:
        ValueError: ``pem`` contains no certificate.
    """
    certificate = x509.load_pem_x509_certificate(pem)
    return fingerprint_of_der(certificate.public_bytes(serialization.Encoding.DER))


def fetch_presented_chain(host: str, port: int, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> list[bytes]:
    """Return the DER certificates the server at ``host:port`` presents in its TLS handshake, unverified.

    Raises:
        UnreachableError: the connection or the handshake failed.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # gRPC servers require HTTP/2 by ALPN during the handshake.
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as connection:
                # NOTE: get_unverified_chain is private before Python 3.13; fall back to the leaf.
                chain_reader = getattr(connection._sslobj, "get_unverified_chain", None)  # noqa: SLF001
                if chain_reader is not None:
                    return [certificate.public_bytes(ssl._ssl.ENCODING_DER) for certificate in chain_reader() or []]  # type: ignore[attr-defined]  # noqa: SLF001
                leaf = connection.getpeercert(binary_form=True)
                return [leaf] if leaf else []
    except (OSError, ssl.SSLError) as error:
        raise UnreachableError(
            f"failed to reach the manager at {host}:{port} over TLS ({error}); check the address "
            "and that the manager's gateway runs and is reachable from this host"
        ) from error


def pin_ca_by_fingerprint(host: str, port: int, fingerprint: str) -> bytes:
    """Return the PEM of the CA certificate that the manager presents and that matches ``fingerprint``.

    Raises:
        UnreachableError: the manager cannot be reached.
        CAMismatchError: no presented certificate matches, or the match is not a CA certificate.
    """
    chain = fetch_presented_chain(host, port)
    for der in chain:
        if fingerprint_of_der(der) != fingerprint:
            continue
        certificate = x509.load_der_x509_certificate(der)
        check_is_ca(certificate, f"the certificate with fingerprint {fingerprint}")
        return certificate.public_bytes(serialization.Encoding.PEM)
    # The presented fingerprints are not shown: copying one from here would defeat the pin.
    raise CAMismatchError(
        f"the manager at {host}:{port} presents no CA certificate with fingerprint {fingerprint}; "
        "nothing was written. This is either a wrong fingerprint or another server at that address: "
        "copy the fingerprint from `agentmgr token create` on the manager, or pass --ca-file with a "
        "copy of the manager's ca.pem"
    )


def load_ca_file(path: Path, fingerprint: str | None) -> bytes:
    """Return the PEM of the CA certificate in ``path``, checked against ``fingerprint`` when given.

    Raises:
        UsageError: the file is unreadable or contains no certificate.
        CAMismatchError: the fingerprint differs, or the certificate is not a CA certificate.
    """
    try:
        pem = path.read_bytes()
        certificate = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as error:
        raise UsageError(f"failed to read a PEM certificate from --ca-file {path}: {error}") from error
    actual = fingerprint_of_der(certificate.public_bytes(serialization.Encoding.DER))
    if fingerprint is not None and actual != fingerprint:
        raise CAMismatchError(
            f"the CA in {path} has fingerprint {actual}, not {fingerprint}; nothing was written. "
            "Check that the file and the fingerprint come from the same manager"
        )
    check_is_ca(certificate, f"the certificate in {path}")
    return certificate.public_bytes(serialization.Encoding.PEM)


def check_is_ca(certificate: x509.Certificate, what: str) -> None:
    """Raise CAMismatchError unless ``certificate`` has the CA basic constraint."""
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CAMismatchError(
            f"{what} is not a CA certificate (it lacks the CA basic constraint); "
            "pin the manager's CA, not its server certificate. Nothing was written"
        )
