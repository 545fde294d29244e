"""The data side of ``extract()``: how a batch becomes model input and a range of rows, and which batches this rank
computes.

``_extract.extract()`` asks ``ranks()`` for (rank, world) and builds one share per call, ``RoundRobin(data, rank=,
world=, done=)``, with ``done`` the row ranges its store (``_rowstore``) already holds; ``_extract._run`` iterates
the share and gets a ``Batch`` for every non-empty batch: its index, its rows ``[first_row, stop_row)``, the model's
``args`` / ``kwargs``, and ``mine`` (whether this rank computes it). After the loop, ``totals()`` gives the number
of batches and rows the whole data held, which the store needs to finish its files.

Today every rank reads every batch (to know where its rows go) and computes batches ``rank, rank + world, ...``
whose rows are not all done. A share that reads only this rank's part of the data (a sampler) replaces
``RoundRobin`` with the same ``__iter__`` / ``total`` / ``totals()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import _tree
from ._errors import ExtractError

__all__ = ["Batch", "RoundRobin", "share", "ranks", "model_input", "sample_count"]


def ranks(device: torch.device | None = None) -> tuple[int, int, Any]:
    """(rank, world size, ``torch.distributed``) under torchrun; (0, 1, None) in a plain process. ``device``: where
    the model runs (the backend a process group joined here would use)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed
    return 0, 1, None


def model_input(batch: Any, index: int) -> tuple[tuple, dict, int]:
    """A batch as the model's (args, kwargs) and its number of samples."""
    args: tuple
    kwargs: dict
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, dict):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        args, kwargs = (batch[0],), {}
    else:
        raise ExtractError(f"batch {index} is a {type(batch).__name__}: expected a tensor, a tuple/list whose first "
                           "item is the model input, or a dict of keyword inputs.")
    tensors = _tree.leaves((args, kwargs))
    if not tensors or tensors[0].dim() == 0:
        raise ExtractError(f"batch {index} holds no batched tensor to count its samples.")
    return args, kwargs, int(tensors[0].shape[0])


def sample_count(data: Any) -> int | None:
    """How many samples ``data`` holds, when that is known without iterating (a DataLoader's map-style dataset)."""
    dataset = getattr(data, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


@dataclass
class Batch:
    """One non-empty batch of the data: rows ``[first_row, stop_row)`` of the output, and whether this rank
    computes them (``mine``)."""

    index: int
    first_row: int
    args: tuple
    kwargs: dict
    n: int
    mine: bool
    first: bool = False  # the data's first non-empty batch: its first sample is checked against the manifest
    raw: Any = None  # the batch as the data gave it (for a mask= callable)

    @property
    def stop_row(self) -> int:
        return self.first_row + self.n


def _covers(ranges: list[list[int]], a: int, b: int) -> bool:
    return any(lo <= a and b <= hi for lo, hi in ranges)


class RoundRobin:
    """Batch i is computed by rank ``i % world``, unless its rows are all in ``done`` (sorted, disjoint
    ``[start, stop)`` ranges). Every batch is read, by every rank: that is how a rank knows where its rows go."""

    def __init__(self, data: Iterable[Any], *, rank: int, world: int, done: list[list[int]]) -> None:
        self.data = data
        self.rank = rank
        self.world = world
        self.done = done
        try:
            self.total: int | None = len(data)  # type: ignore[arg-type]  # batches, for a progress bar
        except TypeError:
            self.total = None
        self.batches = 0  # read so far, empty ones included
        self.rows = 0

    def __iter__(self) -> Iterator[Batch]:
        first = True
        for index, batch in enumerate(self.data):
            self.batches += 1
            args, kwargs, n = model_input(batch, index)
            first_row = self.rows
            self.rows += n
            if n == 0:
                continue  # an empty batch: no rows
            mine = index % self.world == self.rank and not _covers(self.done, first_row, self.rows)
            yield Batch(index, first_row, args, kwargs, n, mine, first, batch)
            first = False

    def totals(self) -> tuple[int, int]:
        """(batches, rows) of the whole data, once iterated; empty data is refused."""
        if self.batches == 0:
            raise ExtractError("data yielded no batches: nothing to extract (is the dataset empty?).")
        if self.rows == 0:
            raise ExtractError(f"all {self.batches} batches of data were empty: nothing to extract.")
        return self.batches, self.rows


def share(data: Iterable[Any], *, rank: int, world: int, done: list[list[int]]) -> RoundRobin:
    """This rank's share of ``data``: the batches it computes, and the data's first batch where it checks it."""
    return RoundRobin(data, rank=rank, world=world, done=done)
