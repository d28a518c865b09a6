"""Signed release manifests, shared by the manager (which checks releases before it
stores them) and the agent (which checks them again before it installs one).

A release is an artifact file plus a manifest: a JSON object naming the
version, platform, size and SHA-256 of the artifact. A publisher signs the
manifest bytes exactly as stored with an Ed25519 key. Verification needs only
the publisher's public key, so it works without any network.

Files of a release ``F`` (made by ``agentmgr release sign F``):
``F`` itself, ``F.manifest.json`` and ``F.sig`` (base64 of the 64-byte signature).
Public keys are written one per line as ``ed25519 BASE64 [comment]``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST_FORMAT = "agentmgr-release/1"
MANIFEST_SUFFIX = ".manifest.json"
SIGNATURE_SUFFIX = ".sig"
MAX_MANIFEST_BYTES = 16 * 1024
KEY_TYPE = "ed25519"

_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
_PLATFORM_PART = re.compile(r"^[a-z0-9_]{1,32}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK_BYTES = 1024 * 1024


class ReleaseError(Exception):
    """A manifest, signature, key or artifact failed a check; the message says which."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleaseManifest:
    """Description of one artifact of one version for one platform, as its publisher signs it."""

    version: str
    os_name: str
    """Operating system the artifact runs on, such as ``linux``."""
    architecture: str
    """CPU architecture such as ``x86_64``, or ``any`` for a pure-Python artifact."""
    size_bytes: int
    sha256: str
    """Lower-case hex SHA-256 of the artifact."""
    file_name: str
    created_at: str
    """UTC time of signing, ISO 8601."""

    def to_bytes(self) -> bytes:
        """Return the canonical JSON form that is signed and stored."""
        document = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "os": self.os_name,
            "architecture": self.architecture,
            "size": self.size_bytes,
            "sha256": self.sha256,
            "file": self.file_name,
            "created_at": self.created_at,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> ReleaseManifest:
        """Parse and validate manifest bytes.

        Raises:
            ReleaseError: the bytes are not a valid manifest; the message names the field.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ReleaseError(f"manifest is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ReleaseError(f"manifest is not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise ReleaseError("manifest is not a JSON object")
        if document.get("format") != MANIFEST_FORMAT:
            raise ReleaseError(f"manifest format {document.get('format')!r} is not {MANIFEST_FORMAT!r}")
        manifest = cls(
            version=_field(document, "version", str),
            os_name=_field(document, "os", str),
            architecture=_field(document, "architecture", str),
            size_bytes=_field(document, "size", int),
            sha256=_field(document, "sha256", str),
            file_name=_field(document, "file", str),
            created_at=_field(document, "created_at", str),
        )
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Raise ``ReleaseError`` naming the first invalid field."""
        checks = [
            ("version", _VERSION.match(self.version)),
            ("os", _PLATFORM_PART.match(self.os_name)),
            ("architecture", _PLATFORM_PART.match(self.architecture)),
            ("size", 0 <= self.size_bytes < 2**40),
            ("sha256", _SHA256.match(self.sha256)),
            ("file", _FILE_NAME.match(self.file_name)),
        ]
        for name, valid in checks:
            if not valid:
                raise ReleaseError(f"manifest field {name!r} is invalid: {getattr(self, _ATTRIBUTES[name])!r}")


_ATTRIBUTES = {
    "version": "version", "os": "os_name", "architecture": "architecture",
    "size": "size_bytes", "sha256": "sha256", "file": "file_name",
}


def _field(document: dict, name: str, kind: type) -> object:
    value = document.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ReleaseError(f"manifest field {name!r} is missing or not a {kind.__name__}")
    return value


# Keys.


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return a short stable id of ``public_key``: the first 16 hex digits of its SHA-256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def format_public_key(public_key: Ed25519PublicKey, comment: str = "") -> str:
    """Return the one-line text form ``ed25519 BASE64 [comment]``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return " ".join(part for part in (KEY_TYPE, base64.b64encode(raw).decode("ascii"), comment) if part)


def parse_public_keys(text: str) -> dict[str, Ed25519PublicKey]:
    """Parse one key per line (blank lines and ``#`` comments skipped) into ``{key_id: key}``.

    Raises:
        ReleaseError: a line is not ``ed25519 BASE64 [comment]``.
    """
    keys: dict[str, Ed25519PublicKey] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if parts[0] != KEY_TYPE or len(parts) < 2:
                raise ValueError
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(parts[1], validate=True))
        except (ValueError, binascii.Error):
            raise ReleaseError(f"public key line {number} is not '{KEY_TYPE} BASE64 [comment]'") from None
        keys[key_id(key)] = key
    return keys


def generate_key_pair() -> tuple[bytes, str]:
    """Return a new publisher key: the private key as PEM and the public key line."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private_key.public_key()
    return pem, format_public_key(public, f"agentmgr-publisher-{key_id(public)}")


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from PEM.

    Raises:
        ReleaseError: the PEM is not an unencrypted Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise ReleaseError(f"cannot load the private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError("the private key is not an Ed25519 key")
    return key


# Signing and verification.


def sign_manifest(private_key: Ed25519PrivateKey, manifest: ReleaseManifest) -> tuple[bytes, bytes]:
    """Return the manifest bytes and the base64 signature over them."""
    data = manifest.to_bytes()
    return data, base64.b64encode(private_key.sign(data))


def verify_manifest(manifest_bytes: bytes, signature: bytes, trusted_keys: dict[str, Ed25519PublicKey]) -> tuple[ReleaseManifest, str]:
    """Check the signature of ``manifest_bytes`` against the trusted keys; return it parsed.

    ``signature`` is the base64 text of a ``.sig`` file. Returns the manifest
    and the id of the key that signed it.

    Raises:
        ReleaseError: no trusted key signed these bytes, or the manifest is invalid.
    """
    if not trusted_keys:
        raise ReleaseError("no trusted publisher keys are configured, so no release can be verified")
    try:
        raw_signature = base64.b64decode(signature.strip(), validate=True)
    except binascii.Error:
        raise ReleaseError("the signature is not valid base64") from None
    for identifier, key in trusted_keys.items():
        try:
            key.verify(raw_signature, manifest_bytes)
        except InvalidSignature:
            continue
        return ReleaseManifest.from_bytes(manifest_bytes), identifier
    raise ReleaseError("the manifest signature does not match any trusted publisher key")


def hash_stream(stream: BinaryIO) -> tuple[str, int]:
    """Return the hex SHA-256 and the size of everything left in ``stream``."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def verify_artifact(path: Path, manifest: ReleaseManifest) -> None:
    """Check that the file at ``path`` has the manifest's size and SHA-256.

    Raises:
        ReleaseError: the size or the hash differs.
    """
    with open(path, "rb") as stream:
        sha256, size = hash_stream(stream)
    if size != manifest.size_bytes:
        raise ReleaseError(f"artifact {path.name} is {size} bytes, but the manifest says {manifest.size_bytes}")
    if sha256 != manifest.sha256:
        raise ReleaseError(f"artifact {path.name} has SHA-256 {sha256}, but the manifest says {manifest.sha256}")


def manifest_for(path: Path, *, version: str, os_name: str, architecture: str) -> ReleaseManifest:
    """Describe the artifact at ``path`` in a new manifest (not yet signed).

    Raises:
        ReleaseError: a field is invalid.
    """
    with open(path, "rb") as stream:
        sha256, size = hash_stream(stream)
    manifest = ReleaseManifest(
        version=version,
        os_name=os_name,
        architecture=architecture,
        size_bytes=size,
        sha256=sha256,
        file_name=path.name,
        created_at=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    )
    manifest.validate()
    return manifest


def release_files(artifact: Path) -> tuple[Path, Path]:
    """Return the manifest and signature paths that belong beside ``artifact``."""
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX), artifact.with_name(artifact.name + SIGNATURE_SUFFIX)


def read_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Read and merge the public key files at ``paths``.

    Raises:
        ReleaseError: a file cannot be read or holds an invalid line.
    """
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            text = path.read_text()
        except OSError as error:
            raise ReleaseError(f"cannot read trusted keys file {path}: {error.strerror}") from None
        keys.update(parse_public_keys(text))
    return keys
