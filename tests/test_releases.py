"""Signed releases: keys, signing, publishing, upstream retrieval by the real updater worker."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import psycopg2
import pytest

from agent.releases import ReleaseError, parse_public_keys, verify_manifest
from tests.support import PROJECT_ROOT, VENV_BIN, run_program, start_updater, stop_process, wait_until


def agentmgr(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "agentmgr"), *args],
        env={**os.environ, **env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )


def build_agent_artifact(folder: Path, version: str) -> Path:
    """Pack the agent package as a release artifact, as a publisher would."""
    folder.mkdir(parents=True, exist_ok=True)
    artifact = folder / f"agentmgr-agent-{version}.tar.gz"
    with tarfile.open(artifact, "w:gz") as archive:
        archive.add(PROJECT_ROOT / "agent", arcname="agent", filter=lambda info: None if "__pycache__" in info.name else info)
        archive.add(PROJECT_ROOT / "agentmanager", arcname="agentmanager", filter=lambda info: None if "__pycache__" in info.name else info)
    return artifact


@pytest.fixture
def publisher(tmp_path, service_env):
    """A migrated database, a publisher key pair, and the manager trusting that key."""
    assert run_program("services.migrate", service_env).returncode == 0
    keys = tmp_path / "keys"
    result = agentmgr(service_env, "-o", "json", "release", "keygen", "--out", str(keys))
    assert result.returncode == 0, result.stderr
    trusted = tmp_path / "trusted.pub"
    trusted.write_text((keys / "publisher.pub").read_text())
    env = {**service_env, "AGENTMGR_UPDATES_TRUSTED_KEYS_FILE": str(trusted)}
    return env, keys


def sign(env, keys: Path, artifact: Path, version: str) -> subprocess.CompletedProcess:
    return agentmgr(env, "-o", "json", "release", "sign", str(artifact), "--key", str(keys / "publisher.key"), "--version", version)


def release_rows(env) -> list[tuple]:
    connection = psycopg2.connect(env["AGENTMGR_DATABASE_URL"])
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT version, sha256 FROM releases ORDER BY version")
            return cursor.fetchall()
    finally:
        connection.close()


def stored_files(env) -> list[str]:
    folder = Path(env["AGENTMGR_HOME"]) / "releases" / "sha256"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_keygen_writes_private_key_0600(publisher):
    env, keys = publisher

    again = agentmgr(env, "release", "keygen", "--out", str(keys))

    assert (keys / "publisher.key").stat().st_mode & 0o777 == 0o600
    assert len(parse_public_keys((keys / "publisher.pub").read_text())) == 1
    assert again.returncode == 11
    assert "already exists" in again.stderr


def test_publish_verifies_and_stores_content_addressed(publisher, tmp_path):
    env, keys = publisher
    artifact = build_agent_artifact(tmp_path / "out", "2.0.0")
    signed = sign(env, keys, artifact, "2.0.0")
    manifest = json.loads(signed.stdout)

    first = agentmgr(env, "-o", "json", "updates", "publish", str(artifact))
    second = agentmgr(env, "-o", "json", "updates", "publish", str(artifact))
    listing = json.loads(agentmgr(env, "-o", "json", "updates", "list").stdout)

    assert signed.returncode == 0, signed.stderr
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["new"] is True
    assert json.loads(second.stdout)["new"] is False
    assert [item["version"] for item in listing["items"]] == ["2.0.0"]
    assert stored_files(env) == [manifest["sha256"]]
    stored = Path(env["AGENTMGR_HOME"]) / "releases" / "sha256" / manifest["sha256"]
    assert stored.read_bytes() == artifact.read_bytes()


def test_tampered_artifact_rejected(publisher, tmp_path):
    env, keys = publisher
    artifact = build_agent_artifact(tmp_path / "out", "2.0.0")
    assert sign(env, keys, artifact, "2.0.0").returncode == 0
    with open(artifact, "ab") as handle:
        handle.write(b"tampered")

    result = agentmgr(env, "updates", "publish", str(artifact))

    assert result.returncode == 11
    assert "manifest says" in result.stderr
    assert release_rows(env) == []
    assert stored_files(env) == []


def test_untrusted_signature_rejected(publisher, tmp_path):
    env, _ = publisher
    other_keys = tmp_path / "other"
    assert agentmgr(env, "release", "keygen", "--out", str(other_keys)).returncode == 0
    artifact = build_agent_artifact(tmp_path / "out", "2.0.0")
    assert sign(env, other_keys, artifact, "2.0.0").returncode == 0

    result = agentmgr(env, "updates", "publish", str(artifact))

    assert result.returncode == 11
    assert "does not match any trusted publisher key" in result.stderr
    assert release_rows(env) == []
    assert stored_files(env) == []


def test_edited_manifest_fails_signature(publisher, tmp_path):
    env, keys = publisher
    artifact = build_agent_artifact(tmp_path / "out", "2.0.0")
    manifest = json.loads(sign(env, keys, artifact, "2.0.0").stdout)
    manifest_path = Path(manifest["manifest"])
    manifest_path.write_bytes(manifest_path.read_bytes().replace(b'"2.0.0"', b'"9.0.0"'))
    trusted = parse_public_keys((keys / "publisher.pub").read_text())

    with pytest.raises(ReleaseError, match="does not match"):
        verify_manifest(manifest_path.read_bytes(), Path(manifest["signature"]).read_bytes(), trusted)
    result = agentmgr(env, "updates", "publish", str(artifact))

    assert result.returncode == 11
    assert release_rows(env) == []


def test_not_enough_disk_space_stores_nothing(publisher, tmp_path):
    env, keys = publisher
    env = {**env, "AGENTMGR_UPDATES_FREE_SPACE_MARGIN_BYTES": str(10**18)}
    artifact = build_agent_artifact(tmp_path / "out", "2.0.0")
    assert sign(env, keys, artifact, "2.0.0").returncode == 0

    result = agentmgr(env, "updates", "publish", str(artifact))

    assert result.returncode == 11
    assert "not enough disk space" in result.stderr
    assert "AGENTMGR_UPDATES_FREE_SPACE_MARGIN_BYTES" in result.stderr
    assert release_rows(env) == []
    assert stored_files(env) == []


def test_same_version_other_artifact_conflicts(publisher, tmp_path):
    env, keys = publisher
    first = build_agent_artifact(tmp_path / "a", "2.0.0")
    assert sign(env, keys, first, "2.0.0").returncode == 0
    assert agentmgr(env, "updates", "publish", str(first)).returncode == 0
    second = tmp_path / "b" / first.name
    second.parent.mkdir()
    second.write_bytes(first.read_bytes() + b"\0")
    assert sign(env, keys, second, "2.0.0").returncode == 0

    result = agentmgr(env, "updates", "publish", str(second))

    assert result.returncode == 11
    assert "already exists" in result.stderr


def test_updater_fetches_upstream_and_survives_errors(publisher, tmp_path):
    env, keys = publisher
    upstream = tmp_path / "upstream"
    artifact = build_agent_artifact(upstream, "2.1.0")
    assert sign(env, keys, artifact, "2.1.0").returncode == 0
    env = {**env, "AGENTMGR_UPDATES_UPSTREAM": str(upstream)}
    worker = start_updater(env, tmp_path / "updater.log")
    try:
        # The scheduled check runs when the worker starts.
        wait_until(lambda: release_rows(env), timeout=60, what="the scheduled check to add the release")
        fetched = agentmgr(env, "-o", "json", "updates", "fetch", "--wait", "60")

        assert fetched.returncode == 0, fetched.stderr
        assert json.loads(fetched.stdout)["added"] == []
        assert json.loads(fetched.stdout)["known"] == 1
        assert [row[0] for row in release_rows(env)] == ["2.1.0"]

        # A broken index fails the job; the worker stays up and the cause is visible.
        (upstream / "index.json").write_text("{not json")
        broken = agentmgr(env, "-o", "json", "updates", "fetch", "--wait", "60")
        status = json.loads(agentmgr(env, "-o", "json", "updates", "status").stdout)

        assert broken.returncode == 1
        assert json.loads(broken.stdout)["outcome"] == "retrying"
        assert "not valid JSON" in json.loads(broken.stdout)["error"]
        assert worker.poll() is None
        assert status["items"][0]["outcome"] == "failed"
        assert "not valid JSON" in status["items"][0]["error"]
        assert [item["outcome"] for item in status["items"][1:3]] == ["succeeded", "succeeded"]

        # RQ's own tool reads our queue and sees the worker.
        info = subprocess.run([str(VENV_BIN / "rq"), "info", "--url", env["AGENTMGR_REDIS_URL"], "updates"],
                              capture_output=True, text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        assert "updates" in info.stdout
        assert "1 worker" in info.stdout or "1 workers" in info.stdout
    finally:
        stop_process(worker)
