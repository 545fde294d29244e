"""The bookkeeping files of an extraction folder, and the errors of writing into it.

``manifest.json`` says what the rows are (model fingerprint, layers, options, data checks, the file of each layer;
``complete`` once finished; ``progress_format``, the layout of the progress files); ``progress/rank-R.rows`` holds one
byte per row, set (``DoneRows.mark``, in place) once rank R's rows of it are synced in the files, itself synced before
the next batch; ``progress/rank-R.json`` each layer's row shape and dtype as rank R wrote them (replaced whole when
they change, before any row of theirs is marked); ``progress/rank-R.lock`` is held (``flock``) by the process
writing as rank R. ``extraction.npyfolder.NpyFolder`` reads and writes them through the
functions here; ``rows_written`` reads them for the command line. Every file is replaced through ``hookkit.core.fs``
(``write_json``); ``Writing`` turns a full or failing disk into an ``ExtractError`` that names the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hookkit._errors import ExtractError
from hookkit._version import __version__ as _version
from hookkit.core import fs as _fs
from hookkit.core.fs import NEW_FILE_MODE, write_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, a second writer is not noticed
    fcntl = None  # type: ignore[assignment]

__all__ = ["MANIFEST", "PROGRESS_FORMAT", "done_end", "row_gaps", "DoneRows", "file_names", "write_json", "Writing",
           "Lock", "take_lock", "try_lock", "new_manifest", "read_manifest", "rows_written", "read_done",
           "read_progress", "all_progress", "forget_rows", "COMMAND"]

MANIFEST = "manifest.json"


# -- done rows ------------------------------------------------------------------------------------------------------
# Which rows are written is a boolean mask over the rows (``done[i]``: row i is in the files); a mask shorter than the
# data says nothing of the rows past its end (not done).

def done_end(done: np.ndarray) -> int:
    """One past the last done row (0 when none is)."""
    where = np.flatnonzero(done)
    return int(where[-1]) + 1 if len(where) else 0


def row_gaps(done: np.ndarray, n: int) -> list[list[int]]:
    """The ``[start, stop)`` ranges of rows below ``n`` that ``done`` does not mark."""
    have = np.zeros(n, dtype=bool)
    have[:min(n, len(done))] = done[:n]
    edges = np.flatnonzero(np.diff(np.concatenate([[True], have, [True]]).astype(np.int8)))
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2], strict=True)]


# -- the folder's files -----------------------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,150}")


def file_names(names: list[str]) -> dict[str, str]:
    """Each layer's file inside ``out``: the layer name itself when that is a plain file name, else a cleaned name
    with a hash (``a/b`` must not become a folder, ``../x`` must not leave ``out``)."""
    files: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        stem = name
        # "x.offsets" would be the offsets file of a ragged layer "x": such a name gets a hash too
        if not _SAFE_NAME.fullmatch(name) or name.lower() in taken or name.lower().endswith(".offsets"):
            clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")[:100]
            stem = f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        taken.add(stem.lower())
        files[name] = f"{stem}.npy"
    return files


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` whole with ``data``, durably: the new file is synced before the rename and the folder after
    it, so that after a power cut ``path`` holds the old or the new content, and the new one once this returns."""
    write_bytes(path, json.dumps(data, indent=1).encode())


class Writing:
    """``with Writing(path):`` around a write: a full disk (or any OS error) becomes an ExtractError that names
    the file and says that the rows written so far are kept and how to go on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        pass

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not isinstance(exc, OSError):
            return
        if exc.errno in _DISK_FULL:
            raise ExtractError(
                f"the disk is full ({exc.strerror}) while writing {self.path}. The rows written so far are kept: "
                "free some space and run the same call again to resume.") from exc
        if exc.errno in _DISK_TROUBLE:
            raise ExtractError(f"could not write {self.path} ({exc.strerror}). The rows written so far are kept: "
                               "fix that and run the same call again to resume.") from exc
        # anything else (a closed file, a bad argument) is a bug of ours: raised as it is


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_TROUBLE = {errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOENT}


class Lock:
    """``progress/rank-R.lock``, held with ``flock`` while this process writes as rank R: a second writer into the
    same folder (same rank) is refused instead of interleaving its rows and progress with ours."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, NEW_FILE_MODE)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self.fd)
                self.fd = -1
                raise
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass  # the pid is for messages only

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def take_lock(out: Path, rank: int) -> Lock:
    path = out / "progress" / f"rank-{rank}.lock"
    try:
        return Lock(path)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ExtractError(f"out={str(out)!r} is not a writable folder ({exc.strerror or exc}); "
                               "choose another.") from None
        try:
            pid = path.read_text().strip()
        except OSError:
            pid = ""
        who = f", pid {pid}" if pid else ""
        raise ExtractError(
            f"another process is writing into {out} (rank {rank}{who}); two writers would mix their rows. Wait for "
            "it to finish (then this call returns its result), stop it, or use another out= folder.") from None


def try_lock(path: Path) -> Lock | None:
    try:
        return Lock(path)
    except OSError:
        return None


# The command line that runs this extraction (``hookkit extract ...`` sets it: {"line": ..., "cwd": ...}), kept in the
# manifest outside its settings (a resumed run compares only those) so that an unfinished folder can say how to finish.
COMMAND: ContextVar[dict[str, str] | None] = ContextVar("hookkit_extract_command", default=None)

# The layout of the progress files a manifest goes with: a folder whose unfinished run kept its progress another way
# (row ranges in ``rank-R.json``, before rows were placed by sample index) is refused instead of misread.
PROGRESS_FORMAT = 2


def new_manifest(settings: dict[str, Any], samples: int | None, sample0: str | None, files: dict[str, str],
              **finished: Any) -> dict[str, Any]:
    command = COMMAND.get()
    return {"settings": settings, "data": {"samples": samples, "sample0": sample0}, "files": files,
            "complete": bool(finished), **finished, "progress_format": PROGRESS_FORMAT,
            **({"command": command} if command else {}),
            "hookkit": _version, "torch": torch.__version__, "python": sys.version.split()[0]}


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ExtractError(f"{path} is unreadable ({exc}): delete the folder to start over, or use another "
                           "out=.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise ExtractError(f"{path} is unreadable (not a hookkit manifest): delete the folder to start over, or "
                           "use another out=.")
    return manifest


def rows_written(out: Path) -> tuple[int, bool]:
    """How many rows the extraction folder ``out`` holds (every rank's progress, merged; all of them once it is
    finished), and whether it is finished: what a resumed run starts from, or what an interrupted one kept. A
    folder that holds no extraction (no manifest yet) holds 0 rows."""
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
    if manifest is None:
        return 0, False
    if manifest.get("complete"):
        return int(manifest.get("rows", 0)), True
    done = all_progress(out)[0] if (out / "progress").is_dir() else np.zeros(0, dtype=bool)
    return int(done.sum()), False


class DoneRows:
    """``progress/rank-R.rows``: one byte per row, 1 once rank R's rows of it are in the files. ``mark`` writes the
    bytes of a batch's rows in place (one ``pwrite`` per run of consecutive rows), so a batch costs the same however
    many rows are done, in whatever order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, NEW_FILE_MODE)

    def mark(self, rows: np.ndarray) -> None:
        at = np.sort(np.asarray(rows, dtype=np.int64))
        breaks = np.flatnonzero(np.diff(at) != 1) + 1
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(at)], strict=True):
            if b > a:
                os.pwrite(self.fd, b"\x01" * (b - a), int(at[a]))

    def sync(self) -> None:
        _fs.sync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_done(path: Path) -> np.ndarray:
    """The rows one rank's ``.rows`` file marks done (an absent file: none)."""
    try:
        return np.fromfile(path, dtype=np.uint8) != 0
    except FileNotFoundError:
        return np.zeros(0, dtype=bool)


def read_progress(path: Path) -> dict[str, Any]:
    """One rank's progress: the rows done (``rank-R.rows`` beside ``path``) and, from ``path`` (``rank-R.json``),
    each layer's row shape and dtype and which layers are ragged. An unreadable file counts as nothing known."""
    done = read_done(path.with_suffix(".rows"))
    try:
        data = json.loads(path.read_text())
        return {"rows": done, "shapes": dict(data.get("shapes", {})), "dtypes": dict(data.get("dtypes", {})),
                "ragged": list(data.get("ragged", []))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {"rows": done, "shapes": {}, "dtypes": {}, "ragged": []}


def _ranks_with_progress(out: Path) -> list[int]:
    found = {p.stem.removeprefix("rank-") for pattern in ("rank-*.json", "rank-*.rows")
             for p in (out / "progress").glob(pattern)}
    return sorted(int(r) for r in found if r.isdigit())


def all_progress(out: Path) -> tuple[np.ndarray, dict[str, list[int]], dict[str, str], set[str]]:
    """What every rank's progress files say: the rows written (a mask), each layer's row (or token) shape and
    dtype, and which layers are ragged."""
    done = np.zeros(0, dtype=bool)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    ragged: set[str] = set()
    for rank in _ranks_with_progress(out):
        p = read_progress(out / "progress" / f"rank-{rank}.json")
        rows = p["rows"]
        if len(rows) > len(done):
            done = np.concatenate([done, np.zeros(len(rows) - len(done), dtype=bool)])
        done[:len(rows)] |= rows
        for name, shape in p["shapes"].items():
            if shapes.setdefault(name, shape) != shape:
                raise ExtractError(f"{out}: ranks wrote rows of two shapes for {name!r} ({shapes[name]} and "
                                   f"{shape}); delete the folder and run again with pool= or inputs of one size.")
        for name, dt in p["dtypes"].items():
            dtypes.setdefault(name, dt)
        ragged.update(p["ragged"])
    return done, shapes, dtypes, ragged


def _clip_progress(out: Path, rank: int, limit: int) -> None:
    """Forget rank ``rank``'s rows at and after ``limit`` (all of its progress at 0)."""
    rows, meta = out / "progress" / f"rank-{rank}.rows", out / "progress" / f"rank-{rank}.json"
    with Writing(rows):
        if limit == 0:
            rows.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
        elif rows.exists() and rows.stat().st_size > limit:
            os.truncate(rows, limit)
            fd = os.open(rows, os.O_RDONLY)
            try:
                _fs.sync(fd)
            finally:
                os.close(fd)


def forget_rows(out: Path, rank: int, world: int, limit: int) -> None:
    """Forget progress at and after row ``limit``: this rank's files, and (rank 0) the files of ranks beyond this
    job's ``world`` (left by a run with more ranks) that no live process holds. The job's ranks forget their own."""
    _clip_progress(out, rank, limit)
    if rank != 0:
        return
    for number in _ranks_with_progress(out):
        if number < world:
            continue
        held = try_lock(out / "progress" / f"rank-{number}.lock")
        if held is not None:
            try:
                _clip_progress(out, number, limit)
            finally:
                held.release()
