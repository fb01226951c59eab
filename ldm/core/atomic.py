"""The one way files are written: to a temporary file beside the target, flushed and fsynced, then renamed over it.

A kill at any moment leaves either the previous file or the new one, never a truncated one; a failed write
(a full disk) removes its temporary and keeps the previous file. Checkpoints, cache shards, ``meta.json``,
PNGs, CSVs and configs all go through ``write_atomic``; a second name for a file written already, through
``link_atomic``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

TMP_MARKER = ".tmp"  # `.<name>.tmp<pid>`: a file being written (a killed writer may leave one)


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the rename still happened
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create or replace ``path`` with the file ``write(temporary_path)`` writes, atomically (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _rename_into_place(tmp, path)


def _rename_into_place(tmp: Path, path: Path) -> Path:
    """Rename the complete temporary over ``path`` and flush the folder; the temporary is removed if that fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def link_atomic(source: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Create or replace ``path`` as a hard link to ``source``, atomically (a temporary link renamed over it);
    False, nothing changed, where the filesystem cannot link (the caller writes the file instead)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError:
        return False
    _rename_into_place(tmp, path)
    return True


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """``write_atomic`` of ``data``."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``write_atomic`` of ``text`` as UTF-8."""
    return write_bytes_atomic(path, text.encode())
