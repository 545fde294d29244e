"""The data side of ``extract()``: how a batch becomes model input and the rows its samples go to, which batches this
rank computes, and which process group it belongs to.

``_extract.extract()`` asks ``ranks(device)`` for (rank, world, ``torch.distributed``): under torchrun a process
that has not joined its process group yet joins it here (or is refused), so that a job is never run whole on every
rank. ``extract()`` then builds one share per call with ``share(data, rank=, world=, done=)``, ``done`` being the
mask of rows its store (``extraction.rowstore``) already holds, and ``extraction.extract._run`` iterates it: it gets a
``Batch`` for each non-empty batch this rank loads: its index, its ``rows`` (one per sample), the model's ``args`` /
``kwargs``, ``mine`` (whether this rank computes it) and ``first`` (the batch holding row 0, whose sample the store
checks against its manifest). After the loop, ``totals()`` gives the number of batches and rows the whole data
held, which the store needs to finish its files.

Batch i is computed by rank ``i % world`` unless its rows are all in ``done``; two shares make that assignment:

* ``Sampled``, for a ``torch.utils.data.DataLoader`` over a map-style dataset with automatic batching (the common
  case): the index lists of ``loader.batch_sampler`` are the batch's rows (dataset sample i at row i, in whatever
  order the batches come, e.g. grouped by length), known without loading anything, and a new DataLoader with the
  user's settings loads only the batches this rank computes, plus the batch holding sample 0 for the sample-0 check.
  A sampler whose order changes from pass to pass (``shuffle=True``), or index lists that do not give every sample
  exactly once (``drop_last=True`` among them), are refused here.
* ``RoundRobin``, for anything else (lists, generators, ``IterableDataset``, ``batch_size=None``, DataLoader
  subclasses): rows in the order read (row r is the r-th sample); every rank reads every batch, as that is the only
  way to know where its rows go; ``share()`` warns once when that means reading batches only to skip them.
"""

from __future__ import annotations

import inspect
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from hookkit._errors import ExtractError
from hookkit.core import tree as _tree

__all__ = ["Batch", "RoundRobin", "Sampled", "share", "ranks", "model_input", "sample_count"]


# -- ranks ------------------------------------------------------------------------------------------------------------

def ranks(device: torch.device | None = None) -> tuple[int, int, Any]:
    """(rank, world size, ``torch.distributed``) under torchrun; (0, 1, None) in a plain process.

    A process that torchrun started (``WORLD_SIZE`` > 1 in its environment) but that has not called
    ``torch.distributed.init_process_group`` joins its group here: backend ``nccl`` when ``device`` (where the model
    runs) is a GPU, else ``gloo``. The group stays joined after ``extract()`` returns (leaving and joining again on
    the same port is fragile); ``torch.distributed.destroy_process_group()`` leaves it. If the group cannot be joined
    this is an ``ExtractError``: running the whole job on every rank would write every row ``WORLD_SIZE`` times.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    world = _launched_world()
    if world <= 1:
        return 0, 1, None
    _join(world, device)
    return dist.get_rank(), dist.get_world_size(), dist


def _launched_world() -> int:
    """``WORLD_SIZE`` as torchrun sets it; 1 when unset."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    if not value:
        return 1
    try:
        return int(value)
    except ValueError:
        raise ExtractError(f"WORLD_SIZE={value!r} in the environment is not a number of processes: torchrun sets "
                           "it to one; unset it to run a single process.") from None


def _join(world: int, device: torch.device | None) -> None:
    dist = torch.distributed
    said = (f"WORLD_SIZE={world} in the environment says torchrun started {world} processes, and this one has not "
            "joined their process group")
    fix = ("Call torch.distributed.init_process_group() yourself before extract() (torchrun sets RANK, "
           "MASTER_ADDR and MASTER_PORT for it), or unset WORLD_SIZE to run a single process.")
    if not dist.is_available():
        raise ExtractError(f"{said}, and this torch has no torch.distributed to join it with: every rank would "
                           f"compute the whole data. Install a torch built with distributed support, or unset "
                           "WORLD_SIZE to run a single process.")
    cuda = device is not None and device.type == "cuda"
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    options: dict[str, Any] = {}
    # device_id (torch >= 2.3) binds the NCCL communicator to the model's GPU at once instead of guessing it from
    # the rank at the first collective.
    if cuda and backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        options["device_id"] = torch.device("cuda", index)
    try:
        dist.init_process_group(backend, **options)
    except Exception as exc:
        raise ExtractError(f"{said}; joining it failed: init_process_group({backend!r}) raised "
                           f"{type(exc).__name__}: {exc}. {fix}") from exc


# -- batches ----------------------------------------------------------------------------------------------------------

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
    """One non-empty batch of the data: the output rows of its samples (``rows[j]`` for sample j of the batch), and
    whether this rank computes them (``mine``)."""

    index: int
    rows: np.ndarray  # int64, one per sample of the batch, in the batch's order
    args: tuple
    kwargs: dict
    n: int
    mine: bool
    first: bool = False  # holds row 0: its sample ``zero`` is checked against the manifest
    raw: Any = None  # the batch as the data gave it (for a mask= callable)
    zero: int = 0  # where row 0 is in the batch, when ``first``


def _covers(done: np.ndarray, rows: np.ndarray) -> bool:
    """Whether every row of ``rows`` is marked in ``done`` (a mask of the rows already written)."""
    return len(rows) > 0 and int(rows.min()) >= 0 and int(rows.max()) < len(done) and bool(done[rows].all())


# -- shares -----------------------------------------------------------------------------------------------------------

class RoundRobin:
    """Batch i is computed by rank ``i % world``, unless its rows are all marked in ``done``. Its rows follow the
    batches before it (row r is the r-th sample the data yields). Every batch is read, by every rank: that is how a
    rank knows where its rows go."""

    def __init__(self, data: Iterable[Any], *, rank: int, world: int, done: np.ndarray) -> None:
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
            rows = np.arange(self.rows, self.rows + n, dtype=np.int64)
            self.rows += n
            if n == 0:
                continue  # an empty batch: no rows
            mine = index % self.world == self.rank and not _covers(self.done, rows)
            yield Batch(index, rows, args, kwargs, n, mine, first, batch)
            first = False

    def totals(self) -> tuple[int, int]:
        """(batches, rows) of the whole data, once iterated; empty data is refused."""
        if self.batches == 0:
            raise ExtractError("data yielded no batches: nothing to extract (is the dataset empty?).")
        if self.rows == 0:
            raise ExtractError(f"all {self.batches} batches of data were empty: nothing to extract.")
        return self.batches, self.rows


@dataclass
class _Planned:
    """A batch ``Sampled`` loads: its place in the data, its index list and rows (the same sample indices)."""

    index: int
    indices: Any
    rows: np.ndarray
    mine: bool
    first: bool
    zero: int


# The DataLoader settings a rebuilt loader copies: everything but what says which samples form a batch (dataset,
# batch_size, shuffle, sampler, batch_sampler, drop_last), which the chosen index lists replace. The list follows
# DataLoader.__init__ of torch 2.13 / 2.14 (each is stored under its own name; ``multiprocessing_context`` is a
# property giving the context back) and accelerate's ``skip_first_batches`` (accelerate/data_loader.py, which
# copies ``_PYTORCH_DATALOADER_KWARGS`` minus the same sampler options). A setting this torch's DataLoader does not
# take (``in_order`` before 2.6) is left out.
_LOADER_SETTINGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                    "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


class Sampled(RoundRobin):
    """The same assignment as ``RoundRobin``, for a DataLoader over a map-style dataset with a ``batch_sampler``:
    the index lists say where every batch's rows go (sample i of the dataset at row i, whatever the batch order), so
    this rank loads only the batches it computes, and the batch holding sample 0 (``first=True``, ``mine=False``
    unless it computes it), first, so that every rank checks sample 0 before it writes. Built before anything runs:
    a sampler with another order on each pass, or whose index lists do not give every sample exactly once, is
    refused then, and ``total`` and ``totals()`` are known before any batch is loaded. A ``RoundRobin`` for the
    loop (``extraction.extract._run`` takes one): the same ``__iter__`` / ``total`` / ``totals()``, another way to
    load."""

    def __init__(self, loader: DataLoader, *, rank: int, world: int, done: np.ndarray) -> None:
        super().__init__(loader, rank=rank, world=world, done=done)
        self.loader = loader
        self.plan: list[_Planned] = []
        arrays: list[np.ndarray] = []
        index_lists = cast(Iterable[Any], loader.batch_sampler)  # share() sends only a DataLoader that has one
        for index, indices in enumerate(_one_order(index_lists, loader)):
            at = _sample_rows(indices, index)
            arrays.append(at)
            if len(at) == 0:
                continue  # an empty index list: no rows, nothing to load
            mine = index % world == rank and not _covers(done, at)
            first = bool((at == 0).any())
            if mine or first:
                planned = _Planned(index, indices, at, mine, first, int(np.argmax(at == 0)))
                if first:  # loaded first: every rank checks sample 0 before it writes
                    self.plan.insert(0, planned)
                else:
                    self.plan.append(planned)
        _check_every_sample_once(arrays, len(cast(Any, loader.dataset)), loader)
        self.total = self.batches = len(arrays)
        self.rows = sum(len(a) for a in arrays)

    def __iter__(self) -> Iterator[Batch]:
        if not self.plan:
            return
        settings = inspect.signature(DataLoader.__init__).parameters
        options = {k: getattr(self.loader, k) for k in _LOADER_SETTINGS if k in settings and hasattr(self.loader, k)}
        part = DataLoader(self.loader.dataset, batch_sampler=[p.indices for p in self.plan], **options)
        for planned, batch in zip(self.plan, part, strict=True):
            args, kwargs, n = model_input(batch, planned.index)
            if n != len(planned.rows):
                raise ExtractError(
                    f"batch {planned.index} holds {n} samples, but the DataLoader's batch_sampler gave it "
                    f"{len(planned.rows)} indices: a collate_fn that changes the number of samples (drops, adds "
                    "or splits them) cannot be split across ranks or resumed, since each batch's rows are placed "
                    "from its index list without loading the batches before it. Make collate_fn return one sample "
                    "per index (filter bad samples in the Dataset instead), or pass the batches as a plain iterable "
                    "(e.g. `(b for b in loader)`) to have every batch read on every rank.")
            yield Batch(planned.index, planned.rows, args, kwargs, n, planned.mine, planned.first, batch,
                        planned.zero)


_ROW_I = "extract() writes the features of dataset sample i at row i"


def _sample_rows(indices: Any, index: int) -> np.ndarray:
    """Batch ``index``'s index list as the rows its samples go to (int64); a list of anything but ints is refused."""
    try:
        at = np.asarray(indices)
    except Exception:  # an index list numpy cannot read: refused below as not numbers
        at = np.asarray([None])
    if at.size == 0:
        return np.zeros(0, dtype=np.int64)
    if at.ndim != 1 or at.dtype.kind not in "iu":
        raise ExtractError(
            f"the DataLoader's batch_sampler gives batch {index} as {_shown(indices)}, not a list of sample "
            f"indices: {_ROW_I}, so every index must be a sample number. Give each batch as a list of ints.")
    return at.astype(np.int64, copy=False)


def _check_every_sample_once(arrays: list[np.ndarray], samples: int, loader: DataLoader) -> None:
    """Refuse index lists that name no sample of the dataset, give a sample twice, or leave samples out (their rows
    would hold nothing): checked on all the lists at once, before anything is loaded."""
    joined = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    ends = np.cumsum([len(a) for a in arrays])

    def batch_of(position: int) -> int:
        return int(np.searchsorted(ends, position, side="right"))

    outside = np.flatnonzero((joined < 0) | (joined >= samples))
    if len(outside):
        raise ExtractError(
            f"the DataLoader's batch_sampler gives index {int(joined[outside[0]])} in batch "
            f"{batch_of(int(outside[0]))}, but the dataset holds {samples} samples (0 to {samples - 1}): {_ROW_I}, "
            "so every index must name a sample. Fix the batch_sampler (or the dataset's __len__).")
    counts = np.bincount(joined, minlength=samples)
    twice = np.flatnonzero(counts > 1)
    if len(twice):
        again = int(np.flatnonzero(joined == twice[0])[1])
        raise ExtractError(
            f"the DataLoader's batch_sampler gives sample {int(twice[0])} twice (again in batch {batch_of(again)}): "
            f"{_ROW_I}, so each sample must be in exactly one batch. Give each index once.")
    missing = np.flatnonzero(counts == 0)
    if not len(missing):
        return
    shown = ", ".join(map(str, missing[:5].tolist())) + (", ..." if len(missing) > 5 else "")
    fix = ("drop_last=True leaves the samples of the last, incomplete batch without rows: pass drop_last=False"
           if getattr(loader, "drop_last", False) else
           f"give every index 0 to {samples - 1} once (to extract only some samples, pass a "
           "torch.utils.data.Subset of the dataset)")
    raise ExtractError(
        f"the DataLoader's batch_sampler leaves {len(missing)} of the dataset's {samples} samples out "
        f"(sample{'s' * (len(missing) > 1)} {shown}): {_ROW_I} of a {samples}-row file, so every sample needs "
        f"a batch. Nothing was written. Fix: {fix}.")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_order(sampler: Iterable[Any], loader: DataLoader) -> Iterator[Any]:
    """The items of one pass over ``sampler``, checked against a second pass taken alongside (so nothing is held):
    an order that differs (``shuffle=True``, a ``RandomSampler``) is refused."""
    end = object()
    for position, (a, b) in enumerate(itertools.zip_longest(iter(sampler), iter(sampler), fillvalue=end)):
        if a is end or b is end or _as_list(a) != _as_list(b):
            raise ExtractError(
                f"the DataLoader's sampler ({type(loader.sampler).__name__}) gives another order on each pass "
                f"(they differ at item {position}): shuffle=True or a random sampler. extract() places each "
                "batch's rows by the sampler's indices, and a run must see the same batches again to be split "
                "across ranks or resumed. Pass shuffle=False, or a sampler with a fixed order (e.g. "
                "hookkit.length_batches).")
        yield a


def _as_list(item: Any) -> Any:
    """An item of a sampler in a form ``!=`` compares whole (index lists may be numpy arrays or tensors)."""
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.tolist()
    return list(item) if isinstance(item, (list, tuple)) else item


def _not_split(data: Any) -> str | None:
    """Why ``data`` is not a DataLoader that ``Sampled`` can split (None when it is)."""
    if not isinstance(data, DataLoader):
        kind = "a list" if isinstance(data, list) else "a generator" if inspect.isgenerator(data) else \
            f"a {type(data).__name__}"
        return f"the data is {kind}, not a DataLoader"
    if type(data) is not DataLoader:
        return f"the data is a DataLoader subclass ({type(data).__name__}), whose loading hookkit cannot rebuild"
    if isinstance(data.dataset, IterableDataset):
        return "the DataLoader's dataset is an IterableDataset, which has no index to load a batch by"
    if data.batch_sampler is None:
        return "the DataLoader has batch_size=None, so it has no batch_sampler to say which samples form a batch"
    return None


def _check_distributed_sampler(loader: DataLoader) -> None:
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for sampler in samplers:
        if isinstance(sampler, torch.utils.data.DistributedSampler) and sampler.num_replicas > 1:
            raise ExtractError(
                f"the DataLoader's sampler is a DistributedSampler over {sampler.num_replicas} replicas: it gives "
                "each rank another part of the data, and extract() splits the data between ranks itself (rank r "
                "computes batches r, r + W, ...), so rows would land in the wrong places. Pass a DataLoader over "
                "the whole dataset without a DistributedSampler.")


def share(data: Iterable[Any], *, rank: int, world: int, done: np.ndarray) -> RoundRobin:
    """This rank's share of ``data``: the batches it computes, and the batch holding row 0, where it checks it.

    A DataLoader over a map-style dataset with a batch size is split without loading the other ranks' batches
    (``Sampled``); anything else is read whole on every rank (``RoundRobin``), with one warning, pointing at the
    caller of ``extract()``, when that reads batches only to skip them (``world > 1``, or a resumed run).
    """
    why = _not_split(data)
    if isinstance(data, DataLoader) and type(data) is DataLoader and not isinstance(data.dataset, IterableDataset):
        _check_distributed_sampler(data)
        if why is None:
            return Sampled(data, rank=rank, world=world, done=done)
        for _ in _one_order(data.sampler, data):  # batch_size=None: each sample is a batch, in the sampler's order
            pass
    if world > 1 or done.any():
        skipped = " and ".join((["the other ranks' batches"] if world > 1 else [])
                               + (["the batches already written"] if done.any() else []))
        warnings.warn(
            f"extract() reads every batch of this data on every rank, and skips {skipped}, because {why}: that "
            "loading is repeated work. Pass a torch.utils.data.DataLoader over a map-style dataset (one with "
            "__len__ and __getitem__) with a batch_size, and each rank loads only the batches it computes.",
            stacklevel=3)  # extract() -> share() -> warn: the warning names the line that called extract()
    return RoundRobin(data, rank=rank, world=world, done=done)
