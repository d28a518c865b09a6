"""The gateway's TLS files: load the configured ones, or create a private CA once.

With no ``AGENTMGR_TLS_*`` files configured, the first gateway to start creates
an ECDSA P-256 CA and a server certificate signed by it under
``$AGENTMGR_HOME/tls/``. When only the server certificate is missing, a new one
is issued by the existing CA, so agents keep trusting the gateway. Agents pin that CA by its SHA-256 fingerprint at
install. Creation holds an exclusive file lock, so several gateway processes
starting together end up with one CA.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import ipaddress
import logging
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.files import write_atomically
from services.core.errors import TLSError
from services.core.settings import Settings

logger = logging.getLogger(__name__)

CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
"""Validity of a generated server certificate; docs/operations.md explains renewal."""

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"


@dataclasses.dataclass(frozen=True)
class TLSMaterial:
    """PEM bytes the gateway serves with, and the CA that agents pin."""

    certificate_chain: bytes
    private_key: bytes
    ca_certificate: bytes

    @property
    def ca_fingerprint(self) -> str:
        """``sha256:`` followed by the hex SHA-256 of the CA certificate in DER form."""
        return certificate_fingerprint(self.ca_certificate)


def certificate_fingerprint(pem: bytes) -> str:
    """Return ``sha256:HEX`` for the first certificate in ``pem``."""
    certificate = x509.load_pem_x509_certificate(pem)
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    return f"sha256:{digest}"


def load_tls_material(settings: Settings) -> TLSMaterial:
    """Return the configured TLS files, or the generated ones, creating them if needed.

    Raises:
        TLSError: a configured file is missing or unreadable, or the files
            under ``$AGENTMGR_HOME/tls`` cannot be written.
    """
    if settings.tls_cert_file and settings.tls_key_file and settings.tls_ca_file:
        return TLSMaterial(
            certificate_chain=_read(settings.tls_cert_file, "AGENTMGR_TLS_CERT_FILE"),
            private_key=_read(settings.tls_key_file, "AGENTMGR_TLS_KEY_FILE"),
            ca_certificate=_read(settings.tls_ca_file, "AGENTMGR_TLS_CA_FILE"),
        )
    folder = settings.tls_dir
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / SERVER_CERT_FILE).exists():
                _create_server_certificate(folder, settings.tls_server_names)
    except OSError as error:
        raise TLSError(f"cannot create TLS files in {folder}: {error}") from error
    return TLSMaterial(
        certificate_chain=_read(folder / SERVER_CERT_FILE, "generated server certificate"),
        private_key=_read(folder / SERVER_KEY_FILE, "generated server key"),
        ca_certificate=_read(folder / CA_FILE, "generated CA certificate"),
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TLSError(f"cannot read {what} {path}: {error.strerror}") from error


def _create_server_certificate(folder: Path, server_names: tuple[str, ...]) -> None:
    """Issue a server certificate, from the existing CA when its key is there, else from a new CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    hostname = socket.gethostname()
    if (folder / CA_KEY_FILE).exists() and (folder / CA_FILE).exists():
        ca_key = serialization.load_pem_private_key((folder / CA_KEY_FILE).read_bytes(), password=None)
        ca_certificate = x509.load_pem_x509_certificate((folder / CA_FILE).read_bytes())
        created_ca = False
    else:
        ca_key, ca_certificate = _new_ca(hostname, now)
        created_ca = True

    server_key = ec.generate_private_key(ec.SECP256R1())
    alternative_names: list[x509.GeneralName] = []
    for name in dict.fromkeys((hostname, *server_names)):
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative_names.append(x509.DNSName(name))
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_certificate.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    # Keys first and the server certificate last: its presence marks a complete set.
    if created_ca:
        write_atomically(folder / CA_KEY_FILE, _private_pem(ca_key), mode=0o600)
        write_atomically(folder / CA_FILE, ca_certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    write_atomically(folder / SERVER_KEY_FILE, _private_pem(server_key), mode=0o600)
    write_atomically(
        folder / SERVER_CERT_FILE,
        server_certificate.public_bytes(serialization.Encoding.PEM),
        mode=0o644,
    )
    logger.info(
        "created: %s server certificate in %s",
        "private CA and" if created_ca else "a new",
        folder,
        extra={
            "ca_fingerprint": certificate_fingerprint(ca_certificate.public_bytes(serialization.Encoding.PEM)),
            "server_names": [str(name.value) for name in alternative_names],
            "new_ca": created_ca,
        },
    )


def _new_ca(hostname: str, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Agent Manager CA ({hostname})")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_certificate


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
