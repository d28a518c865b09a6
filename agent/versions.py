"""Installed agent versions and the update records that the running agent and its launcher share.

Layout under ``<state dir>/updates/``:

- ``versions/<version>/``: an extracted release artifact, holding the
  top-level packages ``agent/`` and ``agentmanager/``.
- ``current``: a symlink to ``versions/<version>``, the version the launcher
  starts. It is replaced atomically (a new link under a temporary name, then
  ``os.replace``). Without it the launcher runs the code the agent was
  installed with.
- ``pending.json``: the update on trial: its rollout, release, version and
  the version to return to. The launcher removes it once the new version
  reports healthy, or after it rolled back.
- ``healthy.json``: written by a new version once its first session is open.
- ``rollouts/<rollout id>.json``: one record per rollout the agent handled,
  with its last state. A rollout that has a record is never installed again,
  and a final state is reported again when the manager repeats its notice.
- ``downloads/<release id>.partial``: an artifact being downloaded.

Every file is replaced atomically, so a crash leaves the old or the new content.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

from agent.files import fsync_folder, make_private_folder, remove_file, write_atomically

logger = logging.getLogger("agentmgr.agent.versions")

UPDATES_DIR = "updates"
VERSIONS_DIR = "versions"
DOWNLOADS_DIR = "downloads"
ROLLOUTS_DIR = "rollouts"
CURRENT_LINK = "current"
PENDING_FILE = "pending.json"
HEALTHY_FILE = "healthy.json"

ARTIFACT_PACKAGES = ("agent", "agentmanager")
"""Top-level folders an artifact may contain; anything else is rejected."""
REQUIRED_ARTIFACT_FILES = ("agent/__init__.py", "agent/__main__.py", "agentmanager/__init__.py")
"""Files without which the launcher cannot start a version (``python -m agent``)."""
MAX_EXTRACTED_BYTES = 512 * 1024 * 1024
"""Largest total size of an artifact's files once extracted, against archives that expand without bound."""
MAX_ARCHIVE_MEMBERS = 20_000
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024
"""Free disk space, in bytes, that must remain after a download or an extraction, so the agent's log and journal still fit."""
RECORD_RETENTION_SECONDS = 40 * 86400
"""Age after which a final rollout record is deleted; longer than the manager's largest agent timeout (7 days)."""


class ArtifactError(Exception):
    """An artifact is not a valid agent release archive; the message names the offending member."""


class UpdateState(str, enum.Enum):
    """An update's progress as the agent records and reports it."""

    # DOWNLOADING -> INSTALLING -> SUCCEEDED (the new version opened a session)
    # DOWNLOADING | INSTALLING -> FAILED (nothing was switched)
    # INSTALLING -> ROLLED_BACK (the new version did not become healthy)
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


FINAL_STATES = frozenset({UpdateState.SUCCEEDED, UpdateState.FAILED, UpdateState.ROLLED_BACK})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutRecord:
    """The agent's progress and outcome in one rollout."""

    rollout_id: str
    release_id: str
    version: str
    """Version the rollout installs."""
    state: UpdateState
    reason: str = ""
    agent_version: str = ""
    """Version the agent runs after this state, as reported to the manager."""
    report_pending: bool = False
    """True until the final state was queued on a session."""
    updated_at: float = 0.0
    """Unix time of the last change."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PendingUpdate:
    """An installed version on trial, and the version to return to if it fails."""

    rollout_id: str
    release_id: str
    version: str
    previous_version: str | None
    """Version ``current`` pointed to before the switch; None means the installed code."""
    switched_at: float
    """Unix time of the switch."""


def _canonical_uuid(text: str) -> str:
    """Return ``text`` as a canonical UUID, so that an id from the manager never becomes an arbitrary path.

    Raises:
        ValueError: ``text`` is not a UUID.
    """
    return str(uuid.UUID(text))


class VersionStore:
    """The ``updates`` folder of one agent; ``run`` holds the state folder's lock, so one launcher uses it."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / UPDATES_DIR
        self.versions = self.root / VERSIONS_DIR
        self.downloads = self.root / DOWNLOADS_DIR
        self.rollouts = self.root / ROLLOUTS_DIR
        self.current_link = self.root / CURRENT_LINK

    def prepare(self) -> None:
        """Create the folders (mode 0700).

        Raises:
            OSError: a folder cannot be created.
        """
        for folder in (self.root, self.versions, self.downloads, self.rollouts):
            make_private_folder(folder)

    # Versions and the current link.

    def version_dir(self, version: str) -> Path:
        if not version or "/" in version or version in (".", ".."):
            raise ValueError(f"invalid version {version!r} for a folder name")
        return self.versions / version

    def current_version(self) -> str | None:
        """Return the version ``current`` selects, or None when the installed code runs."""
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def select(self, version: str | None) -> None:
        """Point ``current`` at ``version`` atomically; None removes it, so the installed code runs.

        Raises:
            FileNotFoundError: ``version`` is not installed.
            OSError: the link cannot be written.
        """
        if version is None:
            remove_file(self.current_link)
            fsync_folder(self.root)
            return
        if not (self.version_dir(version) / "agent" / "__init__.py").is_file():
            raise FileNotFoundError(f"version {version} is not installed in {self.versions}")
        temporary = self.root / f".{CURRENT_LINK}.{os.getpid()}.tmp"
        remove_file(temporary)
        os.symlink(Path(VERSIONS_DIR) / version, temporary)
        os.replace(temporary, self.current_link)
        fsync_folder(self.root)

    def install(self, artifact: Path, version: str) -> Path:
        """Extract ``artifact`` into ``versions/<version>`` and return that folder.

        The archive is extracted into a temporary folder and renamed, so a
        crash never leaves a half-extracted version under its final name. An
        existing folder of the same version is replaced unless it is selected.

        Raises:
            ArtifactError: the archive is unreadable, or a member is unsafe or unexpected.
            OSError: the files cannot be written.
        """
        destination = self.version_dir(version)
        if version == self.current_version():
            raise ArtifactError(f"version {version} is the selected version; it cannot be replaced while selected")
        temporary = self.versions / f".{version}.{os.getpid()}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(mode=0o755)
        try:
            extract_artifact(artifact, temporary)
            if destination.exists():
                shutil.rmtree(destination)
            os.replace(temporary, destination)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        fsync_folder(self.versions)
        return destination

    def prune_versions(self, keep: set[str]) -> list[str]:
        """Delete installed versions other than ``keep``, the selected and the pending one; return their names.

        Temporary folders (names starting with a dot) are skipped, because an extraction may be writing them.
        """
        pending = self.read_pending()
        keep = keep | {self.current_version() or "", pending.version if pending else ""}
        removed = []
        for folder in sorted(self.versions.iterdir()) if self.versions.is_dir() else []:
            if folder.name not in keep and not folder.name.startswith("."):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def download_path(self, release_id: str) -> Path:
        """Return the partial download file of a release.

        Raises:
            ValueError: ``release_id`` is not a UUID.
        """
        return self.downloads / f"{_canonical_uuid(release_id)}.partial"

    # The update on trial.

    def read_pending(self) -> PendingUpdate | None:
        document = self._read_json(self.root / PENDING_FILE)
        if document is None:
            return None
        try:
            return PendingUpdate(**document)
        except TypeError as error:
            logger.warning("skipped: invalid %s (%s)", PENDING_FILE, error)
            return None

    def write_pending(self, pending: PendingUpdate) -> None:
        """Record the update on trial (durable before ``current`` changes).

        Raises:
            OSError: the file cannot be written.
        """
        write_atomically(self.root / PENDING_FILE, json.dumps(dataclasses.asdict(pending)).encode())

    def clear_pending(self, rollout_id: str | None = None) -> None:
        """Delete the pending record and the healthy mark; with ``rollout_id``, only if the record is of that rollout.

        The check keeps the launcher from deleting the record of a newer
        update that the agent wrote since the launcher read the old one.
        """
        if rollout_id is not None:
            pending = self.read_pending()
            if pending is not None and pending.rollout_id != rollout_id:
                return
        remove_file(self.root / PENDING_FILE)
        remove_file(self.root / HEALTHY_FILE)

    def mark_healthy(self, pending: PendingUpdate) -> None:
        """Tell the launcher that the version on trial opened a session.

        Raises:
            OSError: the file cannot be written.
        """
        document = {"rollout_id": pending.rollout_id, "version": pending.version, "pid": os.getpid(), "at": time.time()}
        write_atomically(self.root / HEALTHY_FILE, json.dumps(document).encode())

    def is_healthy(self, pending: PendingUpdate) -> bool:
        """Return whether the version on trial for ``pending``'s rollout marked itself healthy."""
        document = self._read_json(self.root / HEALTHY_FILE)
        return bool(document) and document.get("rollout_id") == pending.rollout_id and document.get("version") == pending.version

    # Rollout records.

    def read_record(self, rollout_id: str) -> RolloutRecord | None:
        """Return the record of a rollout, or None when the agent never handled it.

        Raises:
            ValueError: ``rollout_id`` is not a UUID.
        """
        document = self._read_json(self._record_path(rollout_id))
        if document is None:
            return None
        try:
            return RolloutRecord(**{**document, "state": UpdateState(document["state"])})
        except (TypeError, KeyError, ValueError) as error:
            logger.warning("skipped: invalid record of rollout %s (%s)", rollout_id, error)
            return None

    def write_record(self, record: RolloutRecord) -> RolloutRecord:
        """Store ``record`` with the current time and return it.

        Raises:
            OSError: the file cannot be written.
            ValueError: the rollout id is not a UUID.
        """
        record = dataclasses.replace(record, updated_at=time.time())
        document = {**dataclasses.asdict(record), "state": record.state.value}
        write_atomically(self._record_path(record.rollout_id), json.dumps(document).encode())
        return record

    def unreported_records(self) -> list[RolloutRecord]:
        """Return the final records whose state was not yet queued on a session, oldest first."""
        records = []
        for path in sorted(self.rollouts.glob("*.json")) if self.rollouts.is_dir() else []:
            record = self.read_record(path.stem)
            if record is not None and record.report_pending and record.state in FINAL_STATES:
                records.append(record)
        return sorted(records, key=lambda record: record.updated_at)

    def prune_records(self, now: float | None = None) -> int:
        """Delete final records older than ``RECORD_RETENTION_SECONDS``; return how many."""
        cutoff = (now or time.time()) - RECORD_RETENTION_SECONDS
        pruned = 0
        for path in list(self.rollouts.glob("*.json")) if self.rollouts.is_dir() else []:
            record = self.read_record(path.stem)
            if record is not None and record.state in FINAL_STATES and record.updated_at < cutoff:
                pruned += remove_file(path)
        return pruned

    def _record_path(self, rollout_id: str) -> Path:
        return self.rollouts / f"{_canonical_uuid(rollout_id)}.json"

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            # Writes are atomic, so an unreadable file means damage from outside the agent.
            logger.warning("skipped: unreadable %s (%s)", path, error)
            return None
        return document if isinstance(document, dict) else None


def check_member(member: tarfile.TarInfo) -> None:
    """Accept only plain files and folders inside ``agent/`` or ``agentmanager/``.

    Links are rejected outright, so no member can point outside the
    destination, and so are absolute names and ``..`` parts.

    Raises:
        ArtifactError: the member is unsafe or unexpected.
    """
    name = member.name
    parts = Path(name).parts
    if name.startswith("/") or not parts or ".." in parts:
        raise ArtifactError(f"archive member {name!r} has an absolute path or a '..' part")
    if parts[0] not in ARTIFACT_PACKAGES:
        raise ArtifactError(f"archive member {name!r} is outside the folders {', '.join(ARTIFACT_PACKAGES)}")
    if not (member.isfile() or member.isdir()):
        raise ArtifactError(f"archive member {name!r} is a link or a special file; only files and folders are allowed")


def extract_artifact(artifact: Path, destination: Path) -> None:
    """Check every member of the ``.tar.gz`` at ``artifact``, then extract it into ``destination``.

    Raises:
        ArtifactError: the archive is unreadable, a member is unsafe, or a required file is missing.
        OSError: the files cannot be written.
    """
    try:
        with tarfile.open(artifact, "r:gz") as archive:
            members = archive.getmembers()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise ArtifactError(f"the archive has {len(members)} members, more than the {MAX_ARCHIVE_MEMBERS} allowed")
            total = 0
            for member in members:
                check_member(member)
                total += member.size
            if total > MAX_EXTRACTED_BYTES:
                raise ArtifactError(f"the archive expands to {total} bytes, more than the {MAX_EXTRACTED_BYTES} allowed")
            check_free_space(destination, total)
            names = {member.name.rstrip("/") for member in members if member.isfile()}
            missing = [name for name in REQUIRED_ARTIFACT_FILES if name not in names]
            if missing:
                raise ArtifactError(f"the archive lacks {', '.join(missing)}, so it is not an agent release")
            # The "data" filter repeats the path checks and drops set-uid bits and ownership.
            archive.extractall(destination, members=members, filter="data")
    except (tarfile.TarError, EOFError) as error:
        raise ArtifactError(f"the artifact is not a readable .tar.gz archive ({error})") from error


def check_free_space(folder: Path, size_bytes: int) -> None:
    """Raise ``ArtifactError`` unless ``size_bytes`` fit in ``folder``'s file system with ``FREE_SPACE_MARGIN_BYTES`` to spare."""
    free = shutil.disk_usage(folder).free
    if free < size_bytes + FREE_SPACE_MARGIN_BYTES:
        raise ArtifactError(
            f"not enough disk space in {folder}: {size_bytes} bytes needed plus a {FREE_SPACE_MARGIN_BYTES}-byte margin, "
            f"{free} free; free some space, then start a new rollout"
        )
