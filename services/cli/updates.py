"""`agentmgr release ...` (publisher keys and signing) and `agentmgr updates ...` (releases)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rq import Queue
from rq.job import Job, JobStatus

from agent.releases import (
    ReleaseError,
    generate_key_pair,
    load_private_key,
    manifest_for,
    release_files,
    sign_manifest,
)
from services.cli.common import Context, add_listing_options, duration_seconds, identifier, label, page_request, vars_of
from services.cli.output import TABLE, print_record, print_records
from services.core import defaults
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.fleet import releases, rollouts
from services.core.redis_client import connect_redis, ping_redis
from services.updater.jobs import FETCH_HISTORY_LENGTH, enqueue_fetch_now, enqueue_rollout_step, fetch_history
from services.updater.upstream import index_folder

RELEASE_COLUMNS = ("id", "version", "os_name", "architecture", "size_bytes", "sha256", "signing_key_id", "created_at")
FETCH_COLUMNS = ("started_at", "outcome", "added", "known", "error", "job_id")
PRIVATE_KEY_FILE = "publisher.key"
PUBLIC_KEY_FILE = "publisher.pub"


def release_keygen(context: Context, arguments: argparse.Namespace) -> int:
    folder: Path = arguments.out
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise FailedPrecondition(f"{path} already exists; move it away or choose another --out folder")
    folder.mkdir(parents=True, exist_ok=True)
    pem, public_line = generate_key_pair()
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_path.write_text(public_line + "\n")
    print_record({"private_key": private_path, "public_key": public_path, "public_key_line": public_line}, context.output)
    if context.output == TABLE:
        print(f"\nKeep {private_path} secret. To trust this publisher, append {public_path} to")
        print(f"{context.settings.trusted_keys_file} (AGENTMGR_UPDATES_TRUSTED_KEYS_FILE) on the manager.")
    return 0


def release_sign(context: Context, arguments: argparse.Namespace) -> int:
    artifact: Path = arguments.artifact
    if not artifact.is_file():
        raise InvalidArgument("artifact", f"artifact {artifact} is not a file")
    try:
        private_key = load_private_key(arguments.key.read_bytes())
        manifest = manifest_for(artifact, version=arguments.version, os_name=arguments.os, architecture=arguments.arch)
    except OSError as error:
        raise InvalidArgument("key", f"cannot read key {arguments.key}: {error.strerror}") from None
    except ReleaseError as error:
        raise InvalidArgument("release", str(error)) from None
    manifest_bytes, signature = sign_manifest(private_key, manifest)
    manifest_path, signature_path = release_files(artifact)
    manifest_path.write_bytes(manifest_bytes)
    signature_path.write_bytes(signature + b"\n")
    index = index_folder(artifact.parent)
    print_record(
        {**vars_of(manifest), "manifest": manifest_path, "signature": signature_path, "index": index},
        context.output,
    )
    return 0


def updates_publish(context: Context, arguments: argparse.Namespace) -> int:
    artifact: Path = arguments.artifact
    default_manifest, default_signature = release_files(artifact)
    manifest_path: Path = arguments.manifest or default_manifest
    signature_path: Path = arguments.signature or default_signature
    try:
        manifest_bytes = manifest_path.read_bytes()
        signature = signature_path.read_bytes()
    except OSError as error:
        raise InvalidArgument("manifest", f"cannot read {error.filename}: {error.strerror}") from None
    with context.transaction() as connection:
        release, new = releases.add_release(
            connection,
            releases.store_from_settings(context.settings),
            manifest_bytes=manifest_bytes,
            signature=signature,
            trusted_keys=releases.trusted_keys_from_settings(context.settings),
            open_artifact=lambda: open(artifact, "rb"),
            source=f"publish:{artifact.resolve()}",
            actor=context.actor,
        )
    print_record({**release_record(release), "new": new}, context.output)
    return 0


def release_record(release: releases.Release) -> dict:
    record = vars_of(release)
    record.pop("manifest_bytes")
    record["signature"] = release.signature.decode("ascii", errors="replace")
    return record


def updates_list(context: Context, arguments: argparse.Namespace) -> int:
    with context.transaction() as connection:
        page = releases.list_releases(connection, page=page_request(arguments))
    print_records([release_record(item) for item in page.items], RELEASE_COLUMNS, context.output,
                  extra={"next_page_token": page.next_page_token})
    return 0


def job_outcome(job: Job) -> tuple[str, str]:
    """Return a fetch job's outcome (succeeded, failed, retrying or its RQ status) and error.

    RQ keeps no result for an attempt that will be retried, so the error of the
    latest attempt comes from the fetch history that the job itself writes.
    """
    status = job.get_status(refresh=True)
    if status == JobStatus.FINISHED:
        return "succeeded", ""
    attempts = [item for item in fetch_history(job.connection, FETCH_HISTORY_LENGTH) if item.get("job_id") == job.id]
    if attempts and attempts[0]["outcome"] == "failed":
        return ("failed" if status == JobStatus.FAILED else "retrying"), attempts[0].get("error", "")
    return status.value, ""


def updates_fetch(context: Context, arguments: argparse.Namespace) -> int:
    connection = connect_redis(context.settings.redis_url)
    ping_redis(connection)
    job = enqueue_fetch_now(Queue(defaults.UPDATES_QUEUE, connection=connection))
    deadline = time.monotonic() + arguments.wait
    outcome, error = job_outcome(job)
    while outcome in ("queued", "started", "scheduled", "deferred") and time.monotonic() < deadline:
        time.sleep(0.2)
        outcome, error = job_outcome(job)
    record = {"job_id": job.id, "outcome": outcome, "error": error}
    if outcome == "succeeded":
        record.update(job.return_value() or {})
    print_record(record, context.output)
    return 1 if outcome in ("failed", "retrying") else 0


def upstream_status(context: Context, arguments: argparse.Namespace) -> int:
    connection = connect_redis(context.settings.redis_url)
    ping_redis(connection)
    history = fetch_history(connection, arguments.limit)
    print_records(history, FETCH_COLUMNS, context.output,
                  extra={"upstream": context.settings.updates_upstream or "(none)"})
    return 0


ROLLOUT_COLUMNS = ("id", "target_version", "state", "current_wave", "waves", "state_reason", "created_at")
ROLLOUT_AGENT_COLUMNS = ("agent_id", "wave", "state", "from_version", "error", "deadline_at")


def waves_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid waves {text!r}: expected percentages such as 5,25,100") from None


def rollout_record(rollout: rollouts.Rollout, counts: dict[str, int]) -> dict:
    record = vars_of(rollout)
    record["current_wave"] = f"{rollout.current_wave + 1} of {len(rollout.waves)}"
    record["agents"] = counts
    return record


def updates_rollout(context: Context, arguments: argparse.Namespace) -> int:
    selection = rollouts.Selection(group=arguments.group, labels=dict(arguments.label), agent_ids=tuple(arguments.agent))
    with context.transaction() as connection:
        rollout, count = rollouts.create_rollout(
            connection,
            target_version=arguments.version,
            selection=selection,
            waves=arguments.waves,
            max_parallel=arguments.max_parallel,
            failure_threshold_percent=arguments.failure_threshold,
            agent_timeout_seconds=arguments.agent_timeout,
            created_by=context.actor,
        )
    enqueue_rollout_step(_queue(context), rollout.id)
    print_record({"rollout_id": rollout.id, "agents": count, "state": rollout.state}, context.output)
    return 0


def updates_status(context: Context, arguments: argparse.Namespace) -> int:
    if arguments.rollout_id is None:
        return upstream_status(context, arguments)
    with context.transaction() as connection:
        rollout = rollouts.get_rollout(connection, arguments.rollout_id)
        counts = rollouts.progress(connection, rollout.id)
        members = rollouts.list_rollout_agents(connection, rollout.id)
    print_record(rollout_record(rollout, counts), context.output)
    if context.output == TABLE and members:
        print()
        print_records([vars_of(member) for member in members], ROLLOUT_AGENT_COLUMNS, TABLE)
    return 0


def rollout_action(action: str):
    def handler(context: Context, arguments: argparse.Namespace) -> int:
        with context.transaction() as connection:
            function = {"pause": rollouts.pause_rollout, "resume": rollouts.resume_rollout, "abort": rollouts.abort_rollout}[action]
            rollout = function(connection, arguments.rollout_id, actor=context.actor)
            counts = rollouts.progress(connection, rollout.id)
        if action == "resume":
            enqueue_rollout_step(_queue(context), rollout.id)
        print_record(rollout_record(rollout, counts), context.output)
        return 0

    return handler


def _queue(context: Context) -> Queue:
    connection = connect_redis(context.settings.redis_url)
    ping_redis(connection)
    return Queue(defaults.UPDATES_QUEUE, connection=connection)


def register(groups: argparse._SubParsersAction) -> None:
    """Add the ``release`` and ``updates`` command groups to the parser."""
    release = groups.add_parser("release", help="publisher keys and signed releases").add_subparsers(dest="action", required=True)
    keygen = release.add_parser("keygen", help="make an Ed25519 publisher key pair")
    keygen.add_argument("--out", type=Path, default=Path("."), help="folder for publisher.key and publisher.pub (default: here)")
    keygen.set_defaults(handler=release_keygen)
    sign = release.add_parser("sign", help="write ARTIFACT.manifest.json and ARTIFACT.sig, and index.json beside them")
    sign.add_argument("artifact", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="publisher.key from `release keygen`")
    sign.add_argument("--version", required=True, help="release version, such as 1.4.0")
    sign.add_argument("--os", default="linux", help="operating system (default linux)")
    sign.add_argument("--arch", default="any", help="CPU architecture, or any for pure Python (default any)")
    sign.set_defaults(handler=release_sign)

    updates = groups.add_parser("updates", help="releases on this manager").add_subparsers(dest="action", required=True)
    publish = updates.add_parser("publish", help="verify and add a locally built release")
    publish.add_argument("artifact", type=Path)
    publish.add_argument("--manifest", type=Path, help="manifest file (default: ARTIFACT.manifest.json)")
    publish.add_argument("--signature", type=Path, help="signature file (default: ARTIFACT.sig)")
    publish.set_defaults(handler=updates_publish)
    fetch = updates.add_parser("fetch", help="check the upstream for new releases now (an updater job)")
    fetch.add_argument("--wait", type=float, default=0, help="seconds to wait for the job's outcome (default: return at once)")
    fetch.set_defaults(handler=updates_fetch)
    listing = updates.add_parser("list", help="list verified releases")
    add_listing_options(listing)
    listing.set_defaults(handler=updates_list)
    status = updates.add_parser("status", help="a rollout's progress, or the latest upstream checks and their errors")
    status.add_argument("rollout_id", nargs="?", type=identifier, help="rollout to show (default: upstream checks)")
    status.add_argument("--limit", type=int, default=10, help="upstream checks to show (default 10)")
    status.set_defaults(handler=updates_status)
    rollout = updates.add_parser("rollout", help="start rolling VERSION out in waves; prints the rollout id at once")
    rollout.add_argument("version")
    rollout.add_argument("--group", default="", help="only agents of this group")
    rollout.add_argument("--label", type=label, action="append", default=[], help="only agents with key=value (repeatable)")
    rollout.add_argument("--agent", type=identifier, action="append", default=[], help="only this agent id (repeatable)")
    rollout.add_argument("--waves", type=waves_list, default=[5, 25, 100], help="cumulative percentages (default 5,25,100)")
    rollout.add_argument("--max-parallel", type=int, default=50, help="agents updating at once (default 50)")
    rollout.add_argument("--failure-threshold", type=float, default=10.0,
                         help="percent of failed agents that pauses the rollout (default 10)")
    rollout.add_argument("--agent-timeout", type=duration_seconds, default=900,
                         help="time an agent has to report success, such as 15m (default 15m)")
    rollout.set_defaults(handler=updates_rollout)
    for action, text in (("pause", "stop notifying agents"), ("resume", "continue a paused rollout"),
                         ("abort", "end a rollout for good")):
        parser = updates.add_parser(action, help=text)
        parser.add_argument("rollout_id", type=identifier)
        parser.set_defaults(handler=rollout_action(action))
