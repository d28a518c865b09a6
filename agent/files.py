"""Crash-safe file writes: a reader sees either the old file or the whole new one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: write a temporary file, fsync it, rename it, fsync the folder.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            # os.open applies the umask, so set the mode explicitly.
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries, so a rename inside it survives a power loss."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) if needed and set its mode to 0700.

    Raises:
        OSError: the folder cannot be created or its mode cannot be set.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)


def remove_file(path: Path) -> bool:
    """Delete ``path`` and return whether it existed."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False
