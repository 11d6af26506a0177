"""Atomic file writes, in one place: write a temporary sibling, fsync it, rename it over the target.

A reader (or a process killed mid-write) sees either the old file or the new one, never a torn one.
Directory fsyncs make the rename itself durable where the file system supports them.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fsync_file(path)
    except OSError:  # some file systems cannot fsync directories; the rename is still atomic
        pass


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` (not atomically) and fsync it: for files inside a directory renamed later."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` by `data` atomically (temporary sibling + fsync + rename); returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
