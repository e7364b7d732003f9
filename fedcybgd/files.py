"""Atomic, durable file writes: after a crash or a power cut a file is the old one or the new one.

Every file the app rewrites in place (reports, checkpoint, the nodes' caches) goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` (text as UTF-8)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    write_atomic_with(path, lambda tmp: tmp.write_bytes(data))


def write_atomic_with(path: Path, write: Callable[[Path], object]) -> None:
    """Replace `path` with what `write` writes to the path it is given (for writers that take a
    file name: safetensors, torch.save).

    A temp file in the same directory (`.<name>.*.tmp`), fsynced, renamed over `path`, then the
    directory fsynced so the rename survives a power cut too. If anything fails the temp file
    is removed and `path` is left as it was.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
