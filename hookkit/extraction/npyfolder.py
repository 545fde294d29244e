"""The ``.npy`` folder ``extract(..., out=DIR)`` writes: ``NpyFolder``, the row store on disk, and how it finishes.

On disk: ``manifest.json`` and ``progress/`` (``extraction.manifest``), ``<file>.npy.partial`` receiving rows at their
final place (``extraction.npy.RowFile``), and ``progress/<file>.layout``, the row shape the first rank to write a layer
set, which every other rank checks before it writes (rows of another shape never reach the shared file). A ragged
layer (token outputs of masked batches) is written through ``extraction.tokens.TokenFiles`` (per-rank chunks and a
shared index) and assembled at the finish into ``<layer>.npy`` and ``<layer>.offsets.npy``. Each batch's rows go to
the rows ``write`` is given (its samples' indices, in any order). Finished work is tracked by rows, not batches (a
byte per row in ``progress/rank-R.rows``), so a resumed run may use another batch size, other batches or another
number of ranks; an unfinished folder whose progress files are kept another way (an older hookkit's) is refused
(``_check_format``). Rank 0 finishes the files (``_complete``: checks that every row is written, writes the final
headers, marks the manifest complete, then renames) once every rank is done; a folder already marked complete is
never finished again, whoever finished it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hookkit._errors import ExtractError
from hookkit.core import fs
from hookkit.extraction.dtypes import torch_names
from hookkit.extraction.fingerprint import sample0_digest
from hookkit.extraction.manifest import (
    MANIFEST,
    PROGRESS_FORMAT,
    DoneRows,
    Lock,
    Writing,
    all_progress,
    done_end,
    file_names,
    forget_rows,
    new_manifest,
    read_manifest,
    read_progress,
    row_gaps,
    take_lock,
    write_json,
)
from hookkit.extraction.npy import HEADER_BYTES, RowFile, finish_file, npy_bytes
from hookkit.extraction.rowstore import Features, Rows, RowShapes, RowStore, layout_mismatch, row_layout
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

__all__ = ["NpyFolder", "open_finished"]


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
        self._lock: Lock | None = take_lock(out, rank)
        self.files = file_names(names)
        self.manifest: dict[str, Any] | None = None
        self.sample0: str | None = None
        self._done = np.zeros(0, dtype=bool)
        self._own = out / "progress" / f"rank-{rank}.json"
        self._marks: DoneRows | None = None  # progress/rank-R.rows, opened at the first write
        self._layouts: dict[str, Any] = {}  # what this rank's progress json says now
        self._shapes = RowShapes({})
        self._dtypes: dict[str, str] = {}
        self._row_files: dict[str, RowFile | TokenFiles] = {}
        self._token_ends: dict[str, int] = {}  # where this rank's chunk of each ragged layer goes on
        self._agreed: set[str] = set()  # layers whose layout this process checked against the other ranks'

    def resume(self) -> Features | None:
        out, names = self.out, self.names
        manifest = read_manifest(out)
        if manifest is not None:
            _check_same(out, manifest, self.settings, self.samples)
            if manifest.get("complete"):
                return open_finished(out, manifest, names)
            _check_format(out, manifest)
            _check_partials(out, names, self.files, self.rank, self.world)
        else:
            _start_fresh(out, self.rank, self.world)
        if self.dist is not None:
            self.dist.barrier()  # every rank has checked the files before any rank writes
        done, known_shapes, dtypes, ragged = all_progress(out)
        self.manifest = manifest
        self._done = done
        own = read_progress(self._own)
        self._layouts = {k: own[k] for k in ("shapes", "dtypes", "ragged")}
        self._shapes = RowShapes({n: ((s, n in ragged), f"the rows already in {out}")
                                   for n, s in known_shapes.items() if n in names})
        self._dtypes = {n: d for n, d in dtypes.items() if n in names}
        self._token_ends = {n: chunk_end(out, self.files[n], self.rank, done) for n in ragged if n in names}
        return None

    def done_rows(self) -> np.ndarray:
        return self._done

    def first_sample(self, args: tuple, kwargs: dict, n: int, valid: Any = None, *, at: int = 0) -> None:
        self.sample0 = digest = sample0_digest(args, kwargs, n, valid, at=at)
        before = (self.manifest or {}).get("data", {}).get("sample0")
        if before is not None and before != digest:
            raise ExtractError(
                f"sample 0 of data differs from the one the extraction in {self.out} started on: the dataset changed "
                "(other content or order; random transforms or shuffle=True do this too), so its rows would not "
                "match. Use another out= folder, or delete this one to start over.")

    def write(self, at: np.ndarray, rows: dict[str, Rows], *, batch: int) -> None:
        self._shapes.check(rows, batch)
        out = self.out
        for name, arr in rows.items():
            if name not in self._agreed:
                _agree(out, self.files[name], name, row_layout(arr), batch, self.rank)
                self._agreed.add(name)
        if self.manifest is None and self.rank == 0:  # only once a batch gave good rows: bad options leave no trace
            self.manifest = new_manifest(self.settings, self.samples, self.sample0, self.files)
            with Writing(out / MANIFEST):
                write_json(out / MANIFEST, self.manifest)
        for name, arr in rows.items():
            path = out / (chunk_name(self.files[name], self.rank) if isinstance(arr, TokenRows)
                          else f"{self.files[name]}.partial")
            with Writing(path):  # errors name the file this rank writes
                f = self._open_file(name, arr)
                f.write(at, arr)  # type: ignore[arg-type]
                f.sync()
        layouts = {"shapes": self._shapes.recorded(), "dtypes": self._dtypes, "ragged": self._shapes.ragged()}
        if layouts != self._layouts:  # a layer's first rows: its shape is known before any of its rows is marked
            with Writing(self._own):
                write_json(self._own, layouts)
            self._layouts = json.loads(json.dumps(layouts))  # a copy: later layers add to the live dicts
        # Only after the rows are on disk (synced above): neither a killed process nor a power cut leaves progress
        # claiming rows that are not in the files.
        marks = self.out / "progress" / f"rank-{self.rank}.rows"
        with Writing(marks):
            if self._marks is None:
                self._marks = DoneRows(marks)
            self._marks.mark(at)
            self._marks.sync()

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
                _complete(out, new_manifest(self.settings, self.samples, self.sample0, self.files), self.names,
                          batches=batches, rows=rows)
            except BaseException as exc:  # raised after the barrier, so that the other ranks are not left waiting
                if dist is None:
                    raise
                error = exc
        if dist is not None:
            dist.barrier()
        if error is not None:
            raise error
        manifest = read_manifest(out)
        if manifest is None or not manifest.get("complete"):
            raise ExtractError(f"rank 0 could not finish the files in {out} (its error says why); run the same call "
                               "again to complete them.")
        return open_finished(out, manifest, self.names)

    def _close_files(self) -> None:
        for f in self._row_files.values():
            f.close()
        if self._marks is not None:
            self._marks.close()

    def close(self) -> None:
        self._close_files()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _agree(out: Path, file: str, name: str, layout: tuple[list[int], bool], batch: int, rank: int) -> None:
    """The ranks agree on a layer's row layout before any writes it: the first to write ``progress/<file>.layout``
    (created whole by ``fs.create_once``, so exactly one wins) sets it, and a rank whose rows differ is refused before
    its rows reach the shared file."""
    path = out / "progress" / f"{file}.layout"
    first = {"shape": layout[0], "ragged": layout[1], "where": f"rank {rank}'s batch {batch}"}
    with Writing(path):
        if fs.create_once(path, json.dumps(first).encode()):
            return
    try:
        first = json.loads(path.read_text())
        before = (list(first["shape"]), bool(first["ragged"]))
        where = str(first["where"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable (cut by a crash): the progress files' shapes still guard a resumed run
    if before != layout:
        raise layout_mismatch(name, batch, layout, where, before)


def _check_partials(out: Path, names: list[str], files: dict[str, str], rank: int, world: int) -> None:
    """Each ``.partial`` must hold every row the progress files claim; rows a deleted or cut file lost are
    forgotten (and computed again), never returned as zeros. Called by ``NpyFolder.resume``, itself called by
    ``extract()``: the warning's ``stacklevel`` points at the user's call."""
    rows, shapes, dtypes, ragged = all_progress(out)
    end = done_end(rows)
    if not end:
        return
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
        forget_rows(out, rank, world, limit)


def _start_fresh(out: Path, rank: int, world: int) -> None:
    """No manifest: nothing in the folder is known to belong to this call, so no earlier progress (nor the layouts
    its ranks agreed on) counts."""
    forget_rows(out, rank, world, 0)
    if rank == 0:
        for path in (out / "progress").glob("*.layout"):
            path.unlink(missing_ok=True)


def _check_format(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse an unfinished folder whose progress files are kept another way than this hookkit's (an older one's):
    they would be misread."""
    if manifest.get("progress_format") != PROGRESS_FORMAT:
        raise ExtractError(
            f"{out} holds an unfinished extraction started by hookkit {manifest.get('hookkit', '(an older one)')}, "
            "whose progress files this version does not read. Finish it with that version, or delete the folder "
            "(or use another out=) to start over.")


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


def open_finished(out: Path, manifest: dict[str, Any], names: list[str]) -> Features:
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
    renamed = False
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
                    renamed = True
                except FileNotFoundError:
                    if not path.exists():  # not renamed by a process beside us either
                        raise ExtractError(
                            f"{path} is missing, but {out / MANIFEST} says the extraction finished. To compute it "
                            "again, delete the folder (or use another out=) and run the same call.") from None
            if path.stat().st_size != expected:
                raise ExtractError(f"{path} has {path.stat().st_size} bytes where the finished extraction wrote "
                                   f"{expected}: it was changed. Delete the folder (or use another out=) and run "
                                   "the same call to compute it again.")
        if name in ragged:
            for path in leftovers(out, files[name]):  # the chunks and index, once the layer is in place
                path.unlink(missing_ok=True)
    if renamed:
        fs.sync_folder(out)  # the final names survive a power cut


def _complete(out: Path, manifest: dict[str, Any], names: list[str], *, batches: int, rows: int) -> None:
    """Rank 0, after every rank is done: check that every row 0..N-1 is written, give each file its final header
    and length, mark the manifest complete (the commit point), then rename the files."""
    current = read_manifest(out)
    if current is not None and current.get("complete"):
        return  # finished by another process: never replace finished files
    written, shapes, dtypes, ragged = all_progress(out)
    if done_end(written) > rows:
        raise ExtractError(
            f"{out} holds {int(written.sum())} rows written earlier (up to row {done_end(written) - 1}), but data "
            f"now gives only {rows}: the "
            "dataset shrank or changed since the extraction began, so its rows would not match. Use another out= "
            "folder, or delete this one to start over.")
    gaps = row_gaps(written, rows)
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
            with Writing(partial):
                source, tokens = assemble(out, files[name], rows, dt, shapes[name])
            finished[name] = {"source": source, "tokens": tokens}
            continue
        need = npy_bytes(dt, (rows, *shapes[name]))
        size = partial.stat().st_size if partial.exists() else None
        if size is None or size < need:
            raise ExtractError(f"{partial} {'is missing' if size is None else 'was cut short'} while this run "
                               "wrote into it (by another program?). Run the same call again: the lost rows are "
                               "computed again.")
        with Writing(partial):
            finish_file(partial, dt, (rows, *shapes[name]))
    manifest.update(complete=True, batches=batches, rows=rows, dtypes={n: dtypes[n] for n in names},
                    torch_dtypes=torch_names(names, dtypes, manifest["settings"].get("dtype")),
                    shapes={n: [finished[n]["tokens"] if n in finished else rows, *shapes[n]] for n in names},
                    ragged=finished)
    with Writing(out / MANIFEST):
        write_json(out / MANIFEST, manifest)
    _put_in_place(out, manifest, names)
