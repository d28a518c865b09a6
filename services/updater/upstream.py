"""Read releases from an upstream: a local folder or an HTTPS URL holding ``index.json``.

``index.json`` lists each release by the names of its three files, relative
to the index (made by ``agentmgr release sign``)::

    {"format": "agentmgr-index/1",
     "releases": [{"file": "a.tar.gz", "manifest": "a.tar.gz.manifest.json",
                   "signature": "a.tar.gz.sig"}]}
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from agent.releases import MANIFEST_SUFFIX, MAX_MANIFEST_BYTES, SIGNATURE_SUFFIX

INDEX_FILE = "index.json"
INDEX_FORMAT = "agentmgr-index/1"
MAX_INDEX_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 1024
HTTP_TIMEOUT_SECONDS = 30

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,250}$")


class UpstreamError(Exception):
    """The upstream cannot be read or its index is invalid; the message names the file."""


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    file: str
    manifest: str
    signature: str


class Upstream:
    """One upstream location; every name read from it is a plain file name, never a path."""

    def __init__(self, location: str) -> None:
        if not (location.startswith("https://") or location.startswith("/")):
            raise UpstreamError(f"invalid upstream {location!r}: expected an absolute folder path or an https:// URL")
        self.location = location.rstrip("/")

    def read_index(self) -> list[IndexEntry]:
        """Return the releases that ``index.json`` lists.

        Raises:
            UpstreamError: the index is unreachable or invalid.
        """
        data = self.read_small(INDEX_FILE, MAX_INDEX_BYTES)
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UpstreamError(f"{self.describe(INDEX_FILE)} is not valid JSON: {error}") from None
        if not isinstance(document, dict) or document.get("format") != INDEX_FORMAT:
            raise UpstreamError(f"{self.describe(INDEX_FILE)} is not an {INDEX_FORMAT} index")
        entries = []
        for number, item in enumerate(document.get("releases", [])):
            if not isinstance(item, dict):
                raise UpstreamError(f"{self.describe(INDEX_FILE)}: release {number} is not an object")
            entry = IndexEntry(
                file=self._checked_name(item.get("file"), number),
                manifest=self._checked_name(item.get("manifest"), number),
                signature=self._checked_name(item.get("signature"), number),
            )
            entries.append(entry)
        return entries

    def read_small(self, name: str, limit: int) -> bytes:
        """Return the whole file ``name``, which must not exceed ``limit`` bytes."""
        with self.open(name) as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise UpstreamError(f"{self.describe(name)} is larger than {limit} bytes")
        return data

    def read_manifest(self, entry: IndexEntry) -> tuple[bytes, bytes]:
        """Return the manifest bytes and the signature text of ``entry``."""
        return self.read_small(entry.manifest, MAX_MANIFEST_BYTES), self.read_small(entry.signature, MAX_SIGNATURE_BYTES)

    def open(self, name: str) -> BinaryIO:
        """Open the upstream file ``name`` for reading.

        Raises:
            UpstreamError: the file cannot be opened.
        """
        try:
            if self.location.startswith("/"):
                return open(Path(self.location) / name, "rb")
            return urllib.request.urlopen(f"{self.location}/{name}", timeout=HTTP_TIMEOUT_SECONDS)  # noqa: S310 - https only
        except (OSError, urllib.error.URLError) as error:
            raise UpstreamError(f"cannot read {self.describe(name)}: {error}") from None

    def describe(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _checked_name(self, value: object, number: int) -> str:
        if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
            raise UpstreamError(f"{self.describe(INDEX_FILE)}: release {number} has an invalid file name {value!r}")
        return value


def index_folder(folder: Path) -> Path:
    """Write ``index.json`` in ``folder`` listing every artifact that has a manifest and a signature."""
    releases = []
    for manifest in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
        artifact = manifest.name.removesuffix(MANIFEST_SUFFIX)
        signature = folder / (artifact + SIGNATURE_SUFFIX)
        if (folder / artifact).is_file() and signature.is_file():
            releases.append({"file": artifact, "manifest": manifest.name, "signature": signature.name})
    path = folder / INDEX_FILE
    temporary = path.with_name(f".{INDEX_FILE}.tmp")
    temporary.write_text(json.dumps({"format": INDEX_FORMAT, "releases": releases}, indent=2) + "\n")
    temporary.replace(path)
    return path
