"""Self-update inside the running agent: verify, download and install a release, then hand over.

On an UpdateNotice the agent:

1. records the rollout as ``downloading`` (so a repeated notice never starts
   a second install) and reports DOWNLOADING;
2. checks the manifest signature against the publisher keys pinned at
   install, and that the manifest's version, size and SHA-256 match the notice;
3. downloads the artifact with DownloadArtifact into a partial file,
   resuming from its size after a dropped stream, and checks size and SHA-256;
4. reports INSTALLING, extracts the artifact into ``versions/<version>``,
   writes the pending record and switches ``current``;
5. exits with ``ExitCode.UPDATE_INSTALLED``, so the launcher starts the new
   version on trial (``agent.launcher``).

Any failed check reports FAILED with the reason and leaves ``current`` as it
was. The new version reports SUCCEEDED once its first session is open
(``confirm_trial``). When a new version fails its trial, the launcher rolls
it back, and the previous version reports ROLLED_BACK on its next session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import platform
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio

from agentmanager.v1 import agent_pb2, agent_pb2_grpc

from agent import __version__
from agent.config import TRUSTED_PUBLISHERS_FILE, AgentSettings, InstalledConfig
from agent.releases import ReleaseError, ReleaseManifest, parse_public_keys, verify_artifact, verify_manifest
from agent.versions import (
    FINAL_STATES,
    ArtifactError,
    PendingUpdate,
    RolloutRecord,
    UpdateState,
    VersionStore,
    check_free_space,
)

logger = logging.getLogger("agentmgr.agent.update")

LAUNCHER_PID_ENV = "AGENTMGR_AGENT_LAUNCHER_PID"
"""Set by the launcher in its child's environment; an agent started any other way does not self-update."""

DOWNLOAD_ATTEMPTS = 5
"""Attempts to download one artifact; each resumes where the previous one stopped."""
DOWNLOAD_RETRY_SECONDS = 1.0
"""Wait before the second attempt, doubled before each further one."""
DOWNLOAD_TIMEOUT_SECONDS = 600.0
"""Deadline of one DownloadArtifact call."""
FINAL_DOWNLOAD_ERRORS = frozenset({
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
})
"""Statuses that a retry cannot change."""

STATE_TO_PROTO = {
    UpdateState.DOWNLOADING: agent_pb2.UPDATE_STATE_DOWNLOADING,
    UpdateState.INSTALLING: agent_pb2.UPDATE_STATE_INSTALLING,
    UpdateState.SUCCEEDED: agent_pb2.UPDATE_STATE_SUCCEEDED,
    UpdateState.FAILED: agent_pb2.UPDATE_STATE_FAILED,
    UpdateState.ROLLED_BACK: agent_pb2.UPDATE_STATE_ROLLED_BACK,
}
_DECLARED_VERSION = re.compile(rb"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


class UpdateFailed(Exception):
    """An update cannot be installed; the message is the reason reported to the manager."""


def is_launched() -> bool:
    """Return whether this process runs as the launcher's child, which can roll back an update."""
    return os.environ.get(LAUNCHER_PID_ENV) == str(os.getppid())


class Updater:
    """Handles update notices of one ``run`` process, one update at a time."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        config: Callable[[], InstalledConfig],
        store: VersionStore,
        send: Callable[[agent_pb2.AgentMessage], bool],
        channel_options: Callable[[], list[tuple[str, int]]],
        request_restart: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.config = config
        self.store = store
        self.send = send
        self.channel_options = channel_options
        self.request_restart = request_restart
        self.task: asyncio.Task[None] | None = None
        self.active_rollout_id: str | None = None

    # Session events.

    def confirm_trial(self) -> None:
        """Report SUCCEEDED when this process is the version on trial, then send unreported outcomes.

        Called once a session is open (SessionSettings received): that is the
        health condition of a new version. Marking the record before the
        healthy file means a crash in between still reports SUCCEEDED later.
        """
        pending = self.store.read_pending()
        if pending is not None and pending.version == __version__ and self.store.current_version() == __version__:
            record = self.store.read_record(pending.rollout_id)
            if record is None or record.state not in FINAL_STATES:
                self.store.write_record(RolloutRecord(
                    rollout_id=pending.rollout_id, release_id=pending.release_id, version=pending.version,
                    state=UpdateState.SUCCEEDED, agent_version=__version__, report_pending=True,
                ))
            self.store.mark_healthy(pending)
            logger.info(
                "healthy: version %s opened a session after the update from %s",
                __version__, pending.previous_version or "the installed code",
                extra={"rollout_id": pending.rollout_id, "release_id": pending.release_id},
            )
        for record in self.store.unreported_records():
            self.report(record)

    def handle_notice(self, notice: agent_pb2.UpdateNotice) -> None:
        """Start installing the noticed release, or repeat the outcome of a rollout handled before."""
        try:
            rollout_id = str(uuid.UUID(notice.rollout_id))
            uuid.UUID(notice.release_id)
        except ValueError:
            logger.warning("skipped: update notice with invalid ids (rollout %r, release %r)", notice.rollout_id[:64], notice.release_id[:64])
            return
        if self.task is not None and not self.task.done():
            if self.active_rollout_id != rollout_id:
                logger.info(
                    "deferred: update notice of rollout %s (installing rollout %s; the manager repeats it on reconnect)",
                    rollout_id, self.active_rollout_id, extra={"rollout_id": rollout_id},
                )
            return
        record = self.store.read_record(rollout_id)
        pending = self.store.read_pending()
        if record is not None and record.state in FINAL_STATES:
            logger.info(
                "skipped: repeated update notice of rollout %s (already %s); reporting it again", rollout_id, record.state.value,
                extra={"rollout_id": rollout_id},
            )
            self.report(record)
            return
        if pending is not None and pending.rollout_id == rollout_id:
            # The version on trial for this rollout has not opened a session yet; the launcher decides.
            logger.info("skipped: update notice of rollout %s (version %s on trial)", rollout_id, pending.version,
                        extra={"rollout_id": rollout_id})
            return
        self.active_rollout_id = rollout_id
        self.task = asyncio.create_task(self.apply(notice))

    async def stop(self) -> None:
        """Cancel a download in progress; its partial file stays, so the next notice resumes it. Safe to repeat."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    # One update.

    async def apply(self, notice: agent_pb2.UpdateNotice) -> None:
        """Download, verify and install the noticed release, then ask for a restart; report FAILED on any error."""
        record = RolloutRecord(
            rollout_id=notice.rollout_id, release_id=notice.release_id, version=notice.version,
            state=UpdateState.DOWNLOADING, agent_version=__version__,
        )
        try:
            self.store.prepare()
            record = self.store.write_record(record)
        except OSError as error:
            # Without the record a repeated notice could install twice, so nothing starts.
            logger.error("failed: recording rollout %s (%s); the update does not start", notice.rollout_id, error,
                         extra={"rollout_id": notice.rollout_id})
            self.report(dataclasses.replace(record, state=UpdateState.FAILED, reason=f"failed to record the update: {error}"))
            return
        if notice.version == __version__:
            # The manager's record of this agent's version was stale; there is nothing to install.
            logger.info("skipped: update to version %s, which already runs", __version__, extra={"rollout_id": notice.rollout_id})
            succeeded = dataclasses.replace(record, state=UpdateState.SUCCEEDED, report_pending=True)
            try:
                succeeded = self.store.write_record(succeeded)
            except OSError as error:
                logger.error("failed: recording rollout %s (%s)", notice.rollout_id, error, extra={"rollout_id": notice.rollout_id})
            self.report(succeeded)
            return
        logger.info(
            "updating: from version %s to %s (release %s)", __version__, notice.version, notice.release_id,
            extra={"rollout_id": notice.rollout_id, "release_id": notice.release_id},
        )
        self.report(record)
        try:
            await self.install(notice, record)
        except asyncio.CancelledError:
            raise
        except (UpdateFailed, ArtifactError) as error:
            self.fail(record, str(error))
            return
        except OSError as error:
            self.fail(record, f"failed to write the update files: {error}")
            return
        except Exception as error:  # noqa: BLE001 - every update must end in a reported state
            logger.exception("failed: update to %s (unexpected error)", notice.version, extra={"rollout_id": notice.rollout_id})
            self.fail(record, f"unexpected error: {error!r}")
            return
        self.request_restart()

    async def install(self, notice: agent_pb2.UpdateNotice, record: RolloutRecord) -> None:
        """Run the steps up to the switch of ``current``.

        Raises:
            UpdateFailed: a check failed; nothing was switched.
            ArtifactError: the artifact is not a valid agent release archive.
            OSError: a file cannot be written.
        """
        if not is_launched():
            raise UpdateFailed("the agent runs without its launcher (`agentmgr-agent run`), which rolls back a failed update")
        manifest = self.verify_notice(notice)

        partial = self.store.download_path(notice.release_id)
        check_free_space(self.store.downloads, manifest.size_bytes - (partial.stat().st_size if partial.exists() else 0))
        artifact = await self.download(notice, manifest)
        try:
            await asyncio.to_thread(verify_artifact, artifact, manifest)
        except ReleaseError as error:
            artifact.unlink(missing_ok=True)
            raise UpdateFailed(f"the downloaded artifact is invalid: {error}") from None

        record = self.store.write_record(dataclasses.replace(record, state=UpdateState.INSTALLING))
        self.report(record)
        folder = await asyncio.to_thread(self.store.install, artifact, manifest.version)
        check_declared_version(folder, manifest.version)
        previous = self.store.current_version()
        pending = PendingUpdate(
            rollout_id=record.rollout_id, release_id=record.release_id, version=manifest.version,
            previous_version=previous, switched_at=record.updated_at,
        )
        self.store.write_pending(pending)
        try:
            self.store.select(manifest.version)
        except OSError:
            self.store.clear_pending()
            raise
        artifact.unlink(missing_ok=True)
        logger.info(
            "installed: version %s in %s; restarting into it on trial for %gs",
            manifest.version, folder, self.settings.update_health_timeout_seconds,
            extra={"rollout_id": record.rollout_id, "release_id": record.release_id, "previous_version": previous},
        )

    def verify_notice(self, notice: agent_pb2.UpdateNotice) -> ReleaseManifest:
        """Check the notice's manifest against the pinned publisher keys and the notice's own fields.

        Raises:
            UpdateFailed: no key is pinned, the signature or manifest is invalid, or a field differs.
        """
        config = self.config()
        keys_file = self.settings.config_dir / TRUSTED_PUBLISHERS_FILE
        try:
            keys = parse_public_keys("\n".join(config.trusted_publisher_keys))
        except ReleaseError as error:
            raise UpdateFailed(f"the pinned publisher keys in {keys_file} are invalid: {error}") from None
        if not keys:
            raise UpdateFailed(
                f"no publisher key is pinned in {keys_file}, so no release can be trusted; install the agent again "
                "after the manager sets AGENTMGR_UPDATES_TRUSTED_KEYS_FILE"
            )
        try:
            manifest, key_id = verify_manifest(notice.manifest, notice.signature, keys)
        except ReleaseError as error:
            raise UpdateFailed(f"release rejected: {error}") from None
        mismatches = [
            f"{name} {actual!r} (notice: {expected!r})"
            for name, actual, expected in (
                ("version", manifest.version, notice.version),
                ("sha256", manifest.sha256, notice.sha256),
                ("size", manifest.size_bytes, notice.size_bytes),
            )
            if actual != expected
        ]
        if mismatches:
            raise UpdateFailed(f"the signed manifest differs from the notice: {', '.join(mismatches)}")
        system, machine = platform.system().lower(), platform.machine().lower()
        if manifest.os_name != system or manifest.architecture not in ("any", machine):
            raise UpdateFailed(f"release is built for {manifest.os_name}/{manifest.architecture}, this host is {system}/{machine}")
        logger.info("verified: manifest of version %s signed by publisher key %s", manifest.version, key_id,
                    extra={"rollout_id": notice.rollout_id, "release_id": notice.release_id})
        return manifest

    async def download(self, notice: agent_pb2.UpdateNotice, manifest: ReleaseManifest) -> Path:
        """Download the artifact into its partial file, resuming after a dropped stream, and return the path.

        Raises:
            UpdateFailed: the gateway rejected the request, sent inconsistent chunks, or every attempt failed.
        """
        path = self.store.download_path(notice.release_id)
        expected = manifest.size_bytes
        last_error = ""
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            offset = path.stat().st_size if path.exists() else 0
            if offset > expected:
                logger.warning("discarded: partial download of %d bytes, more than the %d expected", offset, expected)
                path.unlink()
                offset = 0
            if offset == expected:
                return path
            logger.info("downloading: release %s from byte %d of %d", notice.release_id, offset, expected,
                        extra={"rollout_id": notice.rollout_id, "release_id": notice.release_id})
            try:
                await self.download_from(notice.release_id, path, offset, expected)
            except grpc.aio.AioRpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
                if error.code() in FINAL_DOWNLOAD_ERRORS:
                    raise UpdateFailed(f"download of release {notice.release_id} rejected ({last_error})") from None
            else:
                size = path.stat().st_size
                if size == expected:
                    return path
                last_error = f"the stream ended at byte {size} of {expected}"
            delay = DOWNLOAD_RETRY_SECONDS * 2 ** (attempt - 1)
            if attempt < DOWNLOAD_ATTEMPTS:
                logger.warning(
                    "failed: download attempt %d of %d (%s); resuming in %.1fs", attempt, DOWNLOAD_ATTEMPTS, last_error, delay,
                    extra={"rollout_id": notice.rollout_id, "release_id": notice.release_id},
                )
                await asyncio.sleep(delay)
        raise UpdateFailed(f"download of release {notice.release_id} failed after {DOWNLOAD_ATTEMPTS} attempts ({last_error})")

    async def download_from(self, release_id: str, path: Path, offset: int, expected: int) -> None:
        """Append the artifact from byte ``offset`` to ``path`` with one DownloadArtifact call.

        Raises:
            grpc.aio.AioRpcError: the call failed.
            UpdateFailed: a chunk does not continue the file or passes the expected size.
        """
        config = self.config()
        credentials = grpc.ssl_channel_credentials(root_certificates=config.ca_pem)
        metadata = (("x-agent-id", config.agent_id), ("x-agent-key", config.agent_key))
        request = agent_pb2.DownloadArtifactRequest(release_id=release_id, offset=offset)
        async with grpc.aio.secure_channel(config.manager, credentials, options=self.channel_options()) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).DownloadArtifact(
                request, metadata=metadata, timeout=DOWNLOAD_TIMEOUT_SECONDS
            )
            with open(path, "ab") as output:
                try:
                    async for chunk in call:
                        if chunk.offset != offset or chunk.total_size != expected or offset + len(chunk.data) > expected:
                            path.unlink(missing_ok=True)
                            raise UpdateFailed(
                                f"the gateway sent {len(chunk.data)} bytes at offset {chunk.offset} of {chunk.total_size}, "
                                f"expected offset {offset} of {expected}"
                            )
                        output.write(chunk.data)
                        offset += len(chunk.data)
                finally:
                    output.flush()
                    os.fsync(output.fileno())

    # Reports.

    def fail(self, record: RolloutRecord, reason: str) -> None:
        logger.warning("failed: update to %s (%s)", record.version, reason, extra={"rollout_id": record.rollout_id})
        failed = dataclasses.replace(record, state=UpdateState.FAILED, reason=reason, agent_version=__version__, report_pending=True)
        try:
            failed = self.store.write_record(failed)
        except OSError as error:
            logger.error("failed: recording the failure of rollout %s (%s)", record.rollout_id, error,
                         extra={"rollout_id": record.rollout_id})
        self.report(failed)

    def report(self, record: RolloutRecord) -> None:
        """Queue ``record``'s state on the session; a final state stops being pending once queued."""
        status = agent_pb2.UpdateStatus(
            rollout_id=record.rollout_id, release_id=record.release_id, state=STATE_TO_PROTO[record.state],
            agent_version=record.agent_version or __version__, reason=record.reason[:1000],
        )
        if not self.send(agent_pb2.AgentMessage(update_status=status)):
            logger.info("deferred: %s report of rollout %s (disconnected)", record.state.value, record.rollout_id,
                        extra={"rollout_id": record.rollout_id})
            return
        logger.info("reported: update %s for rollout %s", record.state.value, record.rollout_id,
                    extra={"rollout_id": record.rollout_id, "reason": record.reason})
        if record.report_pending:
            try:
                self.store.write_record(dataclasses.replace(record, report_pending=False))
            except OSError as error:
                logger.warning("failed: recording the report of rollout %s (%s)", record.rollout_id, error)


def check_declared_version(folder: Path, version: str) -> None:
    """Check that the extracted ``agent/__init__.py`` declares ``version``, without importing it.

    Raises:
        UpdateFailed: it declares no version or another one.
    """
    source = (folder / "agent" / "__init__.py").read_bytes()
    match = _DECLARED_VERSION.search(source)
    declared = match.group(1).decode(errors="replace") if match else None
    if declared != version:
        raise UpdateFailed(f"the artifact's agent/__init__.py declares version {declared!r}, but the manifest says {version!r}")
