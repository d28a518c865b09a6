"""Agent releases: verified, stored content-addressed, then recorded in PostgreSQL.

A release becomes visible (a row in ``releases``) only after its signature,
size and SHA-256 were checked and its artifact is complete on disk. Artifacts
live under ``$AGENTMGR_HOME/releases/sha256/HEX``; a file is written to a
temporary name in the same folder, synced and renamed, so a crash never leaves
a half-written artifact under its final name.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import psycopg2.extensions
from psycopg2.extras import Json, RealDictCursor

from agent.releases import ReleaseError, ReleaseManifest, read_trusted_keys, verify_manifest
from services.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.core.fleet import audit
from services.core.fleet.listing import ListingSpec, Page, PageRequest, SortField, fetch_page
from services.core.fleet.models import as_utc
from services.core.settings import Settings

logger = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 1024 * 1024

COLUMNS = (
    "id, version, os_name, architecture, size_bytes, sha256, signature, signing_key_id, "
    "manifest_bytes, source, created_at"
)

_SPEC = ListingSpec(
    entity="releases",
    table="releases",
    columns=COLUMNS,
    id_column="id",
    id_type="uuid",
    sort_fields={
        "created_at": SortField("created_at", "timestamptz"),
        "version": SortField("version", "text"),
    },
    default_sort="created_at",
)


class InsufficientDiskSpace(FailedPrecondition):
    """Storing a release would leave less free space than the configured margin."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Release:
    """A verified agent release whose artifact is in the store."""

    id: uuid.UUID
    version: str
    os_name: str
    architecture: str
    size_bytes: int
    sha256: str
    signature: bytes
    """Base64 Ed25519 signature over ``manifest_bytes``."""
    signing_key_id: str
    manifest_bytes: bytes
    source: str
    """Origin of the release: ``upstream:URL`` or ``publish:PATH``."""
    created_at: datetime.datetime


def release_from_row(row: Mapping[str, Any]) -> Release:
    return Release(
        id=row["id"],
        version=row["version"],
        os_name=row["os_name"],
        architecture=row["architecture"],
        size_bytes=row["size_bytes"],
        sha256=row["sha256"],
        signature=bytes(row["signature"]),
        signing_key_id=row["signing_key_id"],
        manifest_bytes=bytes(row["manifest_bytes"]),
        source=row["source"],
        created_at=as_utc(row["created_at"]),
    )


class ReleaseStore:
    """Content-addressed artifact files under one folder."""

    def __init__(self, root: Path, *, free_space_margin_bytes: int) -> None:
        self.root = root
        self.free_space_margin_bytes = free_space_margin_bytes

    def path_for(self, sha256: str) -> Path:
        """Return where the artifact with this digest lives; ``sha256`` must be 64 hex digits."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidArgument("sha256", f"invalid SHA-256 {sha256!r}: expected 64 lower-case hex digits")
        return self.root / "sha256" / sha256

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def check_free_space(self, size_bytes: int) -> None:
        """Raise ``InsufficientDiskSpace`` unless ``size_bytes`` fit with the margin to spare."""
        folder = self.root / "sha256"
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        needed = size_bytes + self.free_space_margin_bytes
        if free < needed:
            raise InsufficientDiskSpace(
                f"not enough disk space in {folder} for a release of {size_bytes} bytes: "
                f"{free} bytes free, {needed} needed including the margin of "
                f"{self.free_space_margin_bytes} bytes (AGENTMGR_UPDATES_FREE_SPACE_MARGIN_BYTES); "
                "free some space or lower the margin"
            )

    def ingest(self, source: BinaryIO, manifest: ReleaseManifest) -> Path:
        """Copy ``source`` into the store, checking size and SHA-256 on the way.

        Raises:
            InsufficientDiskSpace: the artifact would not fit with the margin.
            FailedPrecondition: the bytes do not match the manifest; nothing is kept.
        """
        final = self.path_for(manifest.sha256)
        if final.is_file():
            return final
        self.check_free_space(manifest.size_bytes)
        temporary = final.with_name(f".{manifest.sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        digest = hashlib.sha256()
        size = 0
        try:
            with open(temporary, "xb") as target:
                while chunk := source.read(COPY_CHUNK_BYTES):
                    size += len(chunk)
                    if size > manifest.size_bytes:
                        raise FailedPrecondition(
                            f"artifact of {manifest.version} is larger than the {manifest.size_bytes} bytes its manifest says"
                        )
                    digest.update(chunk)
                    target.write(chunk)
                target.flush()
                os.fsync(target.fileno())
            if size != manifest.size_bytes:
                raise FailedPrecondition(
                    f"artifact of {manifest.version} is {size} bytes, but its manifest says {manifest.size_bytes}"
                )
            if digest.hexdigest() != manifest.sha256:
                raise FailedPrecondition(
                    f"artifact of {manifest.version} has SHA-256 {digest.hexdigest()}, "
                    f"but its manifest says {manifest.sha256}"
                )
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)
        return final


def verify_release(manifest_bytes: bytes, signature: bytes, trusted_keys: Mapping[str, Any]) -> tuple[ReleaseManifest, str]:
    """Check a manifest's signature against the trusted publisher keys.

    Raises:
        FailedPrecondition: the signature does not verify or the manifest is invalid.
    """
    try:
        return verify_manifest(manifest_bytes, signature, dict(trusted_keys))
    except ReleaseError as error:
        raise FailedPrecondition(f"release rejected: {error}") from error


def add_release(
    conn: psycopg2.extensions.connection,
    store: ReleaseStore,
    *,
    manifest_bytes: bytes,
    signature: bytes,
    trusted_keys: Mapping[str, Any],
    open_artifact: Callable[[], BinaryIO],
    source: str,
    actor: str,
) -> tuple[Release, bool]:
    """Verify a release, store its artifact and record it; return it and whether it is new.

    The signature is checked before any artifact byte is read, and the row is
    written only after the artifact is complete in the store.

    Raises:
        FailedPrecondition: bad signature, size or hash, or not enough disk space.
        AlreadyExists: the same version and platform exist with another artifact.
    """
    manifest, signing_key_id = verify_release(manifest_bytes, signature, trusted_keys)
    existing = find_release(conn, manifest.version, manifest.os_name, manifest.architecture)
    if existing is not None:
        if existing.sha256 != manifest.sha256:
            raise AlreadyExists(
                f"release {manifest.version} for {manifest.os_name}/{manifest.architecture} already exists "
                f"with SHA-256 {existing.sha256}; publish a new version instead"
            )
        return existing, False

    if not store.has(manifest.sha256):
        with open_artifact() as artifact:
            store.ingest(artifact, manifest)

    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"""
            INSERT INTO releases (version, os_name, architecture, size_bytes, sha256, signature,
                                  signing_key_id, manifest, manifest_bytes, source)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (version, os_name, architecture) DO NOTHING
            RETURNING {COLUMNS}
            """,
            (
                manifest.version, manifest.os_name, manifest.architecture, manifest.size_bytes,
                manifest.sha256, signature.strip(), signing_key_id, Json(json.loads(manifest_bytes)),
                manifest_bytes, source,
            ),
        )
        row = cursor.fetchone()
    if row is None:
        # Another process recorded the same release between our check and insert.
        existing = find_release(conn, manifest.version, manifest.os_name, manifest.architecture)
        assert existing is not None
        return existing, False
    release = release_from_row(row)
    audit.record(
        conn,
        actor=actor,
        action="release.add",
        target_type="release",
        target_id=str(release.id),
        details={"version": release.version, "sha256": release.sha256, "source": source, "signing_key_id": signing_key_id},
    )
    logger.info(
        "added: release %s (%s/%s)",
        release.version,
        release.os_name,
        release.architecture,
        extra={"release_id": str(release.id), "sha256": release.sha256, "source": source},
    )
    return release, True


def find_release(conn: psycopg2.extensions.connection, version: str, os_name: str, architecture: str) -> Release | None:
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"SELECT {COLUMNS} FROM releases WHERE version = %s AND os_name = %s AND architecture = %s",
            (version, os_name, architecture),
        )
        row = cursor.fetchone()
    return release_from_row(row) if row else None


def get_release(conn: psycopg2.extensions.connection, release_id: uuid.UUID) -> Release:
    """Return the release ``release_id``.

    Raises:
        NotFound: no such release.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM releases WHERE id = %s", (release_id,))
        row = cursor.fetchone()
    if row is None:
        raise NotFound("release", release_id)
    return release_from_row(row)


def list_releases(conn: psycopg2.extensions.connection, *, page: PageRequest) -> Page[Release]:
    """Return one page of releases, oldest first unless ``page`` sets another order.

    Raises:
        InvalidArgument: the page request is invalid.
    """
    rows, next_token, total = fetch_page(conn, _SPEC, page, where=[], parameters=[])
    return Page([release_from_row(row) for row in rows], next_token, total)


def store_from_settings(settings: Settings) -> ReleaseStore:
    """Return the release store under the state folder, with the configured free-space margin."""
    return ReleaseStore(settings.release_store_dir, free_space_margin_bytes=settings.updates_free_space_margin_bytes)


def trusted_keys_from_settings(settings: Settings) -> dict[str, Any]:
    """Read the trusted publisher keys file; a missing file means no key is trusted.

    Raises:
        FailedPrecondition: the file exists but cannot be read or parsed.
    """
    path = settings.trusted_keys_file
    if not path.exists():
        return {}
    try:
        return read_trusted_keys([path])
    except ReleaseError as error:
        raise FailedPrecondition(str(error)) from error
