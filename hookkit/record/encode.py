"""Writing a capture file's manifest: values to JSON nodes (``Encoder``), tensors prepared for the file
(``FileTensors``), and the manifest of a whole ``Recording`` (``manifest``).

``record.saved`` calls ``manifest`` when a capture is saved and checks the result with ``record.manifest.check`` (as
``load`` will); ``record.merge`` uses ``Encoder`` with a signature per tensor to compare captures before it joins them.
``record.decode`` turns the nodes back into values. The format is described in ``record.saved``.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import itertools
import math
import reprlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hookkit._errors import SavedCaptureError
from hookkit._version import __version__
from hookkit.core import tree as _tree
from hookkit.core.engine import Call, Recording, count_slots
from hookkit.core.snapshot import check_guards

__all__ = ["NotSaved", "Encoder", "FileTensors", "manifest", "holes", "digest", "dtype_name", "place", "KINDS",
           "FORMAT"]

FORMAT = 2  # the newest manifest format this hookkit reads: a file of a newer one is refused with "upgrade hookkit"
_FORMAT_WITHOUT_ENUMS = 1  # a file without enum members is written as format 1, which older hookkits read too
KINDS = ("outputs", "inputs", "kwargs", "grads", "grad_inputs")


class NotSaved:
    """Stands, in a loaded capture, where the saved one held a value that a capture file cannot hold: neither a
    tensor, a container hookkit walks, a number, a string, a bool, None, a dtype, a device nor an enum member (a
    function, a numpy array...); also an enum member whose class ``load`` cannot find. ``type_name`` and ``text``
    (a short repr) say what it was."""

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


class Hole:
    """Slot ``index`` of a gradient-input skeleton, while it is written."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _class_ref(cls: type) -> dict[str, str]:
    return {"module": cls.__module__, "qualname": cls.__qualname__}


def place(name: str, kind: str, i: int, n: int) -> str:
    what = {"outputs": "the output", "inputs": "an input", "kwargs": "a keyword input", "grads": "a gradient w.r.t. "
            "the output", "grad_inputs": "a gradient w.r.t. an input", "param_grads": "a parameter gradient"}[kind]
    return f"{what} of {name!r}" + (f" (calls({name!r})[{i}])" if n > 1 else "")


# -- writing: values to JSON nodes ------------------------------------------------------------------------------------
class Encoder:
    """Turns nested values into JSON nodes. ``tensor(t, key, where)`` gives a tensor's node: the file's tensors
    (``FileTensors``) or, for ``merge``, a comparable signature (``_signature``)."""

    def __init__(self, tensor: Callable[[torch.Tensor, str, str], Any]) -> None:
        self._tensor = tensor
        self.not_saved: list[str] = []  # where a value was replaced by a NotSaved placeholder
        self.enums = False  # whether an enum member was written (the file is then of format 2)

    def encode(self, value: Any, key: str, where: str) -> Any:
        counter = itertools.count()
        return self._node(value, lambda: f"{key}/{next(counter)}", where)

    def _node(self, v: Any, key: Callable[[], str], where: str) -> Any:
        if isinstance(v, torch.Tensor):
            return self._tensor(v, key(), where)
        if v is None or type(v) in (bool, str):
            return v
        if isinstance(v, enum.Enum):  # before int and str: an IntEnum or StrEnum member stays a member
            return self._enum(v, where)
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
        return self._atom(v, key, where)

    def _atom(self, v: Any, key: Callable[[], str], where: str) -> Any:
        """A value that holds no other: a number, bytes, a dtype, a device, a size, a placeholder."""
        if isinstance(v, Hole):
            return {"type": "slot", "index": v.index}
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
            return {"type": "dtype", "value": dtype_name(v)}
        if isinstance(v, torch.device):
            return {"type": "device", "value": str(v)}
        if isinstance(v, torch.Size):
            return {"type": "size", "value": list(v)}
        if isinstance(v, _tree.NotStored):
            return {"type": "not_stored", "class": v.type_name}
        if isinstance(v, NotSaved):
            return {"type": "not_saved", "class": v.type_name, "repr": v.text}
        return self._unsaved(v, where)

    def _enum(self, v: enum.Enum, where: str) -> dict[str, Any]:
        """An enum member, by its class and its name (``load`` looks the member up; it builds no new one)."""
        if not isinstance(v.name, str):
            return self._unsaved(v, where)
        self.enums = True
        return {"type": "enum", **_class_ref(type(v)), "name": v.name, "repr": reprlib.repr(v)}

    def _key(self, k: Any, where: str) -> Any:
        if _tree.leaves(k):  # a dict keyed by tensors: the key is not a value hookkit stores
            return self._unsaved(k, where)
        return self._node(k, lambda: "", where)

    def _unsaved(self, v: Any, where: str) -> dict[str, Any]:
        type_name = f"{type(v).__module__}.{type(v).__qualname__}"
        self.not_saved.append(f"{where}: a {type_name}")
        return {"type": "not_saved", "class": type_name, "repr": reprlib.repr(v)}


class FileTensors:
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
        return {"type": "tensor", "key": found, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}

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


def holes(skel: Any) -> Any:
    """A gradient-input skeleton with its slots as ``_Hole`` (which the encoder writes as slot nodes)."""
    return _tree.fill(skel, [Hole(i) for i in range(count_slots(skel))])


def manifest(rec: Recording, enc: Encoder, tensor: Callable[..., Any]) -> dict[str, Any]:
    """The manifest of ``rec``; tensors go through ``tensor`` (``FileTensors``). Checks every stored tensor that
    was not copied for later in-place edits, as reading it would."""
    layers: dict[str, Any] = {}
    first_name: dict[int, str] = {}  # id(call list) -> the first name of a module captured under several names
    for name, calls in rec.records.items():
        if id(calls) in first_name:
            layers[name] = {"same_as": first_name[id(calls)]}
            continue
        first_name[id(calls)] = name
        n = len(calls)
        entry: dict[str, list[Any]] = {kind: [] for kind in KINDS}
        for i, call in enumerate(calls):
            where = {kind: place(name, kind, i, n) for kind in KINDS}
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
        "format": FORMAT if enc.enums else _FORMAT_WITHOUT_ENUMS, "hookkit": __version__, "torch": torch.__version__,
        "inputs": rec.want_inputs, "grads": rec.want_grads, "wrapped": rec.wrapped,
        "selected": list(rec.selected_names), "order": list(rec.order), "layers": layers,
        "param_grads": param_grads,
    }


def _grads_node(call: Call, enc: Encoder, key: str, where: str) -> Any:
    if call.grad_out_error:
        return {"error": call.grad_out_error}
    if call.grad_out is None:
        return None
    return {"slots": enc.encode(list(call.grad_out), key, where)}


def _grad_inputs_node(call: Call, enc: Encoder, key: str, where: str) -> Any:
    if call.grad_in_skel is None and call.grad_in is None and not call.grad_in_error:
        return None
    return {"structure": None if call.grad_in_skel is None else enc.encode(holes(call.grad_in_skel), key, where),
            "slots": None if call.grad_in is None else enc.encode(list(call.grad_in), key, where),
            "error": call.grad_in_error}


def digest(t: torch.Tensor) -> str:
    """The SHA-256 of a contiguous CPU tensor's bytes, as the file holds them."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"").hexdigest()


