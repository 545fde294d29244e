"""Files hookkit writes for the user: the mode they are created with, atomic replacement, and making it durable.

Every file hookkit creates (the ``.npy`` rows of ``extract``, ``manifest.json`` and the progress files, ``files.txt``
/ ``lines.txt``, a saved capture, ``monitor.jsonl``) gets the mode ``open()`` would give it: ``NEW_FILE_MODE``
(0o666) less the process's umask, so a user's umask 022 makes them 0644 and 077 makes them 0600 alike. Python's
``tempfile.mkstemp`` (and safetensors' ``save_file``) create 0600 whatever the umask, and ``os.replace`` keeps that
mode: temporary files are made here instead, by ``os.open`` with ``NEW_FILE_MODE``.

``replace_file`` / ``write_bytes`` write a new file beside the target, sync it, rename it over the target and sync
the folder, so a reader (or a power cut) sees the old content or the new one, never half of one. ``create_once``
makes a file whole only where none exists yet (of several processes trying at once, exactly one wins). ``sync`` and
``sync_folder`` are the durability steps, also used by the writers that append or rename in place
(``extraction.npy.RowFile``, ``extraction.npyfolder``, ``monitoring.sinks.JsonlSink``). No other module of hookkit
calls ``fsync`` or writes a temporary file of its own.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["NEW_FILE_MODE", "sync", "sync_folder", "replace_file", "write_bytes", "create_once"]

#: The mode every new file is created with, before the umask: what ``open(path, "w")`` asks for.
NEW_FILE_MODE = 0o666


def sync(fd: int) -> None:
    """Make the bytes written to ``fd`` durable: ``fdatasync`` where the OS has it (the data and the size, not the
    times), else ``fsync``."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the OS lets a folder be opened and synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Replace ``path`` whole, durably: ``write(tmp)`` fills a new empty file ``tmp`` beside it (created with
    ``NEW_FILE_MODE`` less the umask; a ``write`` that makes a file of its own at ``tmp`` gets that mode back), which
    is synced, renamed over ``path``, and the folder synced.
    After a crash ``path`` holds the old content or the new one; on an error ``tmp`` is removed and ``path`` is
    unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)  # NEW_FILE_MODE less the umask, read without changing it
        finally:
            os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode and hasattr(os, "fchmod"):  # safetensors made its own, 0600
                os.fchmod(fd, mode)
            sync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_bytes(path: Path, data: bytes) -> None:
    """``replace_file`` with ``data`` as the new content."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)

    replace_file(path, write)


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data``, whole and durably, unless it exists: True if this call created it, False if
    ``path`` was there already (then it is left as it is). The bytes go to a new file beside ``path``, synced, which is
    then hard-linked to ``path`` (``os.link`` fails where ``path`` exists, so of several processes trying at once
    exactly one wins, and no reader sees the file half written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
        try:
            _write_all(fd, data)
            sync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)
    return True
