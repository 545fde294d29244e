"""Reading a capture file's manifest: JSON nodes back to values (``Decoder``) and the ``Recording`` a checked manifest
describes (``rebuild``).

``record.saved`` reads the file and checks the manifest (``record.manifest.check``) before it calls ``rebuild``; the
classes a node names are found by ``record.classes``. ``new_call`` builds the engine's ``Call`` records that both this
module and ``record.merge`` hand to ``Recording.from_calls``.
"""

from __future__ import annotations

import base64
import reprlib
from typing import Any

import torch

from hookkit.core import tree as _tree
from hookkit.core.engine import Call, Recording
from hookkit.record.classes import Classes
from hookkit.record.encode import NotSaved, dtype_name
from hookkit.record.manifest import DTYPES, Malformed, tensors_in

__all__ = ["Decoder", "rebuild", "new_call"]


def new_call(output: Any, forward: int | None, *, args: Any = None, kwargs: Any = None,
             grad_out: list[Any] | None = None, grad_in: list[Any] | None = None, grad_in_skel: Any = None,
             grad_out_error: str | None = None, grad_in_error: str | None = None) -> Call:
    """A ``Call`` record made of values recorded elsewhere (a file, or the captures ``merge`` joins): one with no
    tensor to guard against in-place writes (``version=None``, no guards), which the stores read like a live one.
    ``Call``'s constructor takes the output and the forward; the other fields are set here, and only here."""
    call = Call(output, None, forward)
    if args is not None or kwargs is not None:
        call.args, call.kwargs = args, kwargs
    if grad_out is not None:
        call.grad_out = grad_out
    if grad_in is not None:
        call.grad_in = grad_in
    if grad_in_skel is not None:
        call.grad_in_skel = grad_in_skel
    if grad_out_error:
        call.grad_out_error = grad_out_error
    if grad_in_error:
        call.grad_in_error = grad_in_error
    return call


class Decoder:
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
        module, qualname = node.get("module"), node.get("qualname", "")
        if kind == "dataclass":
            fields = {k: self.value(v) for k, v in node["fields"].items()}
            return self.classes.dataclass(node["module"], qualname, fields)
        if kind == "dict":
            items = [(self._key(k), self.value(v)) for k, v in node["items"]]
            return dict(items) if module is None else self.classes.mapping(module, qualname, items)
        if kind in ("namedtuple", "tuple", "list"):
            items = [self.value(x) for x in node["items"]]
            if kind == "namedtuple":
                return self.classes.namedtuple(node["module"], qualname, node["fields"], items)
            base = tuple if kind == "tuple" else list
            return base(items) if module is None else self.classes.sequence(module, qualname, base, items)
        return self._atom(kind, node)

    def _atom(self, kind: str, node: dict[str, Any]) -> Any:
        """A value that holds no other."""
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
        if kind == "enum":
            member = self.classes.enum_member(node["module"], node["qualname"], node["name"])
            return NotSaved(f"{node['module']}.{node['qualname']}", node["repr"]) if member is None else member
        if kind == "not_stored":
            stand_in = _tree.NotStored.__new__(_tree.NotStored)
            stand_in.type_name = node["class"]
            return stand_in
        assert kind == "not_saved", f"bug: manifest.check passed a node of type {kind!r}"
        return NotSaved(node["class"], node["repr"])

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
        if dtype_name(t.dtype) != node["dtype"] or list(t.shape) != node["shape"]:
            raise Malformed("", f"tensor {key!r} is {dtype_name(t.dtype)} {list(t.shape)} in the file but "
                                f"{node['dtype']} {node['shape']} in the manifest")
        return t


def _skeleton(node: Any, dec: Decoder) -> tuple[Any, int]:
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


def rebuild(manifest: dict[str, Any], dec: Decoder) -> Recording:
    """The recording a checked manifest describes (``record.manifest.check`` passed it)."""
    want_inputs, want_grads = manifest["inputs"], manifest["grads"]
    layers = manifest["layers"]
    records: dict[str, list[Call]] = {}
    for name, entry in layers.items():
        if "same_as" not in entry:
            records[name] = [_call(name, entry, i, dec, want_inputs, want_grads) for i in range(entry["calls"])]
    for name, entry in layers.items():
        if "same_as" in entry:
            records[name] = records[entry["same_as"]]
    param_grads = {layer: {p: dec.value(g) for p, g in grads.items()}
                   for layer, grads in manifest["param_grads"].items()}
    return Recording.from_calls({name: records[name] for name in layers}, order=list(manifest["order"]),
                                selected_names=list(manifest["selected"]), want_inputs=want_inputs,
                                want_grads=want_grads, wrapped=manifest["wrapped"], param_grads=param_grads)


def _call(name: str, entry: dict[str, Any], i: int, dec: Decoder, want_inputs: bool, want_grads: bool) -> Call:
    """Call ``i`` of one layer's entry."""
    found = entry.get("forward")  # checked by manifest.check; a file written before hookkit kept it has none
    parts: dict[str, Any] = {}
    if want_inputs:
        parts["args"] = dec.value(entry["inputs"][i])
        parts["kwargs"] = dec.value(entry["kwargs"][i])
    if want_grads:
        parts.update(_grads(entry["grads"][i], entry["grad_inputs"][i], dec))
        n = tensors_in(entry["outputs"][i])
        grad_out = parts.get("grad_out")
        if grad_out is not None and len(grad_out) < n:
            raise Malformed("", f"layer {name!r}, calls({name!r})[{i}], has {len(grad_out)} gradient slot(s) for an "
                                f"output of {n} tensor(s)")
    return new_call(dec.value(entry["outputs"][i]), None if found is None else found[i], **parts)


def _grads(grads: Any, grad_inputs: Any, dec: Decoder) -> dict[str, Any]:
    """The gradient fields of one call (``new_call``'s keywords)."""
    parts: dict[str, Any] = {}
    if grads is not None:
        if "error" in grads:
            parts["grad_out_error"] = grads["error"]
        else:
            parts["grad_out"] = dec.value(grads["slots"])
    if grad_inputs is not None:
        slots = None if grad_inputs["slots"] is None else dec.value(grad_inputs["slots"])
        if grad_inputs["structure"] is not None:
            parts["grad_in_skel"], n = _skeleton(grad_inputs["structure"], dec)
            if slots is not None and len(slots) != n:
                raise Malformed("", f"a gradient-input structure has {n} slots but {len(slots)} values")
        parts["grad_in"] = slots
        parts["grad_in_error"] = grad_inputs["error"]
    return parts
