"""Ragged layers on disk: each sample's valid tokens, flat, with offsets saying whose they are.

A finished ragged layer is two plain ``.npy`` files: ``<layer>.npy`` of shape [total valid tokens, ...] and
``<layer>.offsets.npy`` (N + 1 int64): sample i's tokens are rows ``offsets[i]:offsets[i + 1]``.

While a run is unfinished the tokens cannot be at their final place: where sample i's tokens start depends on the length
of every sample before it, which another rank (or a later run) may compute. So ``extraction.npyfolder.NpyFolder`` keeps,
per ragged layer and rank, a ``TokenFiles``: the rank appends its tokens to its own chunk ``<file>.rank-R.partial`` and
writes, at row i of the shared ``<file>.index.partial`` ([N, 3] int64), where sample i's tokens are: (rank, first token
in that chunk, count); a batch's samples may be any rows, in any order. Both are written (and synced) before the rank's
progress file says row i is done. ``chunk_end`` (on resume) finds where a rank appends next; ``lost_from`` finds rows
whose tokens a cut or deleted file lost; ``assemble`` (rank 0, finishing) turns the index into offsets and copies the
chunks into one file in row order, a block at a time: a one-process run whose chunk is already in row order (batches
in corpus order) is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hookkit._errors import ExtractError
from hookkit.extraction.manifest import done_end
from hookkit.extraction.npy import HEADER_BYTES, RowFile, finish_file

__all__ = ["TokenRows", "TokenFiles", "chunk_name", "index_name", "offsets_name", "chunk_end", "lost_from",
           "assemble", "leftovers"]

_INDEX = np.dtype(np.int64)


@dataclass
class TokenRows:
    """One batch's rows of a ragged layer: ``flat`` [sum(counts), ...] holds the valid tokens of its ``n`` samples in
    order, ``counts`` [n] (int64) how many each has."""

    flat: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes + self.counts.nbytes)


def chunk_name(file: str, rank: int) -> str:
    return f"{file}.rank-{rank}.partial"


def index_name(file: str) -> str:
    return f"{file}.index.partial"


def offsets_name(file: str) -> str:
    """``x.npy`` -> ``x.offsets.npy``."""
    return f"{file.removesuffix('.npy')}.offsets.npy"


def leftovers(out: Path, file: str) -> list[Path]:
    """The working files of a ragged layer (chunks, index), deleted once it is finished."""
    return [*out.glob(f"{file}.rank-*.partial"), out / index_name(file)]


class TokenFiles:
    """One ragged layer's files as rank ``rank`` writes them: its chunk (appended from token ``end``) and the
    shared index."""

    def __init__(self, out: Path, file: str, rank: int, dtype: np.dtype, token_shape: tuple[int, ...],
                 end: int) -> None:
        self.rank = rank
        self.end = end
        self.index = RowFile(out / index_name(file), _INDEX, (3,))
        try:
            self.chunk = RowFile(out / chunk_name(file, rank), dtype, token_shape)
        except BaseException:
            self.index.close()
            raise

    def write(self, at: np.ndarray, rows: TokenRows) -> None:
        """The batch's tokens appended to the chunk (in batch order), and the index entry of its sample ``at[j]``
        at row ``at[j]``."""
        counts = rows.counts.astype(np.int64, copy=False)
        self.chunk.write(self.end, rows.flat)
        starts = self.end + np.cumsum(counts) - counts
        self.index.write(at, np.stack([np.full_like(counts, self.rank), starts, counts], axis=1))
        self.end += int(counts.sum())

    def sync(self) -> None:
        self.chunk.sync()
        self.index.sync()

    def close(self) -> None:
        self.chunk.close()
        self.index.close()


def _done_mask(done: np.ndarray, rows: int) -> np.ndarray:
    """``done`` (a mask of done rows) cut or padded to ``rows``."""
    mask = np.zeros(rows, dtype=bool)
    mask[:min(rows, len(done))] = done[:rows]
    return mask


def _read_index(out: Path, file: str, rows: int) -> tuple[np.ndarray, int]:
    """The first ``rows`` entries of the index (zeros where none was written) and how many whole entries the file
    holds."""
    path = out / index_name(file)
    if not path.exists():
        return np.zeros((rows, 3), dtype=_INDEX), 0
    f = RowFile(path, _INDEX, (3,))
    try:
        return f.read(0, rows).copy(), f.held()
    finally:
        f.close()


def chunk_end(out: Path, file: str, rank: int, done: np.ndarray) -> int:
    """Where rank ``rank`` appends its next tokens: past every token of a done row in its chunk (anything beyond was
    written by a run killed before its progress said so, and is overwritten)."""
    rows = done_end(done)
    index, _ = _read_index(out, file, rows)
    entries = index[_done_mask(done, rows) & (index[:, 0] == rank)]
    return int((entries[:, 1] + entries[:, 2]).max()) if len(entries) else 0


def lost_from(out: Path, file: str, dtype: np.dtype, token_shape: list[int], done: np.ndarray) -> int | None:
    """The first done row whose index entry or tokens are no longer in the files (cut or deleted by hand), else
    None."""
    rows = done_end(done)
    index, held_rows = _read_index(out, file, rows)
    bad = _done_mask(done, rows) & (np.arange(rows) >= held_rows)
    held: dict[int, int] = {}
    for rank in np.unique(index[:, 0]).tolist():
        path = out / chunk_name(file, int(rank))
        if path.exists():
            chunk = RowFile(path, dtype, tuple(token_shape))
            held[rank] = chunk.held()
            chunk.close()
        else:
            held[rank] = 0
        beyond = (index[:, 0] == rank) & (index[:, 1] + index[:, 2] > held[rank])
        bad |= _done_mask(done, rows) & beyond
    where = np.flatnonzero(bad)
    return int(where[0]) if len(where) else None


_BLOCK_BYTES = 64 << 20  # tokens gathered per write when assembling


def _gather(out: Path, file: str, index: np.ndarray, offsets: np.ndarray, dtype: np.dtype, shape: tuple[int, ...],
            target: RowFile) -> None:
    """Every row's tokens from its rank's chunk to its place in ``target``, in row order, in blocks of about
    ``_BLOCK_BYTES``: each block is gathered from read-only memory maps of the chunks (rows in any order, e.g.
    batches grouped by length, cost one write per block, not one per row) and written in one piece."""
    token_bytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    budget = max(1, _BLOCK_BYTES // token_bytes)
    chunks: dict[int, np.ndarray] = {}
    rows, row = len(index), 0
    while row < rows:
        stop = min(max(int(np.searchsorted(offsets, offsets[row] + budget, side="right")) - 1, row + 1), rows)
        block = np.empty((int(offsets[stop] - offsets[row]), *shape), dtype)
        part, starts = index[row:stop], offsets[row:stop] - offsets[row]
        for rank in np.unique(part[:, 0]).tolist():
            mine = part[:, 0] == rank
            counts = part[mine, 2]
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            source = np.repeat(part[mine, 1], counts) + within
            if rank not in chunks:
                chunks[rank] = _mapped(out / chunk_name(file, rank), dtype, shape, token_bytes)
            if len(source) and int(source.max()) >= len(chunks[rank]):
                raise ExtractError(f"{out / chunk_name(file, rank)} ends before its token {int(source.max())}: it "
                                   "was cut while this run wrote into it (by another program?). Run the same call "
                                   "again: the lost rows are computed again.")
            block[np.repeat(starts[mine], counts) + within] = chunks[rank][source]
        target.write(int(offsets[row]), block)
        row = stop


def _mapped(path: Path, dtype: np.dtype, shape: tuple[int, ...], token_bytes: int) -> np.ndarray:
    """A chunk's tokens as a read-only memory map (empty when it holds none)."""
    held = max(path.stat().st_size - HEADER_BYTES, 0) // token_bytes if path.exists() else 0
    if held == 0:
        return np.zeros((0, *shape), dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(held, *shape))


def assemble(out: Path, file: str, rows: int, dtype: np.dtype, token_shape: list[int]) -> tuple[str, int]:
    """Rank 0, finishing: the layer's tokens in row order in one finished ``.npy`` (its name inside ``out`` is
    returned, with the number of tokens) and ``offsets_name(file) + ".partial"`` finished beside it."""
    index, _ = _read_index(out, file, rows)
    counts = index[:, 2]
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    shape = tuple(token_shape)
    if (index[:, 0] == 0).all() and (index[:, 1] == offsets[:-1]).all():
        source = chunk_name(file, 0)  # already in row order: finished in place, no copy
    else:
        source = f"{file}.partial"
        target = RowFile(out / source, dtype, shape)
        try:
            _gather(out, file, index, offsets, np.dtype(dtype), shape, target)
            target.sync()
        finally:
            target.close()
    finish_file(out / source, np.dtype(dtype), (total, *shape))
    offsets_path = out / f"{offsets_name(file)}.partial"
    offsets_file = RowFile(offsets_path, np.dtype(np.int64), ())
    try:
        offsets_file.write(0, offsets)
    finally:
        offsets_file.close()
    finish_file(offsets_path, np.dtype(np.int64), (rows + 1,))
    return source, total
