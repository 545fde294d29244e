"""Captures on disk and merged: ``Capture.save(path)`` writes one ``.safetensors`` file, ``load(path)`` reads it back
as a ``ReadOnlyCapture``, and ``merge(captures)`` joins captures of several batches into one.

The seams: a capture's stores (``record.capture.Store``) read a ``Recording`` of ``Call`` records (``core.engine``).
Saving walks that recording (nested values through ``core.tree``, in-place edits checked through
``core.snapshot.check_guards``, as a read would), and loading and merging build a new ``Recording`` of ``Call`` records
that the very same stores read: a loaded capture answers ``cap[name]``, ``cap.calls(name)``, ``cap.inputs`` ... exactly
as the live one did.

The file: the tensors, contiguous and on the CPU, under keys ``"<layer>/<kind>/<call>/<i>"`` (one key for a tensor
stored in several places), and in the safetensors header's metadata, under ``"hookkit"``, a JSON manifest
(``_FORMAT``; its SHA-256 under ``"hookkit.sha256"``) that holds the SHA-256 of each tensor's bytes (``"sha256"``:
key -> hex digest; safetensors itself checks no data) and, per layer and kind, each call's nested structure:
containers as ``{"type": "tuple" | "list" | "namedtuple" | "dict" | "dataclass", ...}`` (with ``"module"`` and
``"qualname"`` of their class where it is not a plain tuple, list or dict), tensors as ``{"type": "tensor", "key",
"dtype", "shape"}``, and numbers, strings, booleans and None as themselves; per layer, ``"forward"`` holds the number
of the model's forward each call ran in (what ``cap[name]`` reads: the first call of the last forward). safetensors is
optional (``pip install 'hookkit[save]'``): it is imported only when a capture is saved or loaded.

A file to load is untrusted input: ``record.manifest`` bounds the manifest's nesting before it is parsed and checks
every node before anything is built from it (``save`` runs the same check, so it never writes what ``load`` refuses),
and ``record.classes`` rebuilds the classes it names without importing a module or running a class's code.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import itertools
import json
import math
import os
import reprlib
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hookkit._errors import ArgumentError, ArgumentTypeError, SavedCaptureError
from hookkit._version import __version__
from hookkit.core import check as _check
from hookkit.core import tree as _tree
from hookkit.core.engine import Call, Recording, count_slots
from hookkit.core.fs import replace_file
from hookkit.core.snapshot import check_guards
from hookkit.record.capture import Recorded, Store
from hookkit.record.classes import Classes
from hookkit.record.manifest import DTYPES, Malformed, TooLarge, check, parse, tensors_in

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
    """Slot ``index`` of a gradient-input skeleton, while it is written."""

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
    try:  # what load checks, so that every file save writes loads
        check(manifest)
    except TooLarge as exc:
        raise SavedCaptureError(f"cannot save the capture to {str(target)!r}: it holds what a capture file does not "
                                f"({exc}); leave that layer out. Nothing was written.") from None
    text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
    metadata = {"format": "pt", "hookkit": text, "hookkit.sha256": hashlib.sha256(text.encode()).hexdigest()}
    _write_atomically(st, files.tensors, metadata, target)


def _digest(t: torch.Tensor) -> str:
    """The SHA-256 of a contiguous CPU tensor's bytes, as the file holds them."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"").hexdigest()


def _write_atomically(st: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> None:
    try:
        replace_file(target, lambda tmp: st.torch.save_file(tensors, str(tmp), metadata=metadata))
    except (OSError, st.SafetensorError) as exc:
        raise SavedCaptureError(f"could not save the capture to {str(target)!r}: {exc}. Any file that was "
                                "there before is unchanged.") from exc


# -- reading: JSON nodes back to values -------------------------------------------------------------------------------
class _Decoder:
    """Builds values from manifest nodes that ``record.manifest.check`` passed: their types are right, so what is left
    to check depends on the tensors (a key the file holds, its dtype and shape) and on the values built."""

    def __init__(self, tensors: dict[str, torch.Tensor], classes: Classes) -> None:
        self._tensors = tensors
        self.classes = classes
        self.slots: list[int] = []  # the indices of the slots decoded, in order (gradient-input structures)

    def value(self, node: Any) -> Any:
        if not isinstance(node, dict):
            return node  # null, a boolean, a number or a string
        kind = node["type"]
        if kind == "tensor":
            return self._tensor(node)
        if kind == "slot":
            self.slots.append(node["index"])
            return _tree.slot(node["index"])
        if kind == "float":
            return float(node["value"])
        if kind == "complex":
            return complex(float(node["value"][0]), float(node["value"][1]))
        if kind == "bytes":
            try:
                return base64.b64decode(node["value"], validate=True)
            except ValueError as exc:  # binascii.Error
                raise Malformed("", f"a bytes node holds no base64 ({exc})") from None
        if kind == "dtype":
            return DTYPES[node["value"]]
        if kind == "device":
            return torch.device(node["value"])
        if kind == "size":
            return torch.Size(node["value"])
        if kind == "not_stored":
            stand_in = _tree.NotStored.__new__(_tree.NotStored)
            stand_in.type_name = node["class"]
            return stand_in
        if kind == "not_saved":
            return NotSaved(node["class"], node["repr"])
        module, qualname = node.get("module"), node.get("qualname", "")
        if kind == "dataclass":
            fields = {k: self.value(v) for k, v in node["fields"].items()}
            return self.classes.dataclass(node["module"], qualname, fields)
        if kind == "dict":
            items = [(self._key(k), self.value(v)) for k, v in node["items"]]
            return dict(items) if module is None else self.classes.mapping(module, qualname, items)
        items = [self.value(x) for x in node["items"]]
        if kind == "namedtuple":
            return self.classes.namedtuple(node["module"], qualname, node["fields"], items)
        base = tuple if kind == "tuple" else list
        return base(items) if module is None else self.classes.sequence(module, qualname, base, items)

    def _key(self, node: Any) -> Any:
        key = self.value(node)
        try:
            hash(key)
        except TypeError:
            raise Malformed("", f"a dict key is a {type(key).__name__}, which cannot be a key") from None
        return key

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        key = node["key"]
        if key not in self._tensors:
            raise Malformed("", f"it names a tensor {key!r} that the file does not hold")
        t = self._tensors[key]
        if _dtype_name(t.dtype) != node["dtype"] or list(t.shape) != node["shape"]:
            raise Malformed("", f"tensor {key!r} is {_dtype_name(t.dtype)} {list(t.shape)} in the file but "
                                f"{node['dtype']} {node['shape']} in the manifest")
        return t


def _skeleton(node: Any, dec: _Decoder) -> tuple[Any, int]:
    """A ``core.tree.skeleton`` (and its number of slots) decoded from a structure node, whose slots must be numbered
    depth-first, as ``skeleton`` numbered them when the call was recorded (``core.tree`` walks in the order of the
    node's items). Built directly: walking it with ``core.tree`` would call its classes' constructors."""
    dec.slots.clear()
    skel = dec.value(node)
    seen = list(dec.slots)
    if seen != list(range(len(seen))):
        shown = reprlib.repr(seen)
        raise Malformed("", f"a gradient-input structure has slots {shown}, expected 0..{len(seen) - 1}")
    return skel, len(seen)


def _rebuild(manifest: dict[str, Any], dec: _Decoder) -> Recording:
    """The recording a checked manifest describes (``record.manifest.check`` passed it)."""
    want_inputs, want_grads = manifest["inputs"], manifest["grads"]
    layers = manifest["layers"]
    records: dict[str, list[Call]] = {}
    for name, entry in layers.items():
        if "same_as" in entry:
            continue
        calls: list[Call] = []
        forwards = _forwards(entry)
        for i in range(entry["calls"]):
            call = Call(dec.value(entry["outputs"][i]), None, forwards[i])
            if want_inputs:
                call.args = dec.value(entry["inputs"][i])
                call.kwargs = dec.value(entry["kwargs"][i])
            if want_grads:
                _rebuild_grads(call, entry["grads"][i], entry["grad_inputs"][i], dec)
                n = tensors_in(entry["outputs"][i])
                if call.grad_out is not None and len(call.grad_out) < n:
                    raise Malformed("", f"layer {name!r} call {i} has {len(call.grad_out)} gradient slot(s) for an "
                                        f"output of {n} tensor(s)")
            calls.append(call)
        records[name] = calls
    for name, entry in layers.items():
        if "same_as" in entry:
            records[name] = records[entry["same_as"]]
    param_grads = {layer: {p: dec.value(g) for p, g in grads.items()}
                   for layer, grads in manifest["param_grads"].items()}
    return Recording.from_calls({name: records[name] for name in layers}, order=list(manifest["order"]),
                                selected_names=list(manifest["selected"]), want_inputs=want_inputs,
                                want_grads=want_grads, wrapped=manifest["wrapped"], param_grads=param_grads)


def _forwards(entry: dict[str, Any]) -> list[int | None]:
    """Each call's forward (``"forward"``; a file written before hookkit kept it has none: each call is its own)."""
    found = entry.get("forward")  # checked by _manifest.check
    return [None] * entry["calls"] if found is None else list(found)


def _rebuild_grads(call: Call, grads: Any, grad_inputs: Any, dec: _Decoder) -> None:
    if grads is not None:
        if "error" in grads:
            call.grad_out_error = grads["error"]
        else:
            call.grad_out = dec.value(grads["slots"])
    if grad_inputs is not None:
        slots = None if grad_inputs["slots"] is None else dec.value(grad_inputs["slots"])
        if grad_inputs["structure"] is not None:
            call.grad_in_skel, n = _skeleton(grad_inputs["structure"], dec)
            if slots is not None and len(slots) != n:
                raise Malformed("", f"a gradient-input structure has {n} slots but {len(slots)} values")
        call.grad_in = slots
        if grad_inputs["error"]:
            call.grad_in_error = grad_inputs["error"]


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True,
         classes: Iterable[type] = ()) -> ReadOnlyCapture:
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

    Loading a file runs no code that the file names: it imports no module and calls no class's constructor. Nested
    values come back as their classes (namedtuples, dataclasses, dicts such as ``ModelOutput``, ``torch.return_types``)
    when the class is in ``classes`` or its module is already imported (in ``sys.modules``), and it is of the kind
    the file says (a namedtuple with those fields, a dataclass...); the instance is made without running the class's
    own ``__new__``, ``__init__`` or ``__setitem__``. Otherwise its values come back as plain tuples / lists / dicts,
    with a warning that names the class and why. Tensors come back contiguous (the strides of views are not kept),
    without autograd history; a tensor that was stored in several places comes back as one tensor in those places.

    Args:
        path: a file written by ``Capture.save`` (or ``ReadOnlyCapture.save``).
        device: where to put the tensors (default ``"cpu"``; ``"meta"`` gives shapes and dtypes without values).
        verify: check each tensor's bytes against the SHA-256 the manifest holds (about 1.8 GB/s on one core), so
            a flipped bit in the data is an error rather than a wrong number. ``False`` skips it for a file you
            trust; the manifest's own checksum is always checked.
        classes: classes to rebuild even where their module is not imported (a class defined inside a function,
            too): ``load(path, classes=[MyOutput])``. Matched by module and qualified name.

    Returns:
        A ``ReadOnlyCapture``: ``cap[name]``, ``cap.calls(name)``, ``list(cap)``, ``cap.inputs``, ``cap.kwargs``,
        ``cap.grads``, ``cap.grad_inputs``, ``cap.param_grads``.

    Raises:
        SavedCaptureError: no such file, not a safetensors file, truncated or corrupted (in its header, its manifest
            or a tensor's bytes), a manifest that is not what ``save`` writes (nested too deep, a node of the wrong
            type: the message says where), a safetensors file without a hookkit manifest, or one written by a newer
            hookkit; the message names the path (and the tensor). Nothing is built before the manifest is checked.
        ArgumentError: ``device`` is not a device, or not one this machine has.
        ArgumentTypeError: ``path``, ``device``, ``verify`` or ``classes`` is of a type ``load`` does not take.
        ImportError: safetensors is not installed (``pip install 'hookkit[save]'``).
    """
    file, shown = _load_path(path)
    target = _load_device(device)
    if not isinstance(verify, bool):
        raise ArgumentTypeError(f"hookkit.load: verify must be True or False, got {type(verify).__name__} "
                                f"{verify!r}.")
    allowed = _load_classes(classes)
    if not file.exists():
        raise SavedCaptureError(f"cannot load a capture from {shown}: no such file.")
    if file.is_dir():
        raise SavedCaptureError(f"cannot load a capture from {shown}: that is a folder, not a file.")
    st = _safetensors()
    try:  # read and checked on the CPU, where the bytes are, then moved
        with st.safe_open(str(file), framework="pt", device="cpu") as f:
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
    dec = _Decoder(tensors, Classes(allowed))
    try:
        rec = _rebuild(manifest, dec)
    except Malformed as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest does not fit the file "
                                f"({exc}); the file is corrupted.") from None
    refused = dec.classes.refused
    if refused:
        shown_classes = "; ".join(f"{name} ({'; '.join(why)})" for name, why in sorted(refused.items()))
        warnings.warn(f"hookkit.load({shown}): values of {len(refused)} class(es) come back as plain tuples / lists "
                      f"/ dicts: {shown_classes}. To get them back as they were saved, import the module that "
                      "defines a class before loading, or pass the class: hookkit.load(path, classes=[...]).",
                      stacklevel=2)
    return ReadOnlyCapture(rec, source=f"loaded from {shown}")


def _load_path(path: Any) -> tuple[Path, str]:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"hookkit.load: path must be a file name (a str or a pathlib.Path), got "
                                f"{type(path).__name__} {reprlib.repr(path)}.")
    name = os.fspath(path)
    if not isinstance(name, str):
        raise ArgumentTypeError(f"hookkit.load: path must be a file name as text, got {type(name).__name__} "
                                f"{reprlib.repr(name)}; decode it first (os.fsdecode).")
    return Path(name), repr(name)


def _load_device(device: Any) -> torch.device:
    """``device`` as a torch.device this machine has, checked before the file is read."""
    if not isinstance(device, (str, torch.device)):
        raise ArgumentTypeError(f"hookkit.load: device must be a str or a torch.device, got {type(device).__name__} "
                                f"{reprlib.repr(device)}.")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ArgumentError(f"hookkit.load: device={device!r} is not a device ({exc}); give one such as 'cpu', "
                            "'cuda', 'cuda:1' or 'meta'.") from None
    if target.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=target)
        except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
            raise ArgumentError(f"hookkit.load: device={device!r} cannot hold tensors on this machine ({exc}); "
                                "load on 'cpu' (the default), or on a device it has.") from None
    return target


def _load_classes(classes: Any) -> list[type]:
    if isinstance(classes, (str, bytes, type)) or not isinstance(classes, Iterable):
        raise ArgumentTypeError(f"hookkit.load: classes must be a list of classes (classes=[MyOutput]), got "
                                f"{type(classes).__name__} {reprlib.repr(classes)}.")
    found = list(classes)
    for i, cls in enumerate(found):
        if not isinstance(cls, type):
            raise ArgumentTypeError(f"hookkit.load: classes must hold classes, but item {i} is a "
                                    f"{type(cls).__name__} {reprlib.repr(cls)}; pass the class itself "
                                    "(classes=[MyOutput]), not its name or an instance.")
    return found


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
        manifest = parse(text)
    except Malformed as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest {exc}; the file is "
                                "corrupted.") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest has no format version; "
                                "the file is corrupted.")
    if version > _FORMAT:
        raise SavedCaptureError(
            f"cannot load a capture from {shown}: it was written by a newer hookkit "
            f"({str(manifest.get('hookkit'))[:40]}, "
            f"capture format {version}); this hookkit ({__version__}) reads format {_FORMAT} and older. Upgrade "
            "hookkit: pip install -U hookkit.")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("hookkit.sha256") or metadata.get("format") != "pt":
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest does not match its "
                                "checksum (or its metadata was changed); the file is corrupted.")
    try:
        check(manifest)
    except Malformed as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest is not what "
                                f"Capture.save writes ({exc}); the file is corrupted or was made by hand.") from None
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
            raise ArgumentError(f"hookkit.merge: cannot concatenate tensor {i} of {where} along dim={dim}: "
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
    if not isinstance(captures, Iterable) or isinstance(captures, (str, bytes, Recorded)):
        raise ArgumentTypeError(f"hookkit.merge: captures= takes a list of captures, got {_check.shown(captures)}.")
    _check.whole("hookkit.merge", "dim", dim)
    caps = list(captures)
    if not caps:
        raise ArgumentError("hookkit.merge: captures= is empty; it needs at least one capture.")
    for i, c in enumerate(caps):
        if not isinstance(c, Recorded):
            raise ArgumentTypeError(f"hookkit.merge: captures item {i} is a {type(c).__name__}, not a capture "
                                    "(hookkit.capture(...) or hookkit.load(...)).")
    recs = [c.recording for c in caps]
    first = recs[0]
    for j, rec in enumerate(recs[1:], 1):
        for flag, what in (("want_inputs", "inputs"), ("want_grads", "grads")):
            if getattr(rec, flag) != getattr(first, flag):
                raise ArgumentError(f"hookkit.merge: capture {j} was made with {what}={getattr(rec, flag)}, capture 0 "
                                    f"with {what}={getattr(first, flag)}.")
        if rec.order != first.order:
            k = next(k for k in range(max(len(rec.order), len(first.order)))
                     if k >= len(rec.order) or k >= len(first.order) or rec.order[k] != first.order[k])
            a = repr(first.order[k]) if k < len(first.order) else "nothing"
            b = repr(rec.order[k]) if k < len(rec.order) else "nothing"
            raise ArgumentError(f"hookkit.merge: capture {j} has other layers than capture 0: layer {k} (in order of "
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
            raise ArgumentError(f"hookkit.merge: {name!r} ran {n} time(s) in capture 0 but {len(calls)} time(s) in "
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
                    raise ArgumentError(f"hookkit.merge: capture {j} differs from capture 0 at {name!r} call {i}, in "
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
