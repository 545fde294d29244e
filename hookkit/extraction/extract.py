"""``extract()``: features of a whole dataset, streamed to ``.npy`` files, resumable, and split across torchrun ranks.

``extract()`` reads as its steps: check the options (``extraction.options``, and the layers in ``_checked_layers``),
fingerprint the call (``extraction.fingerprint``), open a store (``extraction.rowstore.MemoryRows``, or the ``.npy``
folder ``extraction.npyfolder.NpyFolder`` with its manifest, progress files and lock), take this rank's share of the
batches (``extraction.shards.share``), run the loop (``_run``), finish the store. This module owns the listener
``_Rows``, which turns a layer's output into rows at hook time (with the tensor functions of ``extraction.rows``:
select, mask, pool; then dtype), and ``_forward_rows``, the one place that builds and enters the hook engine for a
forward.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError, ExtractError, HookkitError
from hookkit.core import check as _check
from hookkit.core import tree as _tree
from hookkit.core.engine import Engine
from hookkit.core.listener import Listener
from hookkit.core.select import Layers, check_model
from hookkit.core.select import select as _select_layers
from hookkit.core.snapshot import shares_memory
from hookkit.core.stats import fmt_bytes
from hookkit.extraction import rows as _rows
from hookkit.extraction.dtypes import host_array
from hookkit.extraction.fingerprint import call_settings
from hookkit.extraction.npyfolder import NpyFolder
from hookkit.extraction.options import Mask, Pool, Select, check_out_folder, checked_options
from hookkit.extraction.options import check_select as _check_select
from hookkit.extraction.rowstore import Features, MemoryRows, Rows, RowStore, TokenRows
from hookkit.extraction.shards import Batch, RoundRobin, ranks, sample_count, share
from hookkit.extraction.writer import Background

__all__ = ["extract", "Features"]


def extract(
    model: nn.Module,
    layers: Layers,
    data: Iterable[Any],
    *,
    out: str | os.PathLike | None = None,
    pool: Pool = None,
    select: Select = None,
    dtype: torch.dtype | str | None = None,
    mask: Mask = None,
    dataset_id: str | None = None,
    progress: bool = True,
    stop: bool = True,
) -> Features:
    """Features of every sample of ``data`` at the given layers, in dataset order; streamed to ``out`` if given.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [torch.randn(3, 4) for _ in range(5)]           # 5 batches of 3 samples
        >>> feats = hookkit.extract(model, ["1"], data, progress=False)
        >>> feats["1"].shape
        (15, 8)

    Args:
        model: the ``nn.Module``; run in eval mode under ``torch.inference_mode()`` (its mode is restored after,
            also on error), on the device of its parameters.
        layers: anything ``capture`` accepts: names, globs, module classes (``nn.Linear``), module objects,
            predicates, op and repeated-call nodes (``"layer1.0.add"``, ``"relu_1"``), or a list of these; each
            must run once per forward. Required: ``None`` is an ``ArgumentError``.
        data: a DataLoader or any iterable of batches: a tensor, a tuple/list whose first item is the model input
            (labels etc. are ignored), or a dict of keyword inputs (Hugging Face style). Empty batches are skipped.
            A DataLoader's batches may come in any fixed order (e.g. grouped by length): each batch's rows go to
            the sample indices its ``batch_sampler`` gives, so row i is dataset sample i; index lists that repeat,
            leave out (``drop_last=True``) or name no sample, and samplers that change from pass to pass
            (``shuffle=True``), are refused before anything runs. Other iterables keep rows in the order read.
        out: a folder: one ``.npy`` per layer (N rows, readable by ``numpy.load(path, mmap_mode="r")`` without
            hookkit; named after the layer, ``feats.path(layer)``) and ``manifest.json``. Written batch by batch;
            an interrupted run, called again the same way (any batch size, any number of ranks), computes only
            the rows still missing; a finished run returns at once; another model, other options or other data
            (length, first sample, ``dataset_id``) are refused. One process per rank may write into ``out`` at a
            time. A background thread writes batch k while batch k + 1 runs (at most 2 batches wait); a batch is
            recorded as done only once its rows are synced to disk, so a crash or a power cut loses at most the
            batches not yet recorded, and those are computed again.
        pool: per sample, keep the whole activation (``None``), ``"avg"`` / ``"max"`` over spatial dims
            ([N, C, H, W]) or tokens ([N, T, D]), ``"flatten"``, ``"cls"`` (first token), or a callable. With a
            mask (see ``mask``), ``"avg"`` and ``"max"`` over tokens use only the valid tokens (``"avg"`` is
            sentence-transformers' mean pooling: the sum of the valid token states over their number), so a
            sample's features do not depend on what it was batched with (a sample with no valid token, its mask
            all zeros, is refused with an ``ExtractError`` naming it: it has no max and no mean); ``"cls"``,
            ``"flatten"`` and callables are unchanged; and ``None`` stores only the valid tokens, flat (a ragged
            layer: ``feats[layer]`` is [total valid tokens, ...], ``feats.offsets(layer)`` the N + 1 offsets,
            ``feats.tokens(layer, i)`` sample i's tokens; on disk ``<layer>.npy`` and ``<layer>.offsets.npy``,
            plain numpy).
        select: which tensor of a structured output (tuple, dict, ModelOutput): an index, a key, a callable, or a
            ``{layer: choice}`` dict. Default: the first tensor.
        dtype: storage dtype, e.g. ``torch.float16`` or ``torch.bfloat16`` (either halves the disk); rows are
            cast with torch's ``.to(dtype)``, and a layer already in that dtype is stored bit for bit. Default: the
            layer's own, except that a bfloat16 layer is stored as float32 (exact, and readable by numpy).
            ``torch.bfloat16`` (or ``"bfloat16"``), which numpy has no type for, is stored as its raw 2-byte values:
            ``<layer>.npy`` is a plain ``.npy`` of dtype uint16 and ``manifest.json`` names the layer's dtype
            (``"torch_dtypes": {layer: "bfloat16"}``); another tool reads the values with
            ``torch.from_numpy(numpy.load(path)).view(torch.bfloat16)``.
        mask: which tokens of a batch are valid, [N, T] (nonzero = valid). Default (``None``): a dict batch's
            ``"attention_mask"`` (Hugging Face style), if it has one. A key of dict batches, or a callable that
            gets the batch as the data yielded it and returns the mask; ``False``: no mask (pool over padding
            too). A mask applies to outputs whose first two dims are the mask's [N, T].
        dataset_id: your name for the data (e.g. ``"imagenet-val@2024-05"``), kept in the manifest; a resumed
            run with another ``dataset_id`` is refused. hookkit checks the data's length and first sample only.
        progress: a rich progress bar on a terminal (never in CI or a pipe).
        stop: end each forward once every selected layer has run (early layers cost only what they cost). The
            first batch a call computes runs the whole forward, to refuse a layer that runs twice.

    Under ``torchrun``, rank r computes batches r, r + W, r + 2W, ... and writes only its rows; the files are
    identical to a one-process run. If torchrun started the processes (``WORLD_SIZE`` > 1) and the default process
    group is not initialised, ``extract`` joins it (gloo on CPU, NCCL on a GPU) and leaves it joined. With a
    DataLoader over a map-style dataset each rank loads only the batches it computes (and the batch holding sample 0,
    to check it), with the loader's own batches, collate_fn and workers; a resumed run loads only what is missing.
    Other data is read by every rank, which skips what it does not compute (a warning says so).

    Returns:
        ``Features``: ``feats[layer]`` -> numpy array (memmap with ``out``), ``feats.torch(layer)`` -> torch tensor
        in the stored dtype (a copy-on-write map of the file with ``out``: nothing is read into memory up front),
        ``feats.manifest``. A bfloat16 layer has no numpy array: ``feats[layer]`` raises an ``ArgumentError``
        naming ``feats.torch(layer)`` (its values) and ``numpy.load(feats.path(layer))`` (its raw bits), and
        ``feats.tokens(layer, i)`` of a ragged bfloat16 layer is a bfloat16 tensor. ``hookkit.load_features(out)``
        opens the finished folder again later, without the model.

    Raises:
        ExtractError: empty data, a batch the model rejects (naming its index), a layer that never runs or runs
            twice, a sample with no valid token under ``pool="avg"``/``"max"`` (naming the sample), rows whose
            shape changes, an unwritable or full disk, ``out`` holding a run with other arguments or data, or
            another process writing into ``out``. Rows already written stay.
        LayerNotFoundError, TypeError, ValueError: bad layers or options, before anything runs or is written.
    """
    check_model(model)
    _check.instance("hookkit.extract", "data", data, Iterable, "an iterable of batches (a DataLoader, a list)")
    _check.path("hookkit.extract", "out", out, none=True)
    check_out_folder(out)
    _check.flag("hookkit.extract", progress=progress, stop=stop)
    torch_dtype = checked_options(pool, dtype, dataset_id, mask)
    rank, world, dist = ranks(_device(model))
    names = _checked_layers(model, layers, select, out=out, world=world)
    listener = _Rows(select, pool, torch_dtype, mask)
    store: RowStore
    if out is None:
        store = MemoryRows(names, bfloat16=torch_dtype == torch.bfloat16)
    else:
        settings = call_settings(model, names, pool=pool, select=select, dtype=torch_dtype, stop=stop,
                                 dataset_id=dataset_id, mask=mask)
        store = NpyFolder(Path(out), names, settings, sample_count(data), rank=rank, world=world, dist=dist)
    with store:
        finished = store.resume()
        if finished is not None:
            return finished
        batches = share(data, rank=rank, world=world, done=store.done_rows())
        _run(model, names, batches, listener, store, stop=stop, progress=progress and rank == 0)
        return store.finish(*batches.totals())


# -- options ----------------------------------------------------------------------------------------------------------

def _checked_layers(model: nn.Module, layers: Layers, select: Select, *, out: Any, world: int) -> list[str]:
    """The layer names (model and names checked first), ``select``'s keys against them, and ``out`` under
    torchrun: everything is refused before anything runs or is written."""
    names = _select_layers(model, layers, caller="hookkit.extract").names
    if any(n == "" for n in names):
        raise ArgumentError("extract the model's layers, not the model itself ('' is the root): name its last layer.")
    _check_select(select, names)
    if world > 1 and out is None:
        raise ArgumentError("under torchrun each rank computes only its share of the batches: pass out=DIR so that "
                            "every rank writes its rows into the same files.")
    return names




# -- the loop ---------------------------------------------------------------------------------------------------------

def _run(model: nn.Module, names: list[str], batches: RoundRobin, listener: _Rows, store: RowStore, *, stop: bool,
         progress: bool) -> None:
    """Every batch of ``batches`` goes through the model if this rank computes it (eval mode, inference mode;
    each module's mode restored after, also on error) and its rows to ``store.write``, in a background writer for a
    store on disk (``extraction.writer``) while the next batch runs; the batch holding row 0 also goes to
    ``store.first_sample``."""
    device = _device(model)
    images = written = 0
    whole_forward_done = False
    bar = _progress(progress, batches.total)
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode: a wrapper may differ from its model
    host = _HostCopies(device)
    writer = Background() if store.background else None
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                # once per batch it needs (a mask= callable runs once), not for batches only read to be skipped
                mask = _rows.batch_mask(listener.mask_option, batch, device) if batch.first or batch.mine else None
                if batch.first:
                    store.first_sample(batch.args, batch.kwargs, batch.n, mask, at=batch.zero)
                if not batch.mine:
                    if bar is not None:
                        bar.update(batch.index + 1, images, written)
                    continue
                # The first batch runs the whole forward even with stop=True: a layer that runs again later in
                # the forward is refused instead of having its first call extracted silently.
                rows = _batch_rows(model, names, listener, batch, device, mask, stop=stop,
                                   stop_now=stop and whole_forward_done)
                whole_forward_done = True
                job = functools.partial(_write, store, batch.rows, host.start(rows), batch.index)
                if writer is None:
                    job()
                else:
                    writer.submit(job)
                images += batch.n
                written += sum(_nbytes(v) for v in rows.values())
                if bar is not None:
                    bar.update(batch.index + 1, images, written)
        if writer is not None:
            closing: Background = writer
            writer = None
            closing.close()  # every queued batch written; a writer's error is raised here
    finally:
        if writer is not None:  # an error in the loop: still write the batches computed before it, then raise it
            with contextlib.suppress(Exception):
                writer.close()
        for m, mode in modes:
            m.training = mode
        if bar is not None:
            bar.stop()


def _write(store: RowStore, at: Any, rows: Callable[[], dict[str, Rows]], index: int) -> None:
    store.write(at, rows(), batch=index)


def _nbytes(value: torch.Tensor | _rows.Tokens) -> int:
    if isinstance(value, _rows.Tokens):
        return value.flat.nbytes + value.counts.nbytes
    return value.nbytes


class _HostCopies:
    """Each batch's rows to the host. On CPU there is nothing to copy. On a GPU the copies go into pinned buffers on
    a side stream (after the work that made the rows), so that batch k's copy and write overlap batch k + 1's
    forward; ``start`` returns a function the writer calls, which waits for the copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, rows: dict[str, torch.Tensor | _rows.Tokens]) -> Callable[[], dict[str, Rows]]:
        if self.stream is None:
            return functools.partial(_numpy, {k: _tree.map_leaves(lambda t: t.cpu(), v) for k, v in rows.items()})
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        host: dict[str, torch.Tensor | _rows.Tokens] = {}
        with torch.cuda.stream(stream):
            for name, value in rows.items():
                host[name] = _tree.map_leaves(lambda t: _pinned_copy(t, stream), value)
        event = torch.cuda.Event()
        event.record(stream)

        def ready() -> dict[str, Rows]:
            event.synchronize()
            return _numpy(host)
        return ready


def _pinned_copy(t: torch.Tensor, stream: Any) -> torch.Tensor:
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    t.record_stream(stream)  # the caching allocator must not hand t's memory out before the copy ran
    return out


def _numpy(rows: dict[str, torch.Tensor | _rows.Tokens]) -> dict[str, Rows]:
    """Host rows as numpy, sharing their memory (bfloat16 as its raw bits: ``extraction.dtypes``)."""
    return {name: TokenRows(host_array(v.flat), v.counts.numpy()) if isinstance(v, _rows.Tokens) else host_array(v)
            for name, v in rows.items()}


def _batch_rows(model: nn.Module, names: list[str], listener: _Rows, batch: Batch, device: torch.device,
                mask: torch.Tensor | None, *, stop: bool, stop_now: bool) -> dict[str, torch.Tensor | _rows.Tokens]:
    """One batch's rows of every layer (``mask``: its valid tokens), where the model made them; a failing model or
    a layer that did not run is an ExtractError naming the batch."""
    listener.start_batch(batch, mask)
    try:
        _forward_rows(model, names, listener, stop_now, _to_device(batch.args, device),
                      _to_device(batch.kwargs, device))
    except HookkitError:
        raise
    except Exception as exc:
        past_the_layers = stop and not stop_now and all(name in listener.batch for name in names)
        if not past_the_layers:  # else: a failure after the last layer, where stop would have ended
            raise ExtractError(f"the model failed on batch {batch.index} ({batch.n} samples): "
                               f"{type(exc).__name__}: {exc}") from exc
    missing = [name for name in names if name not in listener.batch]
    if missing:
        raise ExtractError(f"{', '.join(map(repr, missing))} did not run on batch {batch.index}: nothing was "
                           "written for it. Check that the layer is on the forward path for this input.")
    return dict(listener.batch)


def _forward_rows(model: nn.Module, names: list[str], listener: _Rows, stop: bool, args: tuple, kwargs: dict) -> None:
    """One forward of ``model`` with ``listener`` told of ``names``' outputs, keeping nothing (``stop``: end the
    forward once they all ran). The one place that builds and enters the hook engine for extract."""
    cap = Engine(model, names, listener=listener, keep=False, stop=stop)
    with cap:
        model(*args, **kwargs)


# -- from a layer's output to rows ------------------------------------------------------------------------------------

class _Rows(Listener):
    """The listener: turns each selected layer's output into this batch's rows, at hook time (before any later
    in-place op can change it)."""

    def __init__(self, select: Select, pool: Pool, dtype: torch.dtype | None, mask: Mask) -> None:
        self.select = select
        self.pool = pool
        self.dtype = dtype
        self.mask_option = mask
        self.selectors: dict[str, Callable[[Any], Any]] = {}
        self.batch: dict[str, torch.Tensor | _rows.Tokens] = {}
        self.n = 0
        self.mask: torch.Tensor | None = None  # this batch's
        self._where: Batch | None = None
        self._empty: list[int] | None = None  # rows of this batch whose mask is all zeros, once asked for

    def start_batch(self, batch: Batch, mask: torch.Tensor | None) -> None:
        self.batch = {}
        self.n = batch.n
        self.mask = mask
        self._where = batch
        self._empty = None

    def _no_valid_token(self, layer: str) -> None:
        """Refuse to pool (avg or max over the valid tokens) a batch in which a sample has none: its max would be
        the dtype's lowest number and its mean 0 / 0, neither a feature of the sample. Raised at hook time, so
        nothing of this batch is written; one sync per batch, only when such a pool meets a mask."""
        if self._empty is None:
            assert self.mask is not None  # noqa: S101 - called only when a mask applies
            self._empty = torch.nonzero(~self.mask.any(dim=1)).flatten().tolist()
        if not self._empty or self._where is None:
            return
        batch, rows = self._where, self._empty
        samples = ", ".join(str(int(batch.rows[r])) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ExtractError(
            f"sample{'s' * (len(rows) > 1)} {samples} (row {rows[0]} of batch {batch.index}) "
            f"{'have' if len(rows) > 1 else 'has'} no valid token: {'their' if len(rows) > 1 else 'its'} mask is all "
            f"zeros, so pool={self.pool!r} over the valid tokens of {layer!r} has no value (the max of no token, "
            "the mean 0 / 0). Nothing of this batch was written; the rows before it are kept. Leave empty samples "
            "out of the data, or pass mask=False to pool over every token, or pool=None to keep each sample's valid "
            "tokens (none for such a sample).")

    def forward(self, where: tuple[str, nn.Module, int], args: tuple, output: Any) -> None:
        name = where[0]
        if name in self.batch:
            raise ExtractError(
                f"{name!r} ran more than once in one forward pass, and extract stores one row per sample. Pick a "
                "layer that runs once (hookkit.trace shows the calls), or use hookkit.capture for every call.")
        pick = self.selectors.get(name) or self.selectors.setdefault(name, _rows.selector(self.select, name))
        t = _rows.first_tensor(pick(output), name)
        masked = _rows.masked(t, self.pool, self.mask, name, self._no_valid_token)
        if isinstance(masked, _rows.Tokens):
            flat = masked.flat.float() if masked.flat.dtype == torch.bfloat16 and self.dtype is None else masked.flat
            self.batch[name] = _rows.Tokens(flat if self.dtype is None else flat.to(self.dtype), masked.counts)
            return  # t[mask] is a copy: no later in-place op reaches it
        rows = _rows.pooled(t, self.pool, name) if masked is None else masked
        if not isinstance(rows, torch.Tensor) or rows.dim() == 0 or rows.shape[0] != self.n:
            raise ExtractError(f"{name!r}: expected a tensor with one row per sample ({self.n}), got "
                               f"{getattr(rows, 'shape', type(rows).__name__)}; check pool= / select=.")
        if rows.dtype == torch.bfloat16 and self.dtype is None:
            rows = rows.float()  # numpy has no bfloat16
        if self.dtype is not None:
            rows = rows.to(self.dtype)
        if shares_memory(rows, t):
            rows = rows.clone()  # a view of the live activation (at any offset): copy before an in-place op
        self.batch[name] = rows


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to_device(value: Any, device: torch.device) -> Any:
    return _tree.map_leaves(lambda t: t.to(device, non_blocking=True), value)


# -- the progress bar -------------------------------------------------------------------------------------------------

class _Bar:
    """A rich progress bar on a terminal: batches done of total, ETA, images/s and bytes written."""

    def __init__(self, total: int | None, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
        self._task = self._progress.add_task("extract", total=total, info="")
        self._start = time.perf_counter()
        self._progress.start()

    def update(self, batches: int, images: int, written: int) -> None:
        rate = images / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._task, completed=batches,
                              info=f"{rate:,.0f} images/s · {fmt_bytes(written)} written")

    def stop(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, total: int | None, console: Any = None) -> _Bar | None:
    """The bar, only when asked for and writing to a terminal: silent in CI, pipes and files."""
    from rich.console import Console

    console = console or Console(stderr=True)
    return _Bar(total, console) if enabled and console.is_terminal else None

