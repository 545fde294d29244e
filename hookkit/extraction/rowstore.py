"""Where ``extract()`` puts its rows: one interface (``RowStore``), two stores, and ``Features``, what both hand back.

``_extract.extract()`` opens one store per call (``MemoryRows(names)`` without ``out``, ``NpyFolder(...)`` with it)
and uses it as a context manager: ``resume()`` (a finished folder's ``Features``, else None), ``done_rows()`` (row
ranges already written, handed to the share of ``extraction.shards``), ``first_sample()`` (the data check), then
``write(first_row, rows, batch=)`` for every batch this rank computes, and ``finish(batches, rows)``, which returns
the ``Features``. Files are written through ``extraction.npy`` (``RowFile``, ``finish_file``); the manifest's settings
come from ``extraction.fingerprint``.

The ``.npy`` folder on disk (``out=DIR``): ``manifest.json`` says what the rows are (model fingerprint, layers,
options, data checks, the file of each layer); ``<file>.npy.partial`` receive rows at their final place;
``progress/rank-R.json`` lists the row ranges rank R has written, rewritten atomically (and synced) after each
batch's rows are synced to the files; ``progress/rank-R.lock`` is held (``flock``) by the process writing as rank R;
``progress/<file>.layout`` is the row shape the first rank to write a layer set, which every other rank checks
before it writes (rows of another shape never reach the shared file). A ragged layer (token outputs of masked
batches) is written through ``extraction.tokens.TokenFiles`` (per-rank chunks and a shared index) and assembled at the
finish into ``<layer>.npy`` and ``<layer>.offsets.npy``. Finished work is tracked by rows, not batches, so a resumed run
may use another batch size or another number of ranks. Rank 0 finishes the files (checks that every row is written,
writes the final headers, marks the manifest complete, renames) once every rank is done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hookkit._errors import ArgumentError, ArgumentTypeError, ExtractError, NotRecordedError
from hookkit._version import __version__ as _version
from hookkit.core.fs import NEW_FILE_MODE, write_bytes
from hookkit.extraction.fingerprint import sample0_digest
from hookkit.extraction.npy import HEADER_BYTES, RowFile, finish_file, npy_bytes
from hookkit.extraction.tokens import (
    TokenFiles,
    TokenRows,
    assemble,
    chunk_end,
    chunk_name,
    leftovers,
    lost_from,
    offsets_name,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, a second writer is not noticed
    fcntl = None  # type: ignore[assignment]

__all__ = ["Features", "RowStore", "MemoryRows", "NpyFolder", "TokenRows"]

Rows = np.ndarray | TokenRows  # a batch's rows of one layer: one per sample, or ragged tokens

_MANIFEST = "manifest.json"


class Features(Mapping[str, np.ndarray]):
    """What ``extract()`` returns: ``feats[layer]`` is an N-row array in dataset order (a read-only memmap of
    the layer's file when ``out`` was given; ``feats.path(layer)`` names it). A ragged layer (token outputs of
    masked batches, ``pool=None``) holds every sample's valid tokens, flat: ``feats[layer]`` is [total tokens, ...],
    ``feats.offsets(layer)`` the N + 1 offsets, ``feats.tokens(layer, i)`` sample i's tokens."""

    def __init__(self, arrays: dict[str, np.ndarray], out: Path | None, manifest: dict[str, Any] | None,
                 offsets: dict[str, np.ndarray] | None = None) -> None:
        self._arrays = arrays
        self._offsets = offsets or {}
        self.out = out
        self.manifest = manifest

    def __getitem__(self, layer: str) -> np.ndarray:
        if not isinstance(layer, str):
            raise ArgumentTypeError(f"layer names are strings, got {type(layer).__name__} {layer!r}.")
        try:
            return self._arrays[layer]
        except KeyError:
            raise NotRecordedError(f"{layer!r} was not extracted; layers: {', '.join(self._arrays)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def offsets(self, layer: str) -> np.ndarray:
        """A ragged layer's N + 1 offsets (int64): sample i's tokens are ``feats[layer][offsets[i]:offsets[i + 1]]``
        (on disk: ``<layer>.offsets.npy`` beside ``<layer>.npy``)."""
        self[layer]  # a clear KeyError for a layer that was not extracted
        if layer not in self._offsets:
            raise ArgumentError(f"{layer!r} has one row per sample, not ragged tokens: feats[{layer!r}][i] is sample "
                                "i's row.")
        return self._offsets[layer]

    def tokens(self, layer: str, i: int) -> np.ndarray:
        """Sample ``i``'s valid tokens of a ragged layer, [T_i, ...]."""
        offsets = self.offsets(layer)
        n = len(offsets) - 1
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ArgumentTypeError(f"Features.tokens: i= takes a sample index (int), got {type(i).__name__} {i!r}.")
        if not -n <= i < n:
            raise IndexError(f"sample {i!r} of {layer!r}: there are {n} samples (0 to {n - 1}).")
        i = int(i) % n
        return self._arrays[layer][int(offsets[i]):int(offsets[i + 1])]

    def path(self, layer: str) -> Path:
        """The ``.npy`` file of ``layer`` (its name, or a cleaned name with a hash when the layer name is not a
        plain file name, e.g. holds ``/``)."""
        if self.out is None or self.manifest is None:
            raise ArgumentError("these features are in memory: extract(..., out=DIR) writes files.")
        self[layer]  # a clear KeyError for a layer that was not extracted
        return self.out / self.manifest["files"][layer]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape} {v.dtype}" + (f" tokens of {len(self._offsets[k]) - 1} samples"
                                                          if k in self._offsets else "")
                           for k, v in self._arrays.items())
        return f"<hookkit.Features {shapes}{f' in {self.out}' if self.out else ''}>"


# -- the interface ----------------------------------------------------------------------------------------------------

def row_layout(rows: Rows) -> tuple[list[int], bool]:
    """(the shape of one row, or of one token of a ragged layer; whether it is ragged)."""
    if isinstance(rows, TokenRows):
        return list(rows.flat.shape[1:]), True
    return list(rows.shape[1:]), False


def layout_mismatch(name: str, batch: int, got: tuple[list[int], bool], where: str,
                    before: tuple[list[int], bool]) -> ExtractError:
    """The error for rows that cannot go into the file ``where`` started with ``before``'s layout."""
    (shape, ragged), (shape0, ragged0) = got, before
    if ragged != ragged0:
        kinds = ("the valid tokens of each sample (a mask applied)", "one row per sample (no mask)")
        return ExtractError(
            f"{name!r}: batch {batch} gave {kinds[not ragged]}, but {where} gave {kinds[not ragged0]}. Give every "
            "batch the same mask (an attention_mask in each dict batch, or mask=), or pass mask=False.")
    what = "tokens" if ragged else "rows"
    return ExtractError(
        f"{name!r}: batch {batch} gave {what} of shape {tuple(shape)}, but {where} gave {tuple(shape0)}, and a .npy "
        "file holds rows of one shape. Reduce them to a fixed size with pool= (e.g. pool='avg'); for the token "
        "outputs of padded batches, give each batch an attention_mask (or pass mask=) to store only the valid "
        "tokens; or feed inputs of one size.")


class _RowShapes:
    """Each layer's row shape and kind (ragged or not), as first seen (and where): rows of another layout are
    refused before any is written."""

    def __init__(self, known: dict[str, tuple[tuple[list[int], bool], str]]) -> None:
        self.known = known

    def check(self, rows: dict[str, Rows], batch: int) -> None:
        for name, arr in rows.items():
            got = row_layout(arr)
            before, where = self.known.setdefault(name, (got, f"batch {batch}"))
            if got != before:
                raise layout_mismatch(name, batch, got, where, before)

    def recorded(self) -> dict[str, list[int]]:
        return {k: s for k, ((s, _), _) in self.known.items()}

    def ragged(self) -> list[str]:
        return [k for k, ((_, r), _) in self.known.items() if r]


class RowStore:
    """Rows of every layer by their place in the dataset. Used as ``with store:``; ``close()`` (also on error)
    keeps what was written."""

    background = False  # whether extract() should write from a background thread (worth it for disk writes)

    def resume(self) -> Features | None:
        """Check what the store already holds against this call: the ``Features`` of a finished run, else None."""
        return None

    def done_rows(self) -> list[list[int]]:
        """Row ranges ``[start, stop)`` (sorted, disjoint) already written by any rank: not computed again."""
        return []

    def first_sample(self, args: tuple, kwargs: dict, n: int, valid: Any = None) -> None:
        """The data's first batch (as model input, ``n`` samples; ``valid``: its [N, T] mask of valid tokens, if
        any), seen before any row is written."""

    def write(self, first_row: int, rows: dict[str, Rows], *, batch: int) -> None:
        """Rows ``[first_row, first_row + len)`` of each layer, computed from batch number ``batch``. Called from
        one thread at a time (``extraction.writer.Background``'s), after ``first_sample``."""
        raise NotImplementedError

    def finish(self, batches: int, rows: int) -> Features:
        """Every rank is done and the data held ``batches`` batches and ``rows`` rows: the features."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MemoryRows(RowStore):
    """In memory, one process: each layer's rows as a list of arrays (in data order), concatenated at the end."""

    def __init__(self, names: list[str]) -> None:
        self.arrays: dict[str, list[Rows]] = {n: [] for n in names}
        self.shapes = _RowShapes({})

    def write(self, first_row: int, rows: dict[str, Rows], *, batch: int) -> None:
        self.shapes.check(rows, batch)
        for name, arr in rows.items():
            self.arrays[name].append(arr)

    def finish(self, batches: int, rows: int) -> Features:
        arrays, offsets = {}, {}
        for name, parts in self.arrays.items():
            if parts and isinstance(parts[0], TokenRows):
                tokens = [p for p in parts if isinstance(p, TokenRows)]
                arrays[name] = np.concatenate([p.flat for p in tokens])
                offsets[name] = np.concatenate([[0], np.cumsum(np.concatenate([p.counts for p in tokens]))])
                offsets[name] = offsets[name].astype(np.int64)
            else:
                arrays[name] = np.concatenate([p for p in parts if isinstance(p, np.ndarray)])
        return Features(arrays, None, None, offsets)


class NpyFolder(RowStore):
    """The ``.npy`` folder ``out`` (see the module docstring), written as ``rank`` of ``world``: makes the folder
    and takes this rank's lock when built (errors say which folder and why)."""

    background = True

    def __init__(self, out: Path, names: list[str], settings: dict[str, Any], samples: int | None, *, rank: int,
                 world: int, dist: Any) -> None:
        self.out = out
        self.names = names
        self.settings = settings
        self.samples = samples
        self.rank = rank
        self.world = world
        self.dist = dist
        try:
            (out / "progress").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExtractError(f"out={str(out)!r} is not a writable folder ({exc.strerror or exc}); "
                               "choose another.") from None
        self._lock: _Lock | None = _lock(out, rank)
        self.files = _file_names(names)
        self.manifest: dict[str, Any] | None = None
        self.sample0: str | None = None
        self._done: list[list[int]] = []
        self._own = out / "progress" / f"rank-{rank}.json"
        self._mine: list[list[int]] = []
        self._shapes = _RowShapes({})
        self._dtypes: dict[str, str] = {}
        self._row_files: dict[str, RowFile | TokenFiles] = {}
        self._token_ends: dict[str, int] = {}  # where this rank's chunk of each ragged layer goes on
        self._agreed: set[str] = set()  # layers whose layout this process checked against the other ranks'

    def resume(self) -> Features | None:
        out, names = self.out, self.names
        manifest = _read_manifest(out)
        if manifest is not None:
            _check_same(out, manifest, self.settings, self.samples)
            if manifest.get("complete"):
                return _open_finished(out, manifest, names)
            _check_partials(out, names, self.files, self.rank, self.world)
        else:
            _start_fresh(out, self.rank, self.world)
        if self.dist is not None:
            self.dist.barrier()  # every rank has checked the files before any rank writes
        done, known_shapes, dtypes, ragged = _all_progress(out)
        self.manifest = manifest
        self._done = done
        self._mine = _read_progress(self._own)["rows"]
        self._shapes = _RowShapes({n: ((s, n in ragged), f"the rows already in {out}")
                                   for n, s in known_shapes.items() if n in names})
        self._dtypes = {n: d for n, d in dtypes.items() if n in names}
        self._token_ends = {n: chunk_end(out, self.files[n], self.rank, done) for n in ragged if n in names}
        return None

    def done_rows(self) -> list[list[int]]:
        return self._done

    def first_sample(self, args: tuple, kwargs: dict, n: int, valid: Any = None) -> None:
        self.sample0 = digest = sample0_digest(args, kwargs, n, valid)
        before = (self.manifest or {}).get("data", {}).get("sample0")
        if before is not None and before != digest:
            raise ExtractError(
                f"sample 0 of data differs from the one the extraction in {self.out} started on: the dataset changed "
                "(other content or order; random transforms or shuffle=True do this too), so its rows would not "
                "match. Use another out= folder, or delete this one to start over.")

    def write(self, first_row: int, rows: dict[str, Rows], *, batch: int) -> None:
        self._shapes.check(rows, batch)
        out = self.out
        for name, arr in rows.items():
            if name not in self._agreed:
                _agree(out, self.files[name], name, row_layout(arr), batch, self.rank)
                self._agreed.add(name)
        if self.manifest is None and self.rank == 0:  # only once a batch gave good rows: bad options leave no trace
            self.manifest = _manifest(self.settings, self.samples, self.sample0, self.files)
            with _Writing(out / _MANIFEST):
                _atomic_json(out / _MANIFEST, self.manifest)
        for name, arr in rows.items():
            path = out / (chunk_name(self.files[name], self.rank) if isinstance(arr, TokenRows)
                          else f"{self.files[name]}.partial")
            with _Writing(path):  # errors name the file this rank writes
                f = self._open_file(name, arr)
                f.write(first_row, arr)  # type: ignore[arg-type]
                f.sync()
        n = len(next(iter(rows.values())))
        self._mine[:] = _merge([*self._mine, [first_row, first_row + n]])
        # Only after the rows are on disk (synced above): neither a killed process nor a power cut leaves progress
        # claiming rows that are not in the files.
        with _Writing(self._own):
            _atomic_json(self._own, {"rows": self._mine, "shapes": self._shapes.recorded(), "dtypes": self._dtypes,
                                     "ragged": self._shapes.ragged()})

    def _open_file(self, name: str, arr: Rows) -> RowFile | TokenFiles:
        if name not in self._row_files:
            shape, ragged = row_layout(arr)
            self._dtypes.setdefault(name, (arr.flat if isinstance(arr, TokenRows) else arr).dtype.str)
            dtype = np.dtype(self._dtypes[name])
            if ragged:
                self._row_files[name] = TokenFiles(self.out, self.files[name], self.rank, dtype, tuple(shape),
                                                   self._token_ends.get(name, 0))
            else:
                self._row_files[name] = RowFile(self.out / f"{self.files[name]}.partial", dtype, tuple(shape))
        return self._row_files[name]

    def finish(self, batches: int, rows: int) -> Features:
        """Rank 0 finishes the files once every rank is done (the ranks wait for each other); every rank returns
        the finished folder."""
        self._close_files()
        out, dist = self.out, self.dist
        error: BaseException | None = None
        if dist is not None:
            dist.barrier()
        if self.rank == 0:
            try:
                _complete(out, _manifest(self.settings, self.samples, self.sample0, self.files), self.names,
                          batches=batches, rows=rows)
            except BaseException as exc:  # raised after the barrier, so that the other ranks are not left waiting
                if dist is None:
                    raise
                error = exc
        if dist is not None:
            dist.barrier()
        if error is not None:
            raise error
        manifest = _read_manifest(out)
        if manifest is None or not manifest.get("complete"):
            raise ExtractError(f"rank 0 could not finish the files in {out} (its error says why); run the same call "
                               "again to complete them.")
        return _open_finished(out, manifest, self.names)

    def _close_files(self) -> None:
        for f in self._row_files.values():
            f.close()

    def close(self) -> None:
        self._close_files()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _agree(out: Path, file: str, name: str, layout: tuple[list[int], bool], batch: int, rank: int) -> None:
    """The ranks agree on a layer's row layout before any writes it: the first to write ``progress/<file>.layout``
    (created whole with ``os.link``, so exactly one wins) sets it, and a rank whose rows differ is refused before
    its rows reach the shared file."""
    path = out / "progress" / f"{file}.layout"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with _Writing(path):
        tmp.write_text(json.dumps({"shape": layout[0], "ragged": layout[1], "where": f"rank {rank}'s batch {batch}"}))
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        first = json.loads(path.read_text())
        before = (list(first["shape"]), bool(first["ragged"]))
        where = str(first["where"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable (cut by a crash): the progress files' shapes still guard a resumed run
    if before != layout:
        raise layout_mismatch(name, batch, layout, where, before)


# -- row ranges -------------------------------------------------------------------------------------------------------

def _merge(ranges: Iterable[Iterable[int]]) -> list[list[int]]:
    """Sorted, disjoint ``[start, stop)`` row ranges."""
    out: list[list[int]] = []
    for a, b in sorted([int(a), int(b)] for a, b in ranges):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _clip(ranges: list[list[int]], limit: int) -> list[list[int]]:
    return [[a, min(b, limit)] for a, b in ranges if a < limit]


def _gaps(ranges: list[list[int]], n: int) -> list[list[int]]:
    gaps, at = [], 0
    for a, b in _clip(ranges, n):
        if a > at:
            gaps.append([at, a])
        at = max(at, b)
    if at < n:
        gaps.append([at, n])
    return gaps


# -- the folder's files -----------------------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,150}")


def _file_names(names: list[str]) -> dict[str, str]:
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


def _atomic_json(path: Path, data: Any) -> None:
    """Replace ``path`` whole with ``data``, durably: the new file is synced before the rename and the folder after
    it, so that after a power cut ``path`` holds the old or the new content, and the new one once this returns."""
    write_bytes(path, json.dumps(data, indent=1).encode())


class _Writing:
    """``with _Writing(path):`` around a write: a full disk (or any OS error) becomes an ExtractError that names
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


class _Lock:
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


def _lock(out: Path, rank: int) -> _Lock:
    path = out / "progress" / f"rank-{rank}.lock"
    try:
        return _Lock(path)
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


def _try_lock(path: Path) -> _Lock | None:
    try:
        return _Lock(path)
    except OSError:
        return None


def _manifest(settings: dict[str, Any], samples: int | None, sample0: str | None, files: dict[str, str],
              **finished: Any) -> dict[str, Any]:
    return {"settings": settings, "data": {"samples": samples, "sample0": sample0}, "files": files,
            "complete": bool(finished), **finished,
            "hookkit": _version, "torch": torch.__version__, "python": sys.version.split()[0]}


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / _MANIFEST
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
    manifest = _read_manifest(out) if (out / _MANIFEST).is_file() else None
    if manifest is None:
        return 0, False
    if manifest.get("complete"):
        return int(manifest.get("rows", 0)), True
    rows = _all_progress(out)[0] if (out / "progress").is_dir() else []
    return sum(b - a for a, b in rows), False


def _read_progress(path: Path) -> dict[str, Any]:
    """One rank's progress; an unreadable or old-format file counts as nothing done (those rows are recomputed)."""
    try:
        data = json.loads(path.read_text())
        return {"rows": _merge(data["rows"]), "shapes": dict(data.get("shapes", {})),
                "dtypes": dict(data.get("dtypes", {})), "ragged": list(data.get("ragged", []))}
    except (OSError, ValueError, KeyError, TypeError):
        return {"rows": [], "shapes": {}, "dtypes": {}, "ragged": []}


def _all_progress(out: Path) -> tuple[list[list[int]], dict[str, list[int]], dict[str, str], set[str]]:
    """What every rank's progress file says: the rows written, each layer's row (or token) shape and dtype, and
    which layers are ragged."""
    rows: list[list[int]] = []
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    ragged: set[str] = set()
    for path in sorted((out / "progress").glob("rank-*.json")):
        p = _read_progress(path)
        rows += p["rows"]
        for name, shape in p["shapes"].items():
            if shapes.setdefault(name, shape) != shape:
                raise ExtractError(f"{out}: ranks wrote rows of two shapes for {name!r} ({shapes[name]} and "
                                   f"{shape}); delete the folder and run again with pool= or inputs of one size.")
        for name, dt in p["dtypes"].items():
            dtypes.setdefault(name, dt)
        ragged.update(p["ragged"])
    return _merge(rows), shapes, dtypes, ragged


def _clip_progress(path: Path, limit: int) -> None:
    p = _read_progress(path)
    with _Writing(path):
        if limit == 0:
            path.unlink(missing_ok=True)
        else:
            _atomic_json(path, {**p, "rows": _clip(p["rows"], limit)})


def _forget_rows(out: Path, rank: int, world: int, limit: int) -> None:
    """Forget progress at and after row ``limit``: this rank's file, and (rank 0) the files of ranks beyond this
    job's ``world`` (left by a run with more ranks) that no live process holds. The job's ranks forget their own."""
    _clip_progress(out / "progress" / f"rank-{rank}.json", limit)
    if rank != 0:
        return
    for path in (out / "progress").glob("rank-*.json"):
        number = path.stem.removeprefix("rank-")
        if not number.isdigit() or int(number) < world:
            continue
        held = _try_lock(path.with_suffix(".lock"))
        if held is not None:
            try:
                _clip_progress(path, limit)
            finally:
                held.release()


def _check_partials(out: Path, names: list[str], files: dict[str, str], rank: int, world: int) -> None:
    """Each ``.partial`` must hold every row the progress files claim; rows a deleted or cut file lost are
    forgotten (and computed again), never returned as zeros. Called by ``NpyFolder.resume``, itself called by
    ``extract()``: the warning's ``stacklevel`` points at the user's call."""
    rows, shapes, dtypes, ragged = _all_progress(out)
    if not rows:
        return
    end = rows[-1][1]
    limit = end
    problems = []
    for name in names:
        path = out / f"{files[name]}.partial"
        if name not in shapes or name not in dtypes:
            problems.append(f"no row shape of {name!r} is recorded")
            limit = 0
            continue
        if name in ragged:
            lost = lost_from(out, files[name], np.dtype(dtypes[name]), shapes[name], rows)
            if lost is not None:
                limit = min(limit, lost)
                problems.append(f"the token files of {name!r} lost rows from {lost} on")
            continue
        row_bytes = int(np.prod(shapes[name], dtype=np.int64)) * np.dtype(dtypes[name]).itemsize
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            limit = 0
            continue
        held = (size - HEADER_BYTES) // row_bytes if row_bytes else end
        if held < end:
            limit = min(limit, max(held, 0))
            problems.append(f"{path} holds {max(held, 0)} rows where {end} were written")
    if problems:
        warnings.warn(f"{'; '.join(problems)}: rows from {limit} on are computed again.", stacklevel=4)
        _forget_rows(out, rank, world, limit)


def _start_fresh(out: Path, rank: int, world: int) -> None:
    """No manifest: nothing in the folder is known to belong to this call, so no earlier progress (nor the layouts
    its ranks agreed on) counts."""
    _forget_rows(out, rank, world, 0)
    if rank == 0:
        for path in (out / "progress").glob("*.layout"):
            path.unlink(missing_ok=True)


def _check_same(out: Path, manifest: dict[str, Any], settings: dict[str, Any], samples: int | None) -> None:
    old = manifest["settings"]
    differ = [k for k in settings if old.get(k) != settings[k]]
    if differ:
        raise ExtractError(
            f"{out} holds features of another extraction ({', '.join(differ)} differ from this call's), "
            "so continuing would mix data. Use another out= folder, or delete this one to start over.")
    before = manifest.get("data", {}).get("samples")
    if samples is not None and before is not None and samples != before:
        raise ExtractError(
            f"data holds {samples} samples, but the extraction in {out} was started on {before}: the dataset "
            "changed, so its rows would not match. Use another out= folder, or delete this one to start over.")


def _open_finished(out: Path, manifest: dict[str, Any], names: list[str]) -> Features:
    """A finished folder as it is; renames left undone by an interrupted finish are completed."""
    _put_in_place(out, manifest, names)
    files, ragged = manifest["files"], manifest.get("ragged", {})
    arrays = {n: np.load(out / files[n], mmap_mode="r") for n in names}
    offsets_arrays = {n: np.load(out / offsets_name(files[n]), mmap_mode="r") for n in names if n in ragged}
    return Features(arrays, out, manifest, offsets_arrays)


def _put_in_place(out: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """After the commit point (the manifest says complete): rename each file to its final name (those not renamed
    yet), check its size, and delete the working files of ragged layers."""
    files = manifest["files"]
    ragged = manifest.get("ragged", {})
    for name in names:
        finals = [(files[name], ragged[name]["source"] if name in ragged else f"{files[name]}.partial",
                   npy_bytes(manifest["dtypes"][name], manifest["shapes"][name]))]
        if name in ragged:
            offsets = offsets_name(files[name])
            finals.append((offsets, f"{offsets}.partial", npy_bytes(np.dtype(np.int64), [manifest["rows"] + 1])))
        for final, source, expected in finals:
            path = out / final
            if not path.exists():
                try:
                    os.replace(out / source, path)
                except FileNotFoundError:
                    if not path.exists():  # not renamed by a process beside us either
                        raise ExtractError(
                            f"{path} is missing, but {out / _MANIFEST} says the extraction finished. To compute it "
                            "again, delete the folder (or use another out=) and run the same call.") from None
            if path.stat().st_size != expected:
                raise ExtractError(f"{path} has {path.stat().st_size} bytes where the finished extraction wrote "
                                   f"{expected}: it was changed. Delete the folder (or use another out=) and run "
                                   "the same call to compute it again.")
        if name in ragged:
            for path in leftovers(out, files[name]):  # the chunks and index, once the layer is in place
                path.unlink(missing_ok=True)


def _complete(out: Path, manifest: dict[str, Any], names: list[str], *, batches: int, rows: int) -> None:
    """Rank 0, after every rank is done: check that every row 0..N-1 is written, give each file its final header
    and length, mark the manifest complete (the commit point), then rename the files."""
    current = _read_manifest(out)
    if current is not None and current.get("complete"):
        return  # finished by another process: never replace finished files
    written, shapes, dtypes, ragged = _all_progress(out)
    if written and written[-1][1] > rows:
        raise ExtractError(
            f"{out} holds {written[-1][1]} rows written earlier, but data now gives only {rows}: the dataset "
            "shrank or changed since the extraction began, so its rows would not match. Use another out= folder, "
            "or delete this one to start over.")
    gaps = _gaps(written, rows)
    if gaps:
        listed = ", ".join(f"{a}..{b - 1}" for a, b in gaps[:5])
        raise ExtractError(f"rows {listed} of {rows} were not written by any rank; run the same call again to "
                           "complete them.")
    files = manifest["files"]
    finished: dict[str, dict[str, Any]] = {}
    for name in names:
        partial = out / f"{files[name]}.partial"
        dt = np.dtype(dtypes[name])
        if name in ragged:
            with _Writing(partial):
                source, tokens = assemble(out, files[name], rows, dt, shapes[name])
            finished[name] = {"source": source, "tokens": tokens}
            continue
        need = npy_bytes(dt, (rows, *shapes[name]))
        size = partial.stat().st_size if partial.exists() else None
        if size is None or size < need:
            raise ExtractError(f"{partial} {'is missing' if size is None else 'was cut short'} while this run "
                               "wrote into it (by another program?). Run the same call again: the lost rows are "
                               "computed again.")
        with _Writing(partial):
            finish_file(partial, dt, (rows, *shapes[name]))
    manifest.update(complete=True, batches=batches, rows=rows, dtypes={n: dtypes[n] for n in names},
                    shapes={n: [finished[n]["tokens"] if n in finished else rows, *shapes[n]] for n in names},
                    ragged=finished)
    with _Writing(out / _MANIFEST):
        _atomic_json(out / _MANIFEST, manifest)
    _put_in_place(out, manifest, names)
