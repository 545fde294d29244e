"""``extract()``: features of a whole dataset, streamed to ``.npy`` files, resumable, and split across torchrun ranks."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
import torch.nn as nn

from . import __version__ as _version
from . import _tree
from ._errors import HookkitError
from ._npy import RowFile, write_header
from ._select import resolve
from .capture import Capture

__all__ = ["extract", "Features", "ExtractError"]

Pool = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]
Select = Union[None, int, str, Callable[[Any], torch.Tensor], Mapping[str, Any]]
_POOLS = (None, "avg", "max", "flatten", "cls")
_MANIFEST = "manifest.json"


class ExtractError(HookkitError, RuntimeError):
    """Extraction could not go on: bad data, a batch the model rejects, an output folder that does not fit."""


# -- per-sample reductions --------------------------------------------------------------------------------------------

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
    if isinstance(choice, (int, str)):
        def pick(out: Any) -> Any:
            try:
                return out[choice]
            except (KeyError, IndexError, TypeError):
                if isinstance(choice, str) and hasattr(out, choice):
                    return getattr(out, choice)
                raise ExtractError(f"select={choice!r} does not pick anything from {layer!r}'s output, a "
                                   f"{type(out).__name__}.") from None
        return pick
    raise TypeError(f"select for {layer!r} must be a callable, an index or a key, got {type(choice).__name__}.")


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
        if rows.data_ptr() == t.data_ptr() and rows.device.type == "cpu":
            rows = rows.clone()  # a view of the live activation: copy before a later in-place op changes it
        self.batch[name] = rows


# -- batches ------------------------------------------------------------------------------------------------------------

def _model_input(batch: Any, index: int) -> tuple[tuple, dict, int]:
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


def _to_device(value: Any, device: torch.device) -> Any:
    return _tree.map_leaves(lambda t: t.to(device, non_blocking=True), value)


# -- bookkeeping on disk ----------------------------------------------------------------------------------------------

def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the model's weights without storing them: class, parameter shapes and a checksum."""
    with torch.no_grad():
        total = 0.0
        shapes = []
        for name, p in model.named_parameters():
            shapes.append([name, list(p.shape)])
            d = p.detach().double()
            total += float(d.sum()) + float(d.pow(2).sum())
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "parameters": len(shapes),
            "shapes_digest": _hash_text(json.dumps(shapes)), "checksum": repr(total)}


def _describe_option(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _describe_option(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _ranges(done: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(done):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _unranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    return {i for a, b in ranges for i in range(a, b)}


class Features(Mapping[str, np.ndarray]):
    """What ``extract()`` returns: ``feats[layer]`` is an N-row array in dataset order (a read-only memmap of
    ``out/<layer>.npy`` when ``out`` was given)."""

    def __init__(self, arrays: dict[str, np.ndarray], out: Path | None, manifest: dict[str, Any] | None) -> None:
        self._arrays = arrays
        self.out = out
        self.manifest = manifest

    def __getitem__(self, layer: str) -> np.ndarray:
        try:
            return self._arrays[layer]
        except KeyError:
            raise KeyError(f"{layer!r} was not extracted; layers: {', '.join(self._arrays)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self._arrays.items())
        return f"<hookkit.Features {shapes}{f' in {self.out}' if self.out else ''}>"


def _dist() -> tuple[int, int, Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed
    return 0, 1, None


def _open_result(out: Path, layers: list[str]) -> Features:
    manifest = json.loads((out / _MANIFEST).read_text())
    arrays = {n: np.load(out / f"{n}.npy", mmap_mode="r") for n in layers}
    return Features(arrays, out, manifest)


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
                              info=f"{rate:,.0f} images/s · {_human_bytes(written)} written")

    def stop(self) -> None:
        self._progress.stop()


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def _progress(enabled: bool, total: int | None, console: Any = None) -> _Bar | None:
    """The bar, only when asked for and writing to a terminal: silent in CI, pipes and files."""
    from rich.console import Console

    console = console or Console(stderr=True)
    return _Bar(total, console) if enabled and console.is_terminal else None


def extract(
    model: nn.Module,
    layers: str | list[str],
    data: Iterable[Any],
    *,
    out: str | os.PathLike | None = None,
    pool: Pool = None,
    select: Select = None,
    dtype: torch.dtype | str | None = None,
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
            (labels etc. are ignored), or a dict of keyword inputs (Hugging Face style).
        out: a folder: ``out/<layer>.npy`` (N rows, readable by ``numpy.load(path, mmap_mode="r")`` without hookkit)
            and ``out/manifest.json``. Written batch by batch; an interrupted run, called again the same way,
            resumes after the last complete batch; a finished run returns at once; other arguments are refused.
        pool: per sample, keep the whole activation (``None``), ``"avg"`` / ``"max"`` over spatial dims
            ([N, C, H, W]) or tokens ([N, T, D]), ``"flatten"``, ``"cls"`` (first token), or a callable.
        select: which tensor of a structured output (tuple, dict, ModelOutput): an index, a key, a callable, or a
            ``{layer: choice}`` dict. Default: the first tensor.
        dtype: storage dtype, e.g. ``torch.float16`` (halves the disk).
        progress: a rich progress bar on a terminal (never in CI or a pipe).
        stop: end each forward once every selected layer has run (early layers cost only what they cost).

    Under ``torchrun`` (``torch.distributed`` initialised), rank r computes batches r, r + W, r + 2W, ... and writes
    only its rows; the files are identical to a one-process run. Every rank reads every batch to know where its
    rows go, so data loading is repeated on each rank while the model runs each batch once.

    Returns:
        ``Features``: ``feats[layer]`` -> numpy array (memmap with ``out``), ``feats.manifest``.

    Raises:
        ExtractError: empty data, a batch the model rejects (naming its index), a layer that never runs, an
            unwritable ``out``, or ``out`` holding a run with other arguments. Rows already written stay.
        LayerNotFoundError, TypeError, ValueError: bad layers or options, before anything runs.
    """
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    if pool not in _POOLS and not callable(pool):
        raise ValueError(f"pool={pool!r}: use None, 'avg', 'max', 'flatten', 'cls' or a callable.")
    torch_dtype = _torch_dtype(dtype)
    rank, world, dist = _dist()
    names = [n for ns in resolve(model, layer_list).values() for n in ns]  # checks model and names first
    if any(n == "" for n in names):
        raise ValueError("extract the model's layers, not the model itself ('' is the root): name its last layer.")
    if world > 1 and out is None:
        raise ValueError("under torchrun each rank computes only its share of the batches: pass out=DIR so that "
                         "every rank writes its rows into the same files.")

    settings = {
        "model": _fingerprint(model),
        "layers": names,
        "pool": _describe_option(pool),
        "select": _describe_option(select),
        "dtype": None if torch_dtype is None else str(torch_dtype),
        "stop": stop,
    }
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        done_result = _prepare_out(out_dir, settings, names, rank)
        if done_result is not None:
            return done_result

    try:
        n_batches = len(data)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows_listener = _Rows(select, pool, torch_dtype)
    files: dict[str, RowFile] = {}
    in_memory: dict[str, list[np.ndarray]] = {n: [] for n in names}
    shapes: dict[str, list[int]] = {}
    progress_path = out_dir / "progress" / f"rank-{rank}.json" if out_dir else None
    done = _done_batches(out_dir) if out_dir else set()
    mine = _own_done(progress_path) if progress_path else set()
    row = 0
    n_seen = 0
    bar = _progress(progress and rank == 0, n_batches)
    images = written = 0
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode: a wrapper may differ from its model
    model.eval()
    try:
        with torch.inference_mode():
            for index, batch in enumerate(data):
                n_seen += 1
                args, kwargs, n = _model_input(batch, index)
                first_row, row = row, row + n
                if index in done or index % world != rank:
                    continue
                rows_listener.batch = {}
                rows_listener.n = n
                cap = Capture(model, names, stop=stop)
                cap._listener = rows_listener
                cap._keep = False
                try:
                    with cap:
                        model(*_to_device(args, device), **_to_device(kwargs, device))
                except HookkitError:
                    raise
                except Exception as exc:
                    raise ExtractError(f"the model failed on batch {index} ({n} samples): {type(exc).__name__}: "
                                       f"{exc}") from exc
                missing = [name for name in names if name not in rows_listener.batch]
                if missing:
                    raise ExtractError(f"{', '.join(map(repr, missing))} did not run on batch {index}: nothing was "
                                       "written for it. Check that the layer is on the forward path for this input.")
                host = {k: v.to("cpu", non_blocking=True) for k, v in rows_listener.batch.items()}
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                for name, t in host.items():
                    arr = t.numpy()
                    if out_dir is None:
                        in_memory[name].append(arr)
                        continue
                    if name not in files:
                        shapes[name] = list(arr.shape[1:])
                        files[name] = RowFile(out_dir / f"{name}.npy.partial", arr.dtype, arr.shape[1:])
                    files[name].write(first_row, arr)
                mine.add(index)
                if progress_path is not None:
                    _atomic_json(progress_path, {"done": _ranges(mine),
                                                 "shapes": shapes,
                                                 "dtypes": {k: f.dtype.str for k, f in files.items()}})
                images += n
                written += sum(t.numel() * t.element_size() for t in host.values())
                if bar is not None:
                    bar.update(len(mine | done), images, written)
    finally:
        for m, mode in modes:
            m.training = mode
        for f in files.values():
            f.close()
        if bar is not None:
            bar.stop()
    if n_seen == 0:
        raise ExtractError("data yielded no batches: nothing to extract (is the dataset empty?).")
    if out_dir is None:
        return Features({n: np.concatenate(in_memory[n]) for n in names}, None, None)
    return _finish(out_dir, settings, names, n_seen, row, rank, dist)


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, np.dtype(dtype).name)
    except (TypeError, AttributeError):
        raise ValueError(f"dtype={dtype!r} is not a dtype numpy can store; use e.g. torch.float16.") from None


def _prepare_out(out: Path, settings: dict[str, Any], names: list[str], rank: int) -> Features | None:
    """Check ``out`` before any work: writable, and either new or holding a run with the same settings."""
    try:
        (out / "progress").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ExtractError(f"out={str(out)!r} is not a writable folder ({exc.strerror or exc}); choose another.") from None
    manifest_path = out / _MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        differ = [k for k in settings if old.get("settings", {}).get(k) != settings[k]]
        if differ:
            raise ExtractError(
                f"{out} holds features of another extraction ({', '.join(differ)} differ from this call's), "
                "so continuing would mix data. Use another out= folder, or delete this one to start over.")
        if old.get("complete") and all((out / f"{n}.npy").exists() for n in names):
            return _open_result(out, names)
    elif rank == 0:
        _atomic_json(manifest_path, {"settings": settings, "complete": False, "hookkit": _version,
                                     "torch": torch.__version__, "python": sys.version.split()[0]})
    return None


def _own_done(path: Path) -> set[int]:
    try:
        return _unranges(json.loads(path.read_text())["done"])
    except (OSError, ValueError, KeyError):
        return set()


def _done_batches(out: Path) -> set[int]:
    done: set[int] = set()
    for p in (out / "progress").glob("rank-*.json"):
        done |= _own_done(p)
    return done


def _finish(out: Path, settings: dict[str, Any], names: list[str], n_batches: int, n_rows: int, rank: int,
            dist: Any) -> Features:
    if dist is not None:
        dist.barrier()
    if rank == 0:
        done = _done_batches(out)
        missing = sorted(set(range(n_batches)) - done)
        if missing:
            raise ExtractError(f"batches {missing[:10]} were not written by any rank; run the same call again "
                               "to complete them.")
        shapes: dict[str, list[int]] = {}
        dtypes: dict[str, str] = {}
        for p in (out / "progress").glob("rank-*.json"):
            written = json.loads(p.read_text())
            shapes.update(written.get("shapes", {}))
            dtypes.update(written.get("dtypes", {}))
        for name in names:
            partial = out / f"{name}.npy.partial"
            if partial.exists():
                write_header(partial, np.dtype(dtypes[name]), (n_rows, *shapes[name]))
                os.replace(partial, out / f"{name}.npy")
        _atomic_json(out / _MANIFEST, {
            "settings": settings, "complete": True, "rows": n_rows, "batches": n_batches,
            "shapes": {n: [n_rows, *shapes[n]] for n in names},
            "dtypes": {n: dtypes[n] for n in names},
            "hookkit": _version, "torch": torch.__version__, "python": sys.version.split()[0],
        })
    if dist is not None:
        dist.barrier()
    return _open_result(out, names)
