"""A layer of ``Features`` streamed back in batches for training: ``Features.loader`` builds a ``RowLoader`` here.

``extraction.rowstore.Features.loader`` only delegates to ``RowLoader``, which reads the layer through ``_source``
(a torch tensor over the ``.npy`` file, not a copy; the array itself for features in memory) and every row through
``_read`` (one contiguous slice of rows at a time). Nothing here imports the rest of the package's extraction code.

The order of an epoch is one permutation of all rows, fixed by ``(seed, epoch)`` and by the file alone (its row count
and row size), never by the number of ranks:

1. the rows are cut into blocks of contiguous rows, about ``_BLOCK_BYTES`` each (at least one row);
2. the blocks are put in a random order (``torch.randperm`` with a ``torch.Generator`` seeded from ``(seed, epoch)``),
   and that order is cut into windows of ``_BUFFER_BYTES // block size`` blocks (at least one);
3. the rows of each window are shuffled (a generator seeded from ``(seed, epoch, window)``, so that any window's
   order is known without drawing the ones before it).

The permutation is the windows' shuffled rows one after the other. Rank ``r`` of ``world`` takes a contiguous share
of it (see ``RowLoader``), so that it reads only the windows its share touches: about ``1 / world`` of the file.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hookkit._errors import ArgumentError
from hookkit.core import check as _check
from hookkit.extraction.dtypes import as_tensor

__all__ = ["RowLoader", "row_loader"]

_BLOCK_BYTES = 1 << 20  # 1 MiB: rows read in one contiguous slice, a unit of the shuffle
_BUFFER_BYTES = 32 << 20  # 32 MiB: the blocks of one window, read into memory and shuffled together


def _source(feats: Any, layer: str) -> torch.Tensor:
    """The layer's rows (a ragged layer's tokens) as a torch tensor in their stored dtype, over the file or over the
    array in memory. The file is mapped read-only (``feats.torch`` maps it copy-on-write, whose pages fault in about
    twice as slowly): the loader only ever reads from it."""
    if feats.out is None:
        return feats.torch(layer)
    array = np.load(feats.path(layer), mmap_mode="r")
    with warnings.catch_warnings():  # a read-only array: the loader only ever reads from it
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return as_tensor(array, feats.manifest.get("torch_dtypes", {}).get(layer))


def _read(src: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
    """Rows ``[lo, hi)`` of the source into ``out``: one contiguous read (every row the loader yields comes through
    here)."""
    out.copy_(src[lo:hi])


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator for ``stream`` (0: the blocks' order; 1 + w: window w's rows) of ``(seed, epoch)``: the streams
    of one seed and epoch, and the epochs of one seed, are independent."""
    state = np.random.SeedSequence(seed, spawn_key=(epoch, stream)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def row_loader(feats: Any, layer: str, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool,
               start: int, rank: int | None, world: int | None) -> RowLoader:
    """``Features.loader``'s arguments checked (before any file is opened; ``layer`` by ``Features``), and its
    ``RowLoader``."""
    where = "Features.loader"
    _check.whole(where, "batch_size", batch_size, minimum=1, meaning=" (rows per batch)")
    _check.flag(where, shuffle=shuffle, drop_last=drop_last)
    _check.whole(where, "seed", seed, minimum=0, meaning=" (the order's seed)")
    _check.whole(where, "epoch", epoch, minimum=0, meaning=" (the epoch's number: each has its own order)")
    _check.whole(where, "start", start, minimum=0, meaning=" (the batches of this epoch to skip)")
    rank, world = _ranks(rank, world)
    return RowLoader(_source(feats, layer), int(batch_size), shuffle=shuffle, seed=int(seed), epoch=int(epoch),
                     drop_last=drop_last, start=int(start), rank=rank, world=world)


def _ranks(rank: int | None, world: int | None) -> tuple[int, int]:
    """(rank, world): the ones given, else the initialized process group's, else (0, 1)."""
    where = "Features.loader"
    if (rank is None) != (world is None):
        raise ArgumentError(f"{where}: give rank= and world= together (got rank={rank!r}, world={world!r}), or "
                            "neither to use the process group's (torch.distributed), if initialized.")
    if rank is None or world is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    _check.whole(where, "world", world, minimum=1, meaning=" (the number of ranks)")
    _check.whole(where, "rank", rank, minimum=0, meaning=" (this process's rank)")
    if rank >= world:
        raise ArgumentError(f"{where}: rank={rank} is out of range for world={world}: give a rank from 0 to "
                            f"{world - 1}.")
    return int(rank), int(world)


class RowLoader:
    """Batches of one layer's rows (of tokens, for a ragged layer), each row once per epoch, in an order fixed by
    ``(seed, epoch)``. Built by ``Features.loader``, whose docstring tells the rules; iterating it again starts the
    same batches again (from ``start``)."""

    def __init__(self, src: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool,
                 start: int, rank: int, world: int) -> None:
        self.src, self.batch_size, self.shuffle, self.seed, self.epoch = src, batch_size, shuffle, seed, epoch
        self.drop_last, self.rank, self.world = drop_last, rank, world
        n = len(src)
        row_bytes = max(1, math.prod(src.shape[1:]) * src.element_size())
        self.block_rows = max(1, _BLOCK_BYTES // row_bytes)
        self.window_blocks = max(1, _BUFFER_BYTES // (self.block_rows * row_bytes))
        if drop_last:  # the same number of full batches on every rank; the permutation's last rows wait an epoch
            per_rank = n // (batch_size * world) * batch_size
            self.lo, self.hi = rank * per_rank, (rank + 1) * per_rank
        else:  # shares of n // world rows, the first n % world ranks one more
            q, e = divmod(n, world)
            self.lo = rank * q + min(rank, e)
            self.hi = self.lo + q + (rank < e)
        self.batches = -(-(self.hi - self.lo) // batch_size)  # whole epoch, this rank
        if start > self.batches:
            raise ArgumentError(
                f"Features.loader: start={start} is past the end of the epoch: this rank yields {self.batches} "
                f"batches of {batch_size} ({n} rows over {world} rank(s), drop_last={drop_last}); give start= from 0 "
                f"to {self.batches}, and the next epoch with epoch= and start=0.")
        self.start = int(start)

    def __len__(self) -> int:
        """The batches this rank yields (from ``start``)."""
        return self.batches - self.start

    def __repr__(self) -> str:
        return (f"<hookkit RowLoader {len(self)} batches of {self.batch_size} rows, rank {self.rank} of {self.world}, "
                f"seed {self.seed}, epoch {self.epoch}{', file order' if not self.shuffle else ''}>")

    def __iter__(self) -> Iterator[torch.Tensor]:
        first = self.lo + self.start * self.batch_size
        if not self.shuffle:  # file order: each batch is one contiguous read
            for lo in range(first, self.hi, self.batch_size):
                hi = min(lo + self.batch_size, self.hi)
                out = torch.empty((hi - lo, *self.src.shape[1:]), dtype=self.src.dtype)
                _read(self.src, lo, hi, out)
                yield out
            return
        held: list[torch.Tensor] = []
        count = 0
        for buffer, picks in self._windows(first, read=True):
            while len(picks):
                take = picks[:self.batch_size - count]
                picks = picks[len(take):]
                held.append(buffer.index_select(0, take))
                count += len(take)
                if count == self.batch_size:
                    yield held[0] if len(held) == 1 else torch.cat(held)
                    held, count = [], 0
        if held:
            yield torch.cat(held)

    def rows(self) -> torch.Tensor:
        """The file's row numbers (int64; token numbers for a ragged layer) of every row this rank yields, in order:
        ``loader.rows().split(batch_size)`` are the batches' rows (e.g. to look up labels). Takes 8 bytes a row."""
        first = self.lo + self.start * self.batch_size
        if not self.shuffle:
            return torch.arange(first, self.hi)
        parts = [file_rows[picks] for file_rows, picks in self._windows(first, read=False)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def _windows(self, first: int, *, read: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For each window holding positions ``[first, hi)`` of the permutation: (its rows read into memory, in
        window order, where ``read``, else their row numbers in the file; the window positions this rank takes, in
        the permutation's order). Only the blocks holding a taken row are read."""
        n, size = len(self.src), self.block_rows
        blocks = -(-n // size)
        order = torch.randperm(blocks, generator=_generator(self.seed, self.epoch, 0)).tolist()
        position = 0  # of the current window's first row in the permutation
        for w, at in enumerate(range(0, blocks, self.window_blocks)):
            mine = order[at:at + self.window_blocks]
            starts = [b * size for b in mine]
            lengths = [min(s + size, n) - s for s in starts]
            total = sum(lengths)
            if position + total <= first:  # wholly before the start: not drawn, not read
                position += total
                continue
            if position >= self.hi:
                return
            perm = torch.randperm(total, generator=_generator(self.seed, self.epoch, 1 + w))
            picks = perm[max(first - position, 0):self.hi - position]
            offsets = np.cumsum([0, *lengths])
            if read:
                window = torch.empty((total, *self.src.shape[1:]), dtype=self.src.dtype)
                needed = np.unique(np.searchsorted(offsets, picks.numpy(), side="right") - 1)
                for j in needed.tolist():
                    _read(self.src, starts[j], starts[j] + lengths[j], window[offsets[j]:offsets[j + 1]])
                yield window, picks
            else:
                yield torch.cat([torch.arange(s, s + k) for s, k in zip(starts, lengths, strict=True)]), picks
            position += total
