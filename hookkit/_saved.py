"""Captures on disk and merged: ``Capture.save(path)`` writes one ``.safetensors`` file, ``load(path)`` reads it back
as a ``ReadOnlyCapture``, and ``merge(captures)`` joins captures of several batches into one.

The seams: a capture's stores (``_capture.Store``) read a ``Recording`` of ``Call`` records (``_engine``). Saving
walks that recording (nested values through ``_tree``, in-place edits checked through ``_snapshot.check_guards``, as a
read would), and loading and merging build a new ``Recording`` of ``Call`` records that the very same stores read: a
loaded capture answers ``cap[name]``, ``cap.calls(name)``, ``cap.inputs`` ... exactly as the live one did.

The file: the tensors, contiguous and on the CPU, under keys ``"<layer>/<kind>/<call>/<i>"`` (one key for a tensor
stored in several places), and in the safetensors header's metadata, under ``"hookkit"``, a JSON manifest
(``_FORMAT``; its SHA-256 under ``"hookkit.sha256"``) that holds the SHA-256 of each tensor's bytes (``"sha256"``:
key -> hex digest; safetensors itself checks no data) and, per layer and kind, each call's nested structure:
containers as ``{"type": "tuple" | "list" | "namedtuple" | "dict" | "dataclass", ...}`` (with ``"module"`` and
``"qualname"`` of their class where it is not a plain tuple, list or dict), tensors as ``{"type": "tensor", "key",
"dtype", "shape"}``, and numbers, strings, booleans and None as themselves; per layer, ``"forward"`` holds the number
of the model's forward each call ran in (what ``cap[name]`` reads: the first call of the last forward). safetensors is
optional (``pip install 'hookkit[save]'``): it is imported only when a capture is saved or loaded.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import importlib
import itertools
import json
import math
import os
import reprlib
import secrets
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, _tree
from ._capture import Recorded, Store
from ._engine import Call, Recording, count_slots
from ._errors import SavedCaptureError
from ._npy import sync, sync_folder
from ._snapshot import check_guards

__all__ = ["save", "load", "merge", "ReadOnlyCapture", "NotSaved"]

_FORMAT = 1  # the manifest's format version: a file of a newer one is refused with "upgrade hookkit"
_INSTALL = "pip install 'hookkit[save]'"
_KINDS = ("outputs", "inputs", "kwargs", "grads", "grad_inputs")


class ReadOnlyCapture(Recorded):
    """A capture read from a file (``hookkit.load``) or merged from several (``hookkit.merge``): the reading API of
    ``Capture`` (``cap[name]``, ``cap.calls(name)``, ``list(cap)``, ``inputs``, ``kwargs``, ``grads``,
    ``grad_inputs``, ``param_grads``, ``selected``, ``save``), without a model or hooks."""

    def __init__(self, recording: Recording, *, source: str) -> None:
        super().__init__(recording)
        self.source = source

    def __repr__(self) -> str:
        return f"<hookkit.ReadOnlyCapture ({self.source}) of {len(self)} layer(s) that ran: {', '.join(self.keys())}>"


class NotSaved:
    """Stands, in a loaded capture, where the saved one held a value that a capture file cannot hold: neither a
    tensor, a container hookkit walks, a number, a string, a bool, None, a dtype nor a device (a function, an enum, a
    numpy array...). ``type_name`` and ``text`` (a short repr) say what it was."""

    __slots__ = ("type_name", "text")

    def __init__(self, type_name: str, text: str) -> None:
        self.type_name = type_name
        self.text = text

    def __repr__(self) -> str:
        return f"<hookkit: not saved: a {self.type_name} ({self.text}), which a capture file cannot hold>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NotSaved) and (self.type_name, self.text) == (other.type_name, other.text)

    def __hash__(self) -> int:
        return hash((self.type_name, self.text))


class _Hole:
    """Slot ``index`` of a gradient-input skeleton, while it is written or read."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _safetensors() -> Any:
    """``safetensors.torch`` and ``safe_open``, imported now: safetensors is an optional dependency."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(f"saving and loading captures needs safetensors, which is not installed: {_INSTALL}") \
            from exc
    return safetensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _class_ref(cls: type) -> dict[str, str]:
    return {"module": cls.__module__, "qualname": cls.__qualname__}


def _where(name: str, kind: str, i: int, n: int) -> str:
    what = {"outputs": "the output", "inputs": "an input", "kwargs": "a keyword input", "grads": "a gradient w.r.t. "
            "the output", "grad_inputs": "a gradient w.r.t. an input", "param_grads": "a parameter gradient"}[kind]
    return f"{what} of {name!r}" + (f" (call {i})" if n > 1 else "")


# -- writing: values to JSON nodes ------------------------------------------------------------------------------------
class _Encoder:
    """Turns nested values into JSON nodes. ``tensor(t, key, where)`` gives a tensor's node: the file's tensors
    (``_FileTensors``) or, for ``merge``, a comparable signature (``_signature``)."""

    def __init__(self, tensor: Callable[[torch.Tensor, str, str], Any]) -> None:
        self._tensor = tensor
        self.not_saved: list[str] = []  # where a value was replaced by a NotSaved placeholder

    def encode(self, value: Any, key: str, where: str) -> Any:
        counter = itertools.count()
        return self._node(value, lambda: f"{key}/{next(counter)}", where)

    def _node(self, v: Any, key: Callable[[], str], where: str) -> Any:
        if isinstance(v, torch.Tensor):
            return self._tensor(v, key(), where)
        if isinstance(v, _Hole):
            return {"type": "slot", "index": v.index}
        if v is None or type(v) in (bool, str):
            return v
        if isinstance(v, enum.Enum):
            return self._unsaved(v, where)
        if isinstance(v, np.generic):  # numpy scalars: as the Python number they hold
            item = v.item()
            if isinstance(item, (int, float, complex, str, bytes)):
                return self._node(item, key, where)
            return self._unsaved(v, where)
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"type": "float", "value": repr(float(v))}
        if isinstance(v, str):
            return str(v)
        if isinstance(v, complex):
            return {"type": "complex", "value": [repr(v.real), repr(v.imag)]}
        if isinstance(v, bytes):
            return {"type": "bytes", "value": base64.b64encode(v).decode("ascii")}
        if isinstance(v, torch.dtype):
            return {"type": "dtype", "value": _dtype_name(v)}
        if isinstance(v, torch.device):
            return {"type": "device", "value": str(v)}
        if isinstance(v, torch.Size):
            return {"type": "size", "value": list(v)}
        if isinstance(v, _tree.NotStored):
            return {"type": "not_stored", "class": v.type_name}
        if isinstance(v, NotSaved):
            return {"type": "not_saved", "class": v.type_name, "repr": v.text}
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return {"type": "namedtuple", **_class_ref(type(v)), "fields": list(v._fields),
                    "items": [self._node(x, key, where) for x in v]}
        if isinstance(v, (tuple, list)):
            node: dict[str, Any] = {"type": "tuple" if isinstance(v, tuple) else "list"}
            if type(v) not in (tuple, list):
                node.update(_class_ref(type(v)))
            node["items"] = [self._node(x, key, where) for x in v]
            return node
        if isinstance(v, dict):
            node = {"type": "dict"}
            if type(v) is not dict:
                node.update(_class_ref(type(v)))
            node["items"] = [[self._key(k, where), self._node(x, key, where)] for k, x in v.items()]
            return node
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {"type": "dataclass", **_class_ref(type(v)),
                    "fields": {f.name: self._node(getattr(v, f.name), key, where)
                               for f in dataclasses.fields(v) if hasattr(v, f.name)}}
        return self._unsaved(v, where)

    def _key(self, k: Any, where: str) -> Any:
        if _tree.leaves(k):  # a dict keyed by tensors: the key is not a value hookkit stores
            return self._unsaved(k, where)
        return self._node(k, lambda: "", where)

    def _unsaved(self, v: Any, where: str) -> dict[str, Any]:
        type_name = f"{type(v).__module__}.{type(v).__qualname__}"
        self.not_saved.append(f"{where}: a {type_name}")
        return {"type": "not_saved", "class": type_name, "repr": reprlib.repr(v)}


class _FileTensors:
    """The tensors of one file: each prepared once (contiguous, on the CPU, never sharing memory with another)."""

    def __init__(self, safetensors: Any) -> None:
        self._st = safetensors
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}  # id(tensor) -> key: a tensor stored in several places is written once
        self._storages: set[int] = set()
        self._dtypes_ok: set[torch.dtype] = set()

    def __call__(self, t: torch.Tensor, key: str, where: str) -> dict[str, Any]:
        found = self._keys.get(id(t))
        if found is None:
            while key in self.tensors:
                key += "'"
            self.tensors[key] = self._prepare(t, where)
            self._keys[id(t)] = found = key
        return {"type": "tensor", "key": found, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}

    def _prepare(self, t: torch.Tensor, where: str) -> torch.Tensor:
        if t.layout != torch.strided:
            raise SavedCaptureError(
                f"cannot save {where}: it is a {str(t.layout).removeprefix('torch.')} tensor, and a safetensors file "
                "holds dense tensors only. Leave the layer out, or make the module return a dense tensor "
                "(.to_dense()).")
        if t.device.type == "meta":
            raise SavedCaptureError(f"cannot save {where}: it is a meta tensor, which holds no values.")
        self._check_dtype(t.dtype, where)
        try:
            c = t.detach().to("cpu").contiguous()
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise SavedCaptureError(f"cannot save {where}: its values cannot be copied to the CPU ({exc}).") from exc
        if type(c) is not torch.Tensor:
            c = c.as_subclass(torch.Tensor)
        if c.numel():
            storage = c.untyped_storage().data_ptr()
            if storage in self._storages:  # safetensors refuses tensors that share memory: a copy of its own
                c = c.clone()
                storage = c.untyped_storage().data_ptr()
            self._storages.add(storage)
        return c

    def _check_dtype(self, dtype: torch.dtype, where: str) -> None:
        if dtype in self._dtypes_ok:
            return
        try:
            self._st.torch.save({"probe": torch.zeros(0, dtype=dtype)})
        except Exception as exc:  # safetensors says "not supported" in its own words and types
            raise SavedCaptureError(f"cannot save {where}: safetensors cannot hold a tensor of dtype {dtype} "
                                    f"({exc}). Cast it (capture(..., to=torch.float32)) before saving.") from exc
        self._dtypes_ok.add(dtype)


def _holes(skel: Any) -> Any:
    """A gradient-input skeleton with its slots as ``_Hole`` (which the encoder writes as slot nodes)."""
    return _tree.fill(skel, [_Hole(i) for i in range(count_slots(skel))])


def _manifest(rec: Recording, enc: _Encoder, tensor: Callable[..., Any]) -> dict[str, Any]:
    """The manifest of ``rec``; tensors go through ``tensor`` (``_FileTensors``). Checks every stored tensor that
    was not copied for later in-place edits, as reading it would."""
    layers: dict[str, Any] = {}
    first_name: dict[int, str] = {}  # id(call list) -> the first name of a module captured under several names
    for name, calls in rec.records.items():
        if id(calls) in first_name:
            layers[name] = {"same_as": first_name[id(calls)]}
            continue
        first_name[id(calls)] = name
        n = len(calls)
        entry: dict[str, list[Any]] = {kind: [] for kind in _KINDS}
        for i, call in enumerate(calls):
            where = {kind: _where(name, kind, i, n) for kind in _KINDS}
            check_guards(call.uncopied("output"), where["outputs"])
            entry["outputs"].append(enc.encode(call.output, f"{name}/outputs/{i}", where["outputs"]))
            if rec.want_inputs:
                check_guards(call.in_guards, where["inputs"])
                entry["inputs"].append(enc.encode(call.args, f"{name}/inputs/{i}", where["inputs"]))
                entry["kwargs"].append(enc.encode(call.kwargs, f"{name}/kwargs/{i}", where["kwargs"]))
            if rec.want_grads:
                entry["grads"].append(_grads_node(call, enc, f"{name}/grads/{i}", where["grads"]))
                entry["grad_inputs"].append(_grad_inputs_node(call, enc, f"{name}/grad_inputs/{i}",
                                                              where["grad_inputs"]))
        layers[name] = {"calls": n, **{k: v for k, v in entry.items() if v}}
        if calls and all(c.forward is not None for c in calls):
            layers[name]["forward"] = [c.forward for c in calls]  # which forward of the model: what cap[name] reads
    param_grads = {
        layer: {p: tensor(g, f"{layer}/param_grads/{p}", f"the gradient of parameter {p!r} of {layer!r}")
                for p, g in grads.items()}
        for layer, grads in rec.param_grads.items()
    }
    return {
        "format": _FORMAT, "hookkit": __version__, "torch": torch.__version__,
        "inputs": rec.want_inputs, "grads": rec.want_grads, "wrapped": rec.wrapped,
        "selected": list(rec.selected_names), "order": list(rec.order), "layers": layers,
        "param_grads": param_grads,
    }


def _grads_node(call: Call, enc: _Encoder, key: str, where: str) -> Any:
    if call.grad_out_error:
        return {"error": call.grad_out_error}
    if call.grad_out is None:
        return None
    return {"slots": enc.encode(list(call.grad_out), key, where)}


def _grad_inputs_node(call: Call, enc: _Encoder, key: str, where: str) -> Any:
    if call.grad_in_skel is None and call.grad_in is None and not call.grad_in_error:
        return None
    return {"structure": None if call.grad_in_skel is None else enc.encode(_holes(call.grad_in_skel), key, where),
            "slots": None if call.grad_in is None else enc.encode(list(call.grad_in), key, where),
            "error": call.grad_in_error}


def save(capture: Store, path: str | os.PathLike[str]) -> None:
    """Write ``capture`` to one ``.safetensors`` file at ``path``, atomically.

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> with hookkit.capture(model, ["0", "1"]) as cap:
        ...     _ = model(torch.randn(2, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
        >>> save(cap, path)  # what cap.save(path) does
        >>> torch.equal(hookkit.load(path)["1"], cap["1"])
        True

    The file is written under a temporary name in the same folder, synced, then renamed over ``path``: a file
    already at ``path`` is replaced whole or left as it was, never half-written.

    Args:
        capture: a ``Capture`` (inside or after its block: what it recorded so far) or a ``ReadOnlyCapture``.
        path: the file to write; its folder must exist. Any name works; ``.safetensors`` is the convention.

    Raises:
        SavedCaptureError: the folder does not exist, ``path`` is a folder, a tensor cannot be saved (sparse, meta,
            a dtype safetensors lacks; the message names the layer), or the write failed (the old file stays).
        ModifiedInPlaceError: a stored tensor was changed in place after capture (reading it would say the same).
        ImportError: safetensors is not installed (``pip install 'hookkit[save]'``).
    """
    target = Path(os.fspath(path))
    folder = target.parent
    if not folder.is_dir():
        raise SavedCaptureError(f"cannot save the capture to {str(target)!r}: the folder {str(folder)!r} does not "
                                "exist. Create it first (os.makedirs(folder, exist_ok=True)).")
    if target.is_dir():
        raise SavedCaptureError(f"cannot save the capture to {str(target)!r}: that is a folder; give a file name, "
                                "e.g. os.path.join(folder, 'capture.safetensors').")
    st = _safetensors()
    rec = capture.recording
    files = _FileTensors(st)
    enc = _Encoder(files)
    manifest = _manifest(rec, enc, files)
    if enc.not_saved:
        shown = "; ".join(enc.not_saved[:5]) + ("; ..." if len(enc.not_saved) > 5 else "")
        warnings.warn(f"{len(enc.not_saved)} value(s) in the capture are not tensors, containers, numbers, strings, "
                      f"dtypes or devices, and are saved as hookkit NotSaved placeholders: {shown}", stacklevel=3)
    manifest["sha256"] = {key: _digest(t) for key, t in files.tensors.items()}
    text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
    metadata = {"format": "pt", "hookkit": text, "hookkit.sha256": hashlib.sha256(text.encode()).hexdigest()}
    _write_atomically(st, files.tensors, metadata, target)


def _digest(t: torch.Tensor) -> str:
    """The SHA-256 of a contiguous CPU tensor's bytes, as the file holds them."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"").hexdigest()


def _write_atomically(st: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> None:
    folder = target.parent
    tmp = folder / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's mode, as open() gives
        st.torch.save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDWR)
        try:
            sync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, st.SafetensorError)):
            raise SavedCaptureError(f"could not save the capture to {str(target)!r}: {exc}. Any file that was "
                                    "there before is unchanged.") from exc
        raise
    sync_folder(folder)


# -- reading: JSON nodes back to values -------------------------------------------------------------------------------
class _Malformed(Exception):
    """The manifest does not say what it should; ``load`` reports it with the path."""


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._classes: dict[tuple[str, str], type | None] = {}
        self.fallbacks: set[str] = set()  # classes that could not be imported: their values came back plain

    def value(self, node: Any) -> Any:
        if node is None or type(node) in (bool, int, float, str):
            return node
        if not isinstance(node, dict):
            raise _Malformed(f"a value node is a {type(node).__name__}")
        kind = node["type"]
        if kind == "tensor":
            return self._tensor(node)
        if kind == "slot":
            return _Hole(int(node["index"]))
        if kind == "float":
            return float(node["value"])
        if kind == "complex":
            return complex(float(node["value"][0]), float(node["value"][1]))
        if kind == "bytes":
            return base64.b64decode(node["value"])
        if kind == "dtype":
            dtype = getattr(torch, node["value"], None)
            if not isinstance(dtype, torch.dtype):
                raise _Malformed(f"unknown dtype {node['value']!r}")
            return dtype
        if kind == "device":
            return torch.device(node["value"])
        if kind == "size":
            return torch.Size(int(x) for x in node["value"])
        if kind == "not_stored":
            stand_in = _tree.NotStored.__new__(_tree.NotStored)
            stand_in.type_name = str(node["class"])
            return stand_in
        if kind == "not_saved":
            return NotSaved(str(node["class"]), str(node["repr"]))
        if kind in ("tuple", "list", "namedtuple"):
            return self._sequence(kind, node, [self.value(x) for x in node["items"]])
        if kind == "dict":
            return self._mapping(node, [(self.value(k), self.value(v)) for k, v in node["items"]])
        if kind == "dataclass":
            return self._dataclass(node, {str(k): self.value(v) for k, v in node["fields"].items()})
        raise _Malformed(f"unknown node type {kind!r}")

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        key = node["key"]
        if key not in self._tensors:
            raise _Malformed(f"it names a tensor {key!r} that the file does not hold")
        t = self._tensors[key]
        if _dtype_name(t.dtype) != node["dtype"] or list(t.shape) != list(node["shape"]):
            raise _Malformed(f"tensor {key!r} is {_dtype_name(t.dtype)} {list(t.shape)} in the file but "
                             f"{node['dtype']} {node['shape']} in the manifest")
        return t

    def _class(self, node: dict[str, Any], accept: Callable[[type], bool]) -> type | None:
        if "module" not in node:
            return None
        ref = (str(node["module"]), str(node["qualname"]))
        if ref not in self._classes:
            self._classes[ref] = _import_class(*ref)
        cls = self._classes[ref]
        if cls is None or not accept(cls):
            self.fallbacks.add(".".join(ref))
            return None
        return cls

    def _fallback(self, node: dict[str, Any]) -> None:
        self.fallbacks.add(f"{node['module']}.{node['qualname']}")

    def _sequence(self, kind: str, node: dict[str, Any], items: list[Any]) -> Any:
        base: type = list if kind == "list" else tuple
        if kind == "namedtuple":
            fields = tuple(node["fields"])
            cls = self._class(node, lambda c: issubclass(c, tuple) and tuple(getattr(c, "_fields", ())) == fields)
        else:
            cls = self._class(node, lambda c: issubclass(c, base))
        if cls is None:
            return base(items)
        try:
            return cls(*items) if kind == "namedtuple" else cls(items)
        except Exception:  # the class's constructor wants something else: a plain container, said so
            self._fallback(node)
            return base(items)

    def _mapping(self, node: dict[str, Any], items: list[tuple[Any, Any]]) -> Any:
        cls: Any = self._class(node, lambda c: issubclass(c, dict))
        if cls is None:
            return dict(items)
        try:  # as copy.copy builds one (and so _tree.map_leaves): no __init__, then the items (ModelOutput too)
            obj = cls.__new__(cls)
            for k, v in items:
                obj[k] = v
            return obj
        except Exception:
            self._fallback(node)
            return dict(items)

    def _dataclass(self, node: dict[str, Any], fields: dict[str, Any]) -> Any:
        cls: Any = self._class(node, lambda c: dataclasses.is_dataclass(c)
                          and set(fields) <= {f.name for f in dataclasses.fields(c)})
        if cls is None:
            return fields
        try:  # no __init__ / __post_init__: the saved values as they were
            obj = cls.__new__(cls)
            for k, v in fields.items():
                object.__setattr__(obj, k, v)
            return obj
        except Exception:
            self._fallback(node)
            return fields


def _import_class(module: str, qualname: str) -> type | None:
    """The class ``module.qualname``, imported; None where it cannot be (a class defined inside a function, a module
    that is not installed here)."""
    if "<locals>" in qualname:
        return None
    try:
        obj: Any = importlib.import_module(module)
    except Exception:  # not installed, or failing to import here
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _skeleton(structure: Any) -> tuple[Any, int]:
    """A ``_tree.skeleton`` (and its number of slots) from a decoded structure whose slots are ``_Hole``: slots are
    numbered depth-first, as ``skeleton`` numbered them when the call was recorded."""
    seen: list[int] = []

    def place(hole: _Hole) -> torch.Tensor:
        seen.append(hole.index)
        return torch.empty(0)

    placeholders = _tree.map_leaves(place, structure, leaf_type=_Hole)
    if seen != list(range(len(seen))):
        raise _Malformed(f"a gradient-input structure has slots {seen}, expected 0..{len(seen) - 1}")
    return _tree.skeleton(placeholders), len(seen)


def _rebuild(manifest: dict[str, Any], dec: _Decoder) -> Recording:
    want_inputs, want_grads = bool(manifest["inputs"]), bool(manifest["grads"])
    layers = manifest["layers"]
    records: dict[str, list[Call]] = {}
    for name, entry in layers.items():
        if "same_as" in entry:
            continue
        calls: list[Call] = []
        forwards = _forwards(entry)
        for i in range(int(entry["calls"])):
            call = Call(dec.value(entry["outputs"][i]), None, forwards[i])
            if want_inputs:
                call.args = dec.value(entry["inputs"][i])
                call.kwargs = dec.value(entry["kwargs"][i])
            if want_grads:
                _rebuild_grads(call, entry["grads"][i], entry["grad_inputs"][i], dec)
            calls.append(call)
        records[name] = calls
    for name, entry in layers.items():
        if "same_as" in entry:
            records[name] = records[entry["same_as"]]
    order = [str(n) for n in manifest["order"]]
    selected = [str(n) for n in manifest["selected"]]
    missing = [n for n in order + selected if n not in layers]
    if missing:
        raise _Malformed(f"layer {missing[0]!r} is listed but has no entry")
    param_grads = {str(layer): {str(p): dec.value(g) for p, g in grads.items()}
                   for layer, grads in manifest["param_grads"].items()}
    return Recording.from_calls({name: records[name] for name in layers}, order=order, selected_names=selected,
                                want_inputs=want_inputs, want_grads=want_grads, wrapped=bool(manifest["wrapped"]),
                                param_grads=param_grads)


def _forwards(entry: dict[str, Any]) -> list[int | None]:
    """Each call's forward (``"forward"``; a file written before hookkit kept it has none: each call is its own)."""
    n = int(entry["calls"])
    found = entry.get("forward")
    if found is None:
        return [None] * n
    if (not isinstance(found, list) or len(found) != n
            or not all(type(f) is int for f in found) or found != sorted(found)):
        raise _Malformed(f"a layer's \"forward\" is not {n} ascending whole numbers")
    return list(found)


def _rebuild_grads(call: Call, grads: Any, grad_inputs: Any, dec: _Decoder) -> None:
    if grads is not None:
        if "error" in grads:
            call.grad_out_error = str(grads["error"])
        else:
            call.grad_out = list(dec.value(grads["slots"]))
    if grad_inputs is not None:
        slots = None if grad_inputs["slots"] is None else list(dec.value(grad_inputs["slots"]))
        if grad_inputs["structure"] is not None:
            call.grad_in_skel, n = _skeleton(dec.value(grad_inputs["structure"]))
            if slots is not None and len(slots) != n:
                raise _Malformed(f"a gradient-input structure has {n} slots but {len(slots)} values")
        call.grad_in = slots
        if grad_inputs["error"]:
            call.grad_in_error = str(grad_inputs["error"])


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True) -> ReadOnlyCapture:
    """Read a capture that ``Capture.save`` wrote: the same reading API, no model needed.

    Example:
        >>> import os, tempfile, torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> with hookkit.capture(model, ["0", "1"], inputs=True) as cap:
        ...     _ = model(torch.randn(2, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
        >>> cap.save(path)
        >>> loaded = hookkit.load(path)
        >>> list(loaded), loaded["0"].shape, torch.equal(loaded.inputs["0"], cap.inputs["0"])
        (['0', '1'], torch.Size([2, 8]), True)

    Nested values come back as their classes (namedtuples, dataclasses, dicts such as ``ModelOutput``), imported
    by module and name; where a class cannot be imported here, its values come back as plain tuples / dicts, with a
    warning that names it. Tensors come back contiguous (the strides of views are not kept), without autograd
    history; a tensor that was stored in several places comes back as one tensor in those places.

    Args:
        path: a file written by ``Capture.save`` (or ``ReadOnlyCapture.save``).
        device: where to put the tensors (default ``"cpu"``).
        verify: check each tensor's bytes against the SHA-256 the manifest holds (about 1.8 GB/s on one core), so
            a flipped bit in the data is an error rather than a wrong number. ``False`` skips it for a file you
            trust; the manifest's own checksum is always checked.

    Returns:
        A ``ReadOnlyCapture``: ``cap[name]``, ``cap.calls(name)``, ``list(cap)``, ``cap.inputs``, ``cap.kwargs``,
        ``cap.grads``, ``cap.grad_inputs``, ``cap.param_grads``.

    Raises:
        SavedCaptureError: no such file, not a safetensors file, truncated or corrupted (in its header, its manifest
            or a tensor's bytes), a safetensors file without a hookkit manifest, or one written by a newer hookkit;
            the message names the path (and the tensor).
        ImportError: safetensors is not installed (``pip install 'hookkit[save]'``).
    """
    shown = repr(str(os.fspath(path)))
    file = Path(os.fspath(path))
    if not file.exists():
        raise SavedCaptureError(f"cannot load a capture from {shown}: no such file.")
    if file.is_dir():
        raise SavedCaptureError(f"cannot load a capture from {shown}: that is a folder, not a file.")
    st = _safetensors()
    target = torch.device(device)
    try:  # checked on the CPU, where the bytes are, then moved
        with st.safe_open(str(file), framework="pt", device="cpu" if verify else str(target)) as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            manifest = _read_manifest(metadata, shown, len(keys))
            tensors = {key: f.get_tensor(key) for key in keys}
    except (st.SafetensorError, OSError, UnicodeDecodeError) as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: it is not a readable safetensors file; it is "
                                f"truncated, corrupted, or of another format (safetensors says: {exc}).") from exc
    if verify:
        _check_digests(manifest, tensors, shown)
        if target.type != "cpu":
            tensors = {key: t.to(target) for key, t in tensors.items()}
    dec = _Decoder(tensors)
    try:
        rec = _rebuild(manifest, dec)
    except (_Malformed, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest does not fit the file "
                                f"({type(exc).__name__}: {exc}); the file is corrupted.") from exc
    if dec.fallbacks:
        warnings.warn(f"hookkit.load({shown}): could not import {', '.join(sorted(dec.fallbacks))}, so values of "
                      "those classes come back as plain tuples / dicts (import the module that defines them, or "
                      "install it, to get them back as they were saved).", stacklevel=2)
    return ReadOnlyCapture(rec, source=f"loaded from {shown}")


def _check_digests(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], shown: str) -> None:
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        raise SavedCaptureError(f"cannot load a capture from {shown}: its manifest's checksums do not list the "
                                f"file's {len(tensors)} tensor(s); the file is corrupted.")
    bad = [key for key, t in tensors.items() if _digest(t) != digests[key]]
    if bad:
        shown_keys = ", ".join(repr(k) for k in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise SavedCaptureError(
            f"cannot load a capture from {shown}: the bytes of {len(bad)} of its {len(tensors)} tensor(s) do not "
            f"match their SHA-256 in the manifest ({shown_keys}); the file's data is corrupted. Save the capture "
            "again, or load(..., verify=False) to read it as it is.")


def _read_manifest(metadata: dict[str, str], shown: str, n_tensors: int) -> dict[str, Any]:
    if "hookkit" not in metadata:
        raise SavedCaptureError(
            f"cannot load a capture from {shown}: it is a safetensors file ({n_tensors} tensor(s)) without a hookkit "
            "manifest, so it was not written by Capture.save. Read its tensors with safetensors.torch.load_file.")
    text = metadata["hookkit"]
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest is not valid JSON "
                                f"({exc}); the file is corrupted.") from exc
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest has no format version; "
                                "the file is corrupted.")
    if version > _FORMAT:
        raise SavedCaptureError(
            f"cannot load a capture from {shown}: it was written by a newer hookkit ({manifest.get('hookkit')}, "
            f"capture format {version}); this hookkit ({__version__}) reads format {_FORMAT} and older. Upgrade "
            "hookkit: pip install -U hookkit.")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("hookkit.sha256") or metadata.get("format") != "pt":
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest does not match its "
                                "checksum (or its metadata was changed); the file is corrupted.")
    return manifest


# -- merging ----------------------------------------------------------------------------------------------------------
def _signature(t: torch.Tensor, key: str, where: str) -> dict[str, Any]:
    return {"type": "tensor", "dtype": _dtype_name(t.dtype), "ndim": t.dim()}


def _describe(node: Any) -> str:
    if isinstance(node, dict) and "type" in node:
        kind = node["type"]
        if kind == "tensor":
            return f"a {node['dtype']} tensor of {node['ndim']} dim(s)"
        name = node.get("qualname", kind)
        if "items" in node:
            return f"a {name} of {len(node['items'])} item(s)"
        if "fields" in node:
            return f"a {name} with fields {sorted(node['fields'])}"
        return f"a {kind} {node.get('value', node.get('class', ''))}"
    return "None" if node is None else repr(node)


def _difference(a: Any, b: Any, path: str) -> str | None:
    """Where two signatures first differ, in words; None when they are equal."""
    if a == b:
        return None
    same_container = (isinstance(a, dict) and isinstance(b, dict) and a.get("type") == b.get("type")
                      and a.get("qualname") == b.get("qualname")
                      and a.get("type") in ("tuple", "list", "namedtuple", "dict", "dataclass"))
    if same_container and a["type"] == "dataclass" and list(a["fields"]) == list(b["fields"]):
        for k in a["fields"]:
            found = _difference(a["fields"][k], b["fields"][k], f"{path}.{k}")
            if found:
                return found
    elif same_container and "items" in a and len(a["items"]) == len(b["items"]):
        for i, (x, y) in enumerate(zip(a["items"], b["items"], strict=True)):
            if a["type"] == "dict":
                if x[0] != y[0]:
                    return f"{path}: key {_describe(x[0])} vs {_describe(y[0])}"
                found = _difference(x[1], y[1], f"{path}[{_describe(x[0])}]")
            else:
                found = _difference(x, y, f"{path}[{i}]")
            if found:
                return found
    return f"{path}: {_describe(a)} vs {_describe(b)}"


def _call_values(rec: Recording, call: Call) -> dict[str, Any]:
    """The parts of one call to compare and join: values holding tensors, and what is kept from the first."""
    values: dict[str, Any] = {"outputs": call.output}
    if rec.want_inputs:
        values["inputs"], values["kwargs"] = call.args, call.kwargs
    if rec.want_grads:
        values["grads"] = call.grad_out
        values["grads error"] = call.grad_out_error
        values["grad_inputs"] = call.grad_in
        values["grad_inputs structure"] = None if call.grad_in_skel is None else _holes(call.grad_in_skel)
        values["grad_inputs error"] = call.grad_in_error
    return values


def _join(values: list[Any], dim: int, where: str) -> Any:
    per_value = [_tree.leaves(v) for v in values]
    joined = []
    for i, tensors in enumerate(zip(*per_value, strict=True)):
        try:
            joined.append(torch.cat(tensors, dim=dim))
        except (RuntimeError, IndexError) as exc:
            raise ValueError(f"hookkit.merge: cannot concatenate tensor {i} of {where} along dim={dim}: "
                             f"{exc}") from exc
    return _tree.fill(_tree.skeleton(values[0]), joined)


def merge(captures: Iterable[Store], *, dim: int = 0) -> ReadOnlyCapture:
    """Join captures of several batches (or runs) into one: every call's tensors concatenated along ``dim``.

    Example:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
        >>> caps = []
        >>> for batch in torch.randn(3, 2, 4):  # three batches of 2
        ...     with hookkit.capture(model, ["0", "1"]) as cap:
        ...         _ = model(batch)
        ...     caps.append(cap)
        >>> merged = hookkit.merge(caps)
        >>> merged["1"].shape
        torch.Size([6, 8])

    The captures must have the same layers, each run as often, with values of the same structure (the same
    containers, tensors of the same dtypes in the same places, equal non-tensor values); the result has the first
    capture's non-tensor values. Gradients are concatenated like values (a per-batch mean loss stays per batch).
    ``param_grads`` are not per sample, so they are left out (with a warning): add them up yourself if that is what
    your loss means. Typical use: ``hookkit.merge(caps).save(path)``.

    Args:
        captures: ``Capture`` objects (live) and ``ReadOnlyCapture`` objects (loaded or merged), in batch order.
        dim: the batch dimension (default 0); ``concat_calls`` joins the calls of one layer instead.

    Returns:
        A ``ReadOnlyCapture`` with the reading API of ``Capture``.

    Raises:
        ValueError: no captures, or captures that differ (the message names the first layer and call that does).
        TypeError: an item is not a capture.
        ModifiedInPlaceError: a stored tensor was changed in place after capture.
    """
    caps = list(captures)
    if not caps:
        raise ValueError("hookkit.merge needs at least one capture.")
    for i, c in enumerate(caps):
        if not isinstance(c, Recorded):
            raise TypeError(f"hookkit.merge: item {i} is a {type(c).__name__}, not a capture (hookkit.capture(...) "
                            "or hookkit.load(...)).")
    recs = [c.recording for c in caps]
    first = recs[0]
    for j, rec in enumerate(recs[1:], 1):
        for flag, what in (("want_inputs", "inputs"), ("want_grads", "grads")):
            if getattr(rec, flag) != getattr(first, flag):
                raise ValueError(f"hookkit.merge: capture {j} was made with {what}={getattr(rec, flag)}, capture 0 "
                                 f"with {what}={getattr(first, flag)}.")
        if rec.order != first.order:
            k = next(k for k in range(max(len(rec.order), len(first.order)))
                     if k >= len(rec.order) or k >= len(first.order) or rec.order[k] != first.order[k])
            a = repr(first.order[k]) if k < len(first.order) else "nothing"
            b = repr(rec.order[k]) if k < len(rec.order) else "nothing"
            raise ValueError(f"hookkit.merge: capture {j} has other layers than capture 0: layer {k} (in order of "
                             f"first call) is {b} there and {a} in capture 0.")
    if any(rec.param_grads for rec in recs):
        warnings.warn("hookkit.merge leaves param_grads out: a parameter's gradient is not per sample, so it cannot "
                      "be concatenated along the batch dimension; add the captures' param_grads up yourself if your "
                      "loss was a sum.", stacklevel=2)
    done: dict[int, list[Call]] = {}  # a module captured under several names keeps one list of calls
    records: dict[str, list[Call]] = {}
    for name, calls in first.records.items():
        if id(calls) not in done:
            done[id(calls)] = _merge_layer(name, [rec.records.get(name, []) for rec in recs], recs, dim)
        records[name] = done[id(calls)]
    merged = Recording.from_calls(records, order=list(first.order), selected_names=list(first.selected_names),
                                  want_inputs=first.want_inputs, want_grads=first.want_grads,
                                  wrapped=any(r.wrapped for r in recs))
    return ReadOnlyCapture(merged, source=f"merged from {len(caps)} captures")


def _merge_layer(name: str, per_capture: list[list[Call]], recs: list[Recording], dim: int) -> list[Call]:
    n = len(per_capture[0])
    for j, calls in enumerate(per_capture[1:], 1):
        if len(calls) != n:
            raise ValueError(f"hookkit.merge: {name!r} ran {n} time(s) in capture 0 but {len(calls)} time(s) in "
                             f"capture {j}; merge joins captures call by call.")
    merged: list[Call] = []
    enc = _Encoder(_signature)
    for i in range(n):
        parts = []
        for rec, calls in zip(recs, per_capture, strict=True):
            call = calls[i]
            check_guards(call.uncopied("output"), _where(name, "outputs", i, n))
            if rec.want_inputs:
                check_guards(call.in_guards, _where(name, "inputs", i, n))
            parts.append(_call_values(rec, call))
        signatures = [{k: enc.encode(v, "", "") for k, v in p.items()} for p in parts]
        for j, sig in enumerate(signatures[1:], 1):
            for field, node in signatures[0].items():
                found = _difference(node, sig[field], "")
                if found:
                    raise ValueError(f"hookkit.merge: capture {j} differs from capture 0 at {name!r} call {i}, in "
                                     f"{field}{found}.")
        source = per_capture[0][i]
        call = Call(_join([p["outputs"] for p in parts], dim, _where(name, "outputs", i, n)), None, source.forward)
        if recs[0].want_inputs:
            call.args = _join([p["inputs"] for p in parts], dim, _where(name, "inputs", i, n))
            call.kwargs = _join([p["kwargs"] for p in parts], dim, _where(name, "kwargs", i, n))
        if recs[0].want_grads:
            if source.grad_out is not None:
                call.grad_out = _join([p["grads"] for p in parts], dim, _where(name, "grads", i, n))
            if source.grad_in is not None:
                call.grad_in = _join([p["grad_inputs"] for p in parts], dim, _where(name, "grad_inputs", i, n))
            call.grad_in_skel = source.grad_in_skel
            call.grad_out_error = source.grad_out_error
            call.grad_in_error = source.grad_in_error
        merged.append(call)
    return merged
