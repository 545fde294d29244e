"""``extract()``: features of a whole dataset, streamed to ``.npy`` files, resumable, and split across torchrun ranks.

On disk (``out=DIR``): ``manifest.json`` says what the rows are (model fingerprint, layers, options, data checks,
the file of each layer); ``<file>.npy.partial`` receive rows at their final place (``_npy.RowFile``);
``progress/rank-R.json`` lists the row ranges rank R has written, rewritten atomically after each batch's rows are
in the files; ``progress/rank-R.lock`` is held (``flock``) by the process writing as rank R. Finished work is
tracked by rows, not batches, so a resumed run may use another batch size or another number of ranks.
"""

from __future__ import annotations

import difflib
import errno
import functools
import hashlib
import json
import os
import re
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
import torch.nn as nn

from . import __version__ as _version
from . import _tree
from ._errors import ExtractError, HookkitError
from ._npy import HEADER_BYTES, RowFile, finish_file
from ._select import resolve
from ._stats import fmt_bytes
from ._capture import Capture

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, a second writer is not noticed
    fcntl = None  # type: ignore[assignment]

__all__ = ["extract", "Features"]

Pool = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]
Select = Union[None, int, str, Callable[[Any], torch.Tensor], Mapping[str, Any]]
_POOLS = (None, "avg", "max", "flatten", "cls")
_MANIFEST = "manifest.json"


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

    def pick(out: Any) -> Any:
        try:
            return out[choice]
        except (KeyError, IndexError, TypeError):
            if isinstance(choice, str) and hasattr(out, choice):
                return getattr(out, choice)
            raise ExtractError(f"select={choice!r} does not pick anything from {layer!r}'s output, a "
                               f"{type(out).__name__}.") from None
    return pick


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


def _first_tensor(value: Any, layer: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    found = _tree.leaves(value)
    if not found:
        raise ExtractError(f"{layer!r} produced no tensor ({type(value).__name__}); pick one with select=.")
    return found[0]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without plain storage: copy to be safe
        return True


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
        if _shares_memory(rows, t):
            rows = rows.clone()  # a view of the live activation (at any offset): copy before an in-place op
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


def _samples(data: Any) -> int | None:
    """How many samples ``data`` holds, when that is known without iterating (a DataLoader's map-style dataset)."""
    dataset = getattr(data, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def _sample0_digest(args: tuple, kwargs: dict, n: int) -> str:
    """A hash of the first sample of every input tensor: the cheap check that a resumed run reads the same data."""
    h = hashlib.sha256()
    for t in _tree.leaves((args, kwargs)):
        first = t[:1] if t.dim() and t.shape[0] == n else t
        h.update(f"{first.dtype} {tuple(first.shape)};".encode())
        _hash_tensor(h, first)
    return h.hexdigest()[:32]


# -- fingerprints ------------------------------------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    if t.layout != torch.strided or t.device.type == "meta" or t.is_quantized:
        h.update(f"<{t.layout} {t.device.type} {t.dtype}>".encode())  # no plain bytes to read: its kind only
        return
    flat = t.reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().resolve_conj().resolve_neg()
    h.update(memoryview(flat.view(torch.uint8).numpy()))


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the model without storing it: every module's name, class and settings (``extra_repr``),
    and the bytes of every parameter and buffer with their names, shapes and dtypes."""
    h = hashlib.sha256()
    for name, module in model.named_modules(remove_duplicate=False):
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        try:
            extra = _ADDRESS.sub("", module.extra_repr())
        except Exception:  # a custom extra_repr that fails: its class still counts
            extra = "?"
        h.update(f"{name}:{kind}({extra})\n".encode())
    n_tensors = 0
    with torch.no_grad():
        for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in items:
                n_tensors += 1
                h.update(f"{kind} {name} {t.dtype} {tuple(t.shape)}\n".encode())
                _hash_tensor(h, t)
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "tensors": n_tensors,
            "sha256": h.hexdigest()}


def _code_digest(fn: Any) -> str:
    """A hash of what a callable does: its code (constants and nested functions included), defaults, the values
    it closes over, and the plain global values it reads; a bound method's object; a module's fingerprint."""
    h = hashlib.sha256()

    def value(v: Any, depth: int) -> None:
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            h.update(repr(v).encode())
        elif isinstance(v, (tuple, list)):
            h.update(b"(")
            for item in v:
                value(item, depth)
            h.update(b")")
        elif isinstance(v, (set, frozenset)):
            h.update(repr(sorted(map(repr, v))).encode())
        elif isinstance(v, dict):
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                value(v[k], depth)
        elif isinstance(v, torch.Tensor):
            h.update(f"tensor {v.dtype} {tuple(v.shape)}".encode())
            _hash_tensor(h, v)
        elif isinstance(v, nn.Module):
            h.update(_fingerprint(v)["sha256"].encode())
        elif isinstance(v, types.CodeType):
            h.update(v.co_code)
            h.update(repr(v.co_names).encode())
            for const in v.co_consts:
                value(const, depth)
        elif callable(v) and depth < 4:
            function(v, depth + 1)
        else:
            h.update(f"<{type(v).__module__}.{type(v).__qualname__}>".encode())

    def function(f: Any, depth: int) -> None:
        h.update(f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}|".encode())
        if isinstance(f, functools.partial):
            function(f.func, depth)
            value(f.args, depth)
            value(f.keywords, depth)
        elif isinstance(f, types.MethodType):
            function(f.__func__, depth)
            value(f.__self__, depth)
        elif isinstance(f, types.FunctionType):
            value(f.__code__, depth)
            value(f.__defaults__, depth)
            value(f.__kwdefaults__, depth)
            for cell in f.__closure__ or ():
                try:
                    value(cell.cell_contents, depth)
                except ValueError:  # an empty cell
                    h.update(b"<empty>")
            for name in f.__code__.co_names:
                g = f.__globals__.get(name)
                if isinstance(g, (bool, int, float, str, tuple, torch.Tensor)):
                    h.update(name.encode())
                    value(g, depth)
        elif isinstance(f, nn.Module):
            value(f, depth)
        elif not isinstance(f, (types.BuiltinFunctionType, type)) and hasattr(type(f), "__call__"):
            call = type(f).__call__
            if isinstance(call, types.FunctionType):
                function(call, depth)
            value(getattr(f, "__dict__", {}), depth)

    function(fn, 0)
    return h.hexdigest()[:32]


def _describe_option(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _describe_option(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return {"callable": name, "code": _code_digest(value)}


# -- bookkeeping on disk ----------------------------------------------------------------------------------------------

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


def _covers(ranges: list[list[int]], a: int, b: int) -> bool:
    return any(lo <= a and b <= hi for lo, hi in ranges)


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


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,150}")


def _file_names(names: list[str]) -> dict[str, str]:
    """Each layer's file inside ``out``: the layer name itself when that is a plain file name, else a cleaned name
    with a hash (``a/b`` must not become a folder, ``../x`` must not leave ``out``)."""
    files: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        stem = name
        if not _SAFE_NAME.fullmatch(name) or name.lower() in taken:
            clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")[:100]
            stem = f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        taken.add(stem.lower())
        files[name] = f"{stem}.npy"
    return files


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _read_progress(path: Path) -> dict[str, Any]:
    """One rank's progress; an unreadable or old-format file counts as nothing done (those rows are recomputed)."""
    try:
        data = json.loads(path.read_text())
        return {"rows": _merge(data["rows"]), "shapes": dict(data.get("shapes", {})),
                "dtypes": dict(data.get("dtypes", {}))}
    except (OSError, ValueError, KeyError, TypeError):
        return {"rows": [], "shapes": {}, "dtypes": {}}


def _all_progress(out: Path) -> tuple[list[list[int]], dict[str, list[int]], dict[str, str]]:
    rows: list[list[int]] = []
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for path in sorted((out / "progress").glob("rank-*.json")):
        p = _read_progress(path)
        rows += p["rows"]
        for name, shape in p["shapes"].items():
            if shapes.setdefault(name, shape) != shape:
                raise ExtractError(f"{out}: ranks wrote rows of two shapes for {name!r} ({shapes[name]} and "
                                   f"{shape}); delete the folder and run again with pool= or inputs of one size.")
        for name, dt in p["dtypes"].items():
            dtypes.setdefault(name, dt)
    return _merge(rows), shapes, dtypes


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
    forgotten (and computed again), never returned as zeros."""
    rows, shapes, dtypes = _all_progress(out)
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
    """No manifest: nothing in the folder is known to belong to this call, so no earlier progress counts."""
    _forget_rows(out, rank, world, 0)


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
    files = manifest["files"]
    for name in names:
        path = out / files[name]
        if not path.exists():
            try:
                os.replace(out / f"{files[name]}.partial", path)
            except FileNotFoundError:
                if not path.exists():  # not renamed by a process beside us either
                    raise ExtractError(
                        f"{path} is missing, but {out / _MANIFEST} says the extraction finished. To compute it "
                        "again, delete the folder (or use another out=) and run the same call.") from None
        expected = HEADER_BYTES + int(np.prod(manifest["shapes"][name], dtype=np.int64)) * \
            np.dtype(manifest["dtypes"][name]).itemsize
        if path.stat().st_size != expected:
            raise ExtractError(f"{path} has {path.stat().st_size} bytes where the finished extraction wrote "
                               f"{expected}: it was changed. Delete the folder (or use another out=) and run the "
                               "same call to compute it again.")
    arrays = {n: np.load(out / files[n], mmap_mode="r") for n in names}
    return Features(arrays, out, manifest)


class Features(Mapping[str, np.ndarray]):
    """What ``extract()`` returns: ``feats[layer]`` is an N-row array in dataset order (a read-only memmap of
    the layer's file when ``out`` was given; ``feats.path(layer)`` names it)."""

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

    def path(self, layer: str) -> Path:
        """The ``.npy`` file of ``layer`` (its name, or a cleaned name with a hash when the layer name is not a
        plain file name, e.g. holds ``/``)."""
        if self.out is None or self.manifest is None:
            raise ValueError("these features are in memory: extract(..., out=DIR) writes files.")
        self[layer]  # a clear KeyError for a layer that was not extracted
        return self.out / self.manifest["files"][layer]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self._arrays.items())
        return f"<hookkit.Features {shapes}{f' in {self.out}' if self.out else ''}>"


def _dist() -> tuple[int, int, Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed
    return 0, 1, None


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
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    if not callable(pool) and not any(pool is p or pool == p for p in _POOLS):
        raise ValueError(f"pool={pool!r}: use None, 'avg', 'max', 'flatten', 'cls' or a callable.")
    torch_dtype = _torch_dtype(dtype)
    if dataset_id is not None and not isinstance(dataset_id, str):
        raise TypeError(f"dataset_id={dataset_id!r}: use a string that names your data, e.g. 'imagenet-val@v2'.")
    rank, world, dist = _dist()
    names = [n for ns in resolve(model, layer_list).values() for n in ns]  # checks model and names first
    if any(n == "" for n in names):
        raise ValueError("extract the model's layers, not the model itself ('' is the root): name its last layer.")
    _check_select(select, names)
    if world > 1 and out is None:
        raise ValueError("under torchrun each rank computes only its share of the batches: pass out=DIR so that "
                         "every rank writes its rows into the same files.")
    listener = _Rows(select, pool, torch_dtype)
    if out is None:
        arrays: dict[str, list[np.ndarray]] = {n: [] for n in names}

        def keep(index: int, first_row: int, n: int, rows: dict[str, np.ndarray]) -> None:
            for name, arr in rows.items():
                arrays[name].append(arr)

        _run(model, names, data, listener, stop=stop, rank=0, world=1, done=[], shapes={},
             on_sample0=None, write=keep, progress=progress)
        return Features({n: np.concatenate(arrays[n]) for n in names}, None, None)

    settings = {
        "model": _fingerprint(model),
        "layers": names,
        "pool": _describe_option(pool),
        "select": _describe_option(select),
        "dtype": None if torch_dtype is None else str(torch_dtype),
        "stop": stop,
        "dataset_id": dataset_id,
    }
    out_dir = Path(out)
    try:
        (out_dir / "progress").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExtractError(f"out={str(out_dir)!r} is not a writable folder ({exc.strerror or exc}); "
                           "choose another.") from None
    lock = _lock(out_dir, rank)
    try:
        return _extract_to(out_dir, model, names, data, listener, settings, _samples(data), stop=stop,
                           progress=progress, rank=rank, world=world, dist=dist)
    finally:
        lock.release()


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


def _run(model: nn.Module, names: list[str], data: Iterable[Any], listener: _Rows, *, stop: bool, rank: int,
         world: int, done: list[list[int]], shapes: dict[str, tuple[list[int], str]],
         on_sample0: Callable[[tuple, dict, int], None] | None,
         write: Callable[[int, int, int, dict[str, np.ndarray]], None], progress: bool) -> tuple[int, int]:
    """The loop: every batch is read (to know where its rows go); the batches this rank owns whose rows are not
    all ``done`` are computed and handed to ``write``. Returns (batches, rows)."""
    try:
        n_batches = len(data)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    row = n_seen = images = written = 0
    first_sample_seen = whole_forward_done = False
    bar = _progress(progress and rank == 0, n_batches)
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode: a wrapper may differ from its model
    model.eval()
    try:
        with torch.inference_mode():
            for index, batch in enumerate(data):
                n_seen += 1
                args, kwargs, n = _model_input(batch, index)
                first_row, row = row, row + n
                if n == 0:
                    continue  # an empty batch: no rows
                if not first_sample_seen:
                    first_sample_seen = True
                    if on_sample0 is not None:
                        on_sample0(args, kwargs, n)
                if index % world != rank or _covers(done, first_row, row):
                    if bar is not None:
                        bar.update(index + 1, images, written)
                    continue
                # The first batch runs the whole forward even with stop=True: a layer that runs again later in
                # the forward is refused instead of having its first call extracted silently.
                stop_now = stop and whole_forward_done
                listener.batch = {}
                listener.n = n
                cap = Capture(model, names, stop=stop_now)
                cap._listener = listener
                cap._keep = False
                try:
                    with cap:
                        model(*_to_device(args, device), **_to_device(kwargs, device))
                except HookkitError:
                    raise
                except Exception as exc:
                    past_the_layers = stop and not stop_now and all(name in listener.batch for name in names)
                    if not past_the_layers:  # else: a failure after the last layer, where stop would have ended
                        raise ExtractError(f"the model failed on batch {index} ({n} samples): "
                                           f"{type(exc).__name__}: {exc}") from exc
                whole_forward_done = True
                missing = [name for name in names if name not in listener.batch]
                if missing:
                    raise ExtractError(f"{', '.join(map(repr, missing))} did not run on batch {index}: nothing was "
                                       "written for it. Check that the layer is on the forward path for this input.")
                host = {k: v.to("cpu", non_blocking=True) for k, v in listener.batch.items()}
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                rows = {name: t.numpy() for name, t in host.items()}
                for name, arr in rows.items():
                    shape = list(arr.shape[1:])
                    before, where = shapes.setdefault(name, (shape, f"batch {index}"))
                    if shape != before:
                        raise ExtractError(
                            f"{name!r}: batch {index} gave rows of shape {tuple(shape)}, but {where} gave "
                            f"{tuple(before)}, and a .npy file holds rows of one shape. Reduce them to a fixed size "
                            "with pool= (e.g. pool='avg'), or feed inputs of one size.")
                write(index, first_row, n, rows)
                images += n
                written += sum(arr.nbytes for arr in rows.values())
                if bar is not None:
                    bar.update(index + 1, images, written)
    finally:
        for m, mode in modes:
            m.training = mode
        if bar is not None:
            bar.stop()
    if n_seen == 0:
        raise ExtractError("data yielded no batches: nothing to extract (is the dataset empty?).")
    if row == 0:
        raise ExtractError(f"all {n_seen} batches of data were empty: nothing to extract.")
    return n_seen, row


def _manifest(settings: dict[str, Any], samples: int | None, sample0: str | None, files: dict[str, str],
              **finished: Any) -> dict[str, Any]:
    return {"settings": settings, "data": {"samples": samples, "sample0": sample0}, "files": files,
            "complete": bool(finished), **finished,
            "hookkit": _version, "torch": torch.__version__, "python": sys.version.split()[0]}


def _extract_to(out: Path, model: nn.Module, names: list[str], data: Iterable[Any], listener: _Rows,
                settings: dict[str, Any], samples: int | None, *, stop: bool, progress: bool, rank: int,
                world: int, dist: Any) -> Features:
    """extract() into ``out``, with this rank's lock held."""
    files = _file_names(names)
    manifest = _read_manifest(out)
    if manifest is not None:
        _check_same(out, manifest, settings, samples)
        if manifest.get("complete"):
            return _open_finished(out, manifest, names)
        _check_partials(out, names, files, rank, world)
    else:
        _start_fresh(out, rank, world)
    if dist is not None:
        dist.barrier()  # every rank has checked the files before any rank writes
    done, known_shapes, dtypes = _all_progress(out)
    own_path = out / "progress" / f"rank-{rank}.json"
    mine = _read_progress(own_path)["rows"]
    shapes = {n: (s, f"the rows already in {out}") for n, s in known_shapes.items() if n in names}
    dtypes = {n: d for n, d in dtypes.items() if n in names}
    state: dict[str, Any] = {"manifest": manifest, "sample0": None}
    row_files: dict[str, RowFile] = {}

    def check_sample0(args: tuple, kwargs: dict, n: int) -> None:
        state["sample0"] = digest = _sample0_digest(args, kwargs, n)
        before = (manifest or {}).get("data", {}).get("sample0")
        if before is not None and before != digest:
            raise ExtractError(
                f"sample 0 of data differs from the one the extraction in {out} started on: the dataset changed "
                "(other content or order; random transforms or shuffle=True do this too), so its rows would not "
                "match. Use another out= folder, or delete this one to start over.")

    def write(index: int, first_row: int, n: int, rows: dict[str, np.ndarray]) -> None:
        if state["manifest"] is None and rank == 0:  # only once a batch gave good rows: bad options leave no trace
            state["manifest"] = _manifest(settings, samples, state["sample0"], files)
            with _Writing(out / _MANIFEST):
                _atomic_json(out / _MANIFEST, state["manifest"])
        for name, arr in rows.items():
            path = out / f"{files[name]}.partial"
            with _Writing(path):
                if name not in row_files:
                    dtypes.setdefault(name, arr.dtype.str)
                    row_files[name] = RowFile(path, np.dtype(dtypes[name]), arr.shape[1:])
                row_files[name].write(first_row, arr)
        mine[:] = _merge([*mine, [first_row, first_row + n]])
        with _Writing(own_path):  # after the rows: progress never claims rows that are not in the files
            _atomic_json(own_path, {"rows": mine, "shapes": {k: s for k, (s, _) in shapes.items()},
                                    "dtypes": dtypes})

    try:
        n_batches, n_rows = _run(model, names, data, listener, stop=stop, rank=rank, world=world, done=done,
                                 shapes=shapes, on_sample0=check_sample0, write=write, progress=progress)
    finally:
        for f in row_files.values():
            f.close()
    finished = {"batches": n_batches, "rows": n_rows}
    error: BaseException | None = None
    if dist is not None:
        dist.barrier()
    if rank == 0:
        try:
            _complete(out, _manifest(settings, samples, state["sample0"], files), names, **finished)
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
    return _open_finished(out, manifest, names)


def _complete(out: Path, manifest: dict[str, Any], names: list[str], *, batches: int, rows: int) -> None:
    """Rank 0, after every rank is done: check that every row 0..N-1 is written, give each file its final header
    and length, mark the manifest complete (the commit point), then rename the files."""
    current = _read_manifest(out)
    if current is not None and current.get("complete"):
        return  # finished by another process: never replace finished files
    written, shapes, dtypes = _all_progress(out)
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
    for name in names:
        partial = out / f"{files[name]}.partial"
        dt = np.dtype(dtypes[name])
        need = HEADER_BYTES + rows * int(np.prod(shapes[name], dtype=np.int64)) * dt.itemsize
        size = partial.stat().st_size if partial.exists() else None
        if size is None or size < need:
            raise ExtractError(f"{partial} {'is missing' if size is None else 'was cut short'} while this run "
                               "wrote into it (by another program?). Run the same call again: the lost rows are "
                               "computed again.")
        with _Writing(partial):
            finish_file(partial, dt, (rows, *shapes[name]))
    manifest.update(complete=True, batches=batches, rows=rows, shapes={n: [rows, *shapes[n]] for n in names},
                    dtypes={n: dtypes[n] for n in names})
    with _Writing(out / _MANIFEST):
        _atomic_json(out / _MANIFEST, manifest)
    for name in names:
        os.replace(out / f"{files[name]}.partial", out / files[name])
