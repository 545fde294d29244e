"""``extract()``: features of a whole dataset, streamed to ``.npy`` files, resumable, and split across torchrun ranks.

``extract()`` reads as its steps: check the options (``_checked_layers``), fingerprint the call (``_fingerprint``),
open a store (``_rowstore``: ``MemoryRows``, or the ``.npy`` folder ``NpyFolder`` with its manifest, progress
files and lock), take this rank's share of the batches (``_shards.share``), run the loop (``_run``), finish
the store. This module owns what turns a layer's output into rows: the listener ``_Rows`` (select, pool, dtype, at
hook time) and ``_forward_rows``, the one place that builds and enters the hook engine for a forward.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import _tree
from ._engine import Engine
from ._errors import ExtractError, HookkitError
from ._fingerprint import call_settings
from ._rowstore import Features, MemoryRows, NpyFolder, RowStore
from ._select import resolve
from ._shards import Batch, RoundRobin, ranks, sample_count, share
from ._snapshot import shares_memory
from ._stats import fmt_bytes

__all__ = ["extract", "Features"]

Pool = None | str | Callable[[torch.Tensor], torch.Tensor]
Select = None | int | str | Callable[[Any], torch.Tensor] | Mapping[str, Any]
_POOLS = (None, "avg", "max", "flatten", "cls")


def extract(
    model: nn.Module,
    layers: str | list[str],
    data: Iterable[Any],
    *,
    out: str | os.PathLike | None = None,
    pool: Pool = None,
    select: Select = None,
    dtype: torch.dtype | str | None = None,
    dataset_id: str | None = None,
    progress: bool = True,
    stop: bool = True,
) -> Features:
    """Features of every sample of ``data`` at the given layers, in dataset order; streamed to ``out`` if given.

    Example:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [torch.randn(3, 4) for _ in range(5)]           # 5 batches of 3 samples
        >>> feats = hookkit.extract(model, ["1"], data, progress=False)
        >>> feats["1"].shape
        (15, 8)

    Args:
        model: the ``nn.Module``; run in eval mode under ``torch.inference_mode()`` (its mode is restored after,
            also on error), on the device of its parameters.
        layers: layer names or globs (as ``capture``); each must run once per forward.
        data: a DataLoader or any iterable of batches: a tensor, a tuple/list whose first item is the model input
            (labels etc. are ignored), or a dict of keyword inputs (Hugging Face style). Empty batches are skipped.
        out: a folder: one ``.npy`` per layer (N rows, readable by ``numpy.load(path, mmap_mode="r")`` without
            hookkit; named after the layer, ``feats.path(layer)``) and ``manifest.json``. Written batch by batch;
            an interrupted run, called again the same way (any batch size, any number of ranks), computes only
            the rows still missing; a finished run returns at once; another model, other options or other data
            (length, first sample, ``dataset_id``) are refused. One process per rank may write into ``out`` at a
            time.
        pool: per sample, keep the whole activation (``None``), ``"avg"`` / ``"max"`` over spatial dims
            ([N, C, H, W]) or tokens ([N, T, D]), ``"flatten"``, ``"cls"`` (first token), or a callable.
        select: which tensor of a structured output (tuple, dict, ModelOutput): an index, a key, a callable, or a
            ``{layer: choice}`` dict. Default: the first tensor.
        dtype: storage dtype, e.g. ``torch.float16`` (halves the disk). numpy has no bfloat16: a bfloat16 layer
            is stored as float32 unless ``dtype`` says otherwise, and ``dtype=torch.bfloat16`` is refused.
        dataset_id: your name for the data (e.g. ``"imagenet-val@2024-05"``), kept in the manifest; a resumed
            run with another ``dataset_id`` is refused. hookkit checks the data's length and first sample only.
        progress: a rich progress bar on a terminal (never in CI or a pipe).
        stop: end each forward once every selected layer has run (early layers cost only what they cost). The
            first batch a call computes runs the whole forward, to refuse a layer that runs twice.

    Under ``torchrun`` (``torch.distributed`` initialised), rank r computes batches r, r + W, r + 2W, ... and writes
    only its rows; the files are identical to a one-process run. Every rank reads every batch to know where its
    rows go, so data loading is repeated on each rank while the model runs each batch once.

    Returns:
        ``Features``: ``feats[layer]`` -> numpy array (memmap with ``out``), ``feats.manifest``.

    Raises:
        ExtractError: empty data, a batch the model rejects (naming its index), a layer that never runs or runs
            twice, rows whose shape changes, an unwritable or full disk, ``out`` holding a run with other
            arguments or data, or another process writing into ``out``. Rows already written stay.
        LayerNotFoundError, TypeError, ValueError: bad layers or options, before anything runs or is written.
    """
    torch_dtype = _checked_options(pool, dtype, dataset_id)
    rank, world, dist = ranks(_device(model))
    names = _checked_layers(model, layers, select, out=out, world=world)
    listener = _Rows(select, pool, torch_dtype)
    store: RowStore
    if out is None:
        store = MemoryRows(names)
    else:
        settings = call_settings(model, names, pool=pool, select=select, dtype=torch_dtype, stop=stop,
                                 dataset_id=dataset_id)
        store = NpyFolder(Path(out), names, settings, sample_count(data), rank=rank, world=world, dist=dist)
    with store:
        finished = store.resume()
        if finished is not None:
            return finished
        batches = share(data, rank=rank, world=world, done=store.done_rows())
        _run(model, names, batches, listener, store, stop=stop, progress=progress and rank == 0)
        return store.finish(*batches.totals())


# -- options ----------------------------------------------------------------------------------------------------------

def _checked_options(pool: Pool, dtype: Any, dataset_id: Any) -> torch.dtype | None:
    """The options that need no model: ``pool``, ``dtype`` (returned as a torch dtype), ``dataset_id``."""
    if not callable(pool) and not any(pool is p or pool == p for p in _POOLS):
        raise ValueError(f"pool={pool!r}: use None, 'avg', 'max', 'flatten', 'cls' or a callable.")
    torch_dtype = _torch_dtype(dtype)
    if dataset_id is not None and not isinstance(dataset_id, str):
        raise TypeError(f"dataset_id={dataset_id!r}: use a string that names your data, e.g. 'imagenet-val@v2'.")
    return torch_dtype


def _checked_layers(model: nn.Module, layers: str | list[str], select: Select, *, out: Any, world: int) -> list[str]:
    """The layer names (model and names checked first), ``select``'s keys against them, and ``out`` under
    torchrun: everything is refused before anything runs or is written."""
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    names = [n for ns in resolve(model, layer_list).values() for n in ns]
    if any(n == "" for n in names):
        raise ValueError("extract the model's layers, not the model itself ('' is the root): name its last layer.")
    _check_select(select, names)
    if world > 1 and out is None:
        raise ValueError("under torchrun each rank computes only its share of the batches: pass out=DIR so that "
                         "every rank writes its rows into the same files.")
    return names


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        result = dtype
    else:
        try:
            result = getattr(torch, np.dtype(dtype).name)
        except (TypeError, AttributeError):
            result = None
    if result is not None:
        try:
            torch.empty(0, dtype=result).numpy()
        except TypeError:
            result = None
    if result is None:
        raise ValueError(f"dtype={dtype!r} is not a dtype numpy (and so a .npy file) can hold; use e.g. "
                         "torch.float16 (half the size; bfloat16 has no numpy type) or torch.float32.")
    return result


def _check_select(select: Select, names: list[str]) -> None:
    """Types and layer keys of ``select``, before anything runs (what it picks is seen on the first batch)."""
    if isinstance(select, Mapping):
        for key, choice in select.items():
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"select has a key {key!r} that is not one of the extracted layers "
                                 f"({', '.join(map(repr, names))}); key it by layer name.{hint}")
            _check_choice(choice, f"select[{key!r}]")
    else:
        _check_choice(select, "select")


def _check_choice(choice: Any, where: str) -> None:
    if choice is None or callable(choice) or (isinstance(choice, (int, str)) and not isinstance(choice, bool)):
        return
    raise TypeError(f"{where}={choice!r}: use an index (int), a key (str), a callable, or a {{layer: choice}} dict.")


# -- the loop ---------------------------------------------------------------------------------------------------------

def _run(model: nn.Module, names: list[str], batches: RoundRobin, listener: _Rows, store: RowStore, *, stop: bool,
         progress: bool) -> None:
    """Every batch of ``share`` is read; its first sample goes to ``store.first_sample``; the batches this rank
    computes go through the model (eval mode, inference mode; each module's mode restored after, also on error),
    and their rows to ``store.write``."""
    device = _device(model)
    images = written = 0
    whole_forward_done = False
    bar = _progress(progress, batches.total)
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode: a wrapper may differ from its model
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                if batch.first:
                    store.first_sample(batch.args, batch.kwargs, batch.n)
                if not batch.mine:
                    if bar is not None:
                        bar.update(batch.index + 1, images, written)
                    continue
                # The first batch runs the whole forward even with stop=True: a layer that runs again later in
                # the forward is refused instead of having its first call extracted silently.
                rows = _batch_rows(model, names, listener, batch, device, stop=stop,
                                   stop_now=stop and whole_forward_done)
                whole_forward_done = True
                store.write(batch.first_row, rows, batch=batch.index)
                images += batch.n
                written += sum(arr.nbytes for arr in rows.values())
                if bar is not None:
                    bar.update(batch.index + 1, images, written)
    finally:
        for m, mode in modes:
            m.training = mode
        if bar is not None:
            bar.stop()


def _batch_rows(model: nn.Module, names: list[str], listener: _Rows, batch: Batch, device: torch.device, *,
                stop: bool, stop_now: bool) -> dict[str, np.ndarray]:
    """One batch's rows of every layer, on the host; a failing model or a layer that did not run is an
    ExtractError naming the batch."""
    listener.batch = {}
    listener.n = batch.n
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
    host = {k: v.to("cpu", non_blocking=True) for k, v in listener.batch.items()}
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return {name: t.numpy() for name, t in host.items()}


def _forward_rows(model: nn.Module, names: list[str], listener: _Rows, stop: bool, args: tuple, kwargs: dict) -> None:
    """One forward of ``model`` with ``listener`` told of ``names``' outputs, keeping nothing (``stop``: end the
    forward once they all ran). The one place that builds and enters the hook engine for extract."""
    cap = Engine(model, names, listener=listener, keep=False, stop=stop)
    with cap:
        model(*args, **kwargs)


# -- from a layer's output to rows ------------------------------------------------------------------------------------

def _pool(t: torch.Tensor, pool: Pool, layer: str) -> torch.Tensor:
    if pool is None:
        return t
    if callable(pool):
        return pool(t)
    if pool == "flatten":
        return t.reshape(t.shape[0], -1)
    if t.dim() <= 2:
        if pool == "cls":
            raise ExtractError(f"pool='cls' needs token outputs [N, T, D]; {layer!r} gives {tuple(t.shape)}.")
        return t
    if pool == "cls":
        if t.dim() != 3:
            raise ExtractError(f"pool='cls' needs token outputs [N, T, D]; {layer!r} gives {tuple(t.shape)}.")
        return t[:, 0]
    # [N, T, D] tokens: reduce T; [N, C, *spatial]: reduce the spatial dims.
    dims = (1,) if t.dim() == 3 else tuple(range(2, t.dim()))
    return t.mean(dim=dims) if pool == "avg" else t.amax(dim=dims)


def _selector(select: Select, layer: str) -> Callable[[Any], Any]:
    choice = select.get(layer) if isinstance(select, Mapping) else select
    if choice is None:
        return lambda out: out
    if callable(choice):
        return choice

    def pick(out: Any) -> Any:
        try:
            return out[choice]
        except (KeyError, IndexError, TypeError):
            if isinstance(choice, str) and hasattr(out, choice):
                return getattr(out, choice)
            raise ExtractError(f"select={choice!r} does not pick anything from {layer!r}'s output, a "
                               f"{type(out).__name__}.") from None
    return pick


def _first_tensor(value: Any, layer: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    found = _tree.leaves(value)
    if not found:
        raise ExtractError(f"{layer!r} produced no tensor ({type(value).__name__}); pick one with select=.")
    return found[0]


class _Rows:
    """The listener: turns each selected layer's output into this batch's rows, at hook time (before any later
    in-place op can change it)."""

    def __init__(self, select: Select, pool: Pool, dtype: torch.dtype | None) -> None:
        self.select = select
        self.pool = pool
        self.dtype = dtype
        self.selectors: dict[str, Callable[[Any], Any]] = {}
        self.batch: dict[str, torch.Tensor] = {}
        self.n = 0

    def forward_pre(self, where: Any, args: tuple, kwargs: dict) -> None:
        pass

    def grad(self, *args: Any) -> None:  # pragma: no cover - extract never records gradients
        pass

    def forward(self, where: tuple[str, nn.Module, int], args: tuple, output: Any) -> None:
        name = where[0]
        if name in self.batch:
            raise ExtractError(
                f"{name!r} ran more than once in one forward pass, and extract stores one row per sample. Pick a "
                "layer that runs once (hookkit.trace shows the calls), or use hookkit.capture for every call.")
        pick = self.selectors.get(name) or self.selectors.setdefault(name, _selector(self.select, name))
        t = _first_tensor(pick(output), name)
        rows = _pool(t, self.pool, name)
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
