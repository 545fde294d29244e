"""A capture file's manifest read as untrusted input: its nesting bounded before the JSON is parsed, then every node
checked against the format (``record.saved``'s module docstring describes it) by one iterative walk, before any value,
tensor or class is built from it.

``record.saved.read`` (``hookkit.load``) calls ``parse`` on the manifest's text, checks the format version and the
manifest's SHA-256, then ``check``s the parsed manifest; the decoder (``record.decode``) then builds values from nodes
whose types are known to be right, and only checks what depends on the tensors (a key the file holds, its dtype and
shape) and on the values built (a hashable dict key, gradient slots that fit). Every problem is a ``Malformed`` that
names where in the manifest it is; ``load`` reports it as a ``SavedCaptureError`` with the file's path.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Malformed", "TooLarge", "parse", "check", "tensors_in", "DTYPES", "MAX_DEPTH", "MAX_NODES", "MAX_NAME"]

MAX_DEPTH = 100  # containers nested inside one value (a model's outputs nest a few deep); save refuses deeper ones
MAX_NODES = 10_000_000  # nodes in one manifest: what is built from it stays in proportion to the file
MAX_NAME = 4096  # characters of a name: a layer, a tensor key, a class, a dtype, a device
_MAX_JSON_DEPTH = 3 * MAX_DEPTH + 16  # a dict container is 3 JSON levels (node, items, pair); the rest ~6 levels
_MAX_NUMBER = 64  # characters of a float written as text ("inf", "-1.5e-300")

DTYPES: dict[str, torch.dtype] = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
# a dtype node is looked up here, never with getattr(torch, ...), which can import a torch submodule

_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_CONTAINERS = ("tuple", "list", "namedtuple", "dict", "dataclass")


class Malformed(Exception):
    """The manifest is not what ``Capture.save`` writes; ``where`` says where in it (``layers['fc'].outputs[0]``)."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}" if where else what)


class TooLarge(Malformed):
    """Beyond a bound of the format (nesting, number of values, length of a name): ``save`` refuses to write such a
    capture, so that every file it writes loads."""


def parse(text: str) -> Any:
    """The manifest's JSON, parsed only once its nesting is known to be bounded (json recurses once per level)."""
    depth = max(itertools.accumulate(map(_STEP.__getitem__, _NOT_BRACKETS.sub("", _STRINGS.sub("", text)))),
                default=0)
    if depth > _MAX_JSON_DEPTH:
        raise Malformed("", f"is nested {depth} levels deep, and a capture file's manifest is at most "
                            f"{_MAX_JSON_DEPTH} deep (values nested at most {MAX_DEPTH} containers deep)")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Malformed("", f"is not valid JSON ({exc})") from None


# -- where in the manifest, built only when an error is reported -----------------------------------------------------
_Where = tuple  # (parent, name or None, key or None) links, formatted only for a message; () is the manifest


def _show(where: _Where) -> str:
    parts: list[str] = []
    while where:
        where, name, key = where
        parts.append(("" if name is None else f".{name}") + ("" if key is None else f"[{key!r}]"))
    runs = [(part, len(list(run))) for part, run in itertools.groupby(reversed(parts))]
    shown = "".join(part * n if n < 4 else f"({part} {n} times)" for part, n in runs).removeprefix(".")
    return shown if len(shown) <= 300 else f"{shown[:100]} ... {shown[-150:]}"


def _at(where: _Where, key: str | int) -> _Where:
    return (where, None, key)


def _field(where: _Where, name: str) -> _Where:
    return (where, name, None)


def _item(where: _Where, name: str, key: str | int) -> _Where:
    """``where.name[key]`` as one link, so that a deep run of them is shown as one repeated part."""
    return (where, name, key)


# -- small checks -----------------------------------------------------------------------------------------------------
def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"[:60]
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    return f"a JSON {'list' if isinstance(v, list) else 'object'}"


def _need(obj: dict[str, Any], key: str, where: _Where, ok: Callable[[Any], bool], what: str) -> Any:
    if key not in obj:
        raise Malformed(_show(where), f"it has no {key!r}")
    v = obj[key]
    if not ok(v):
        _name_length(v, _field(where, key))
        raise Malformed(_show(_field(where, key)), f"{_describe(v)}, where {what} belongs")
    return v


def _name_length(v: Any, where: _Where) -> None:
    """Raise ``TooLarge`` for a name (or a list holding one) beyond ``MAX_NAME``: what ``save`` refuses to write."""
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, str) and len(x) > MAX_NAME:
            raise TooLarge(_show(where), f"a name of {len(x):,} characters (at most {MAX_NAME:,})")


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_NAME


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(_is_name(x) for x in v)


def _is_dims(v: Any) -> bool:
    return isinstance(v, list) and all(_is_count(x) for x in v)


def _is_ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and -2**63 <= x < 2**63
                                       for x in v)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_number_text(v: Any) -> bool:
    if not isinstance(v, str) or len(v) > _MAX_NUMBER:
        return False
    try:
        float(v)
    except ValueError:
        return False
    return True


def _is_complex_text(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_number_text(x) for x in v)


def _is_dtype(v: Any) -> bool:
    return isinstance(v, str) and v in DTYPES


def _is_device(v: Any) -> bool:
    if not isinstance(v, str) or len(v) > _MAX_NUMBER:
        return False
    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


def _is_node_type(v: Any) -> bool:
    return isinstance(v, str) and (v in _LEAVES or v in _CONTAINERS)


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


_LEAVES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {  # node type -> field -> (check, what)
    "tensor": {"key": (_is_name, "a tensor's key"), "dtype": (_is_dtype, "a torch dtype's name"),
               "shape": (_is_dims, "a list of sizes")},
    "slot": {"index": (_is_count, "a slot's index")},
    "float": {"value": (_is_number_text, "a float written as text")},
    "complex": {"value": (_is_complex_text, "two floats written as text")},
    "bytes": {"value": (_is_text, "base64 text")},
    "dtype": {"value": (_is_dtype, "a torch dtype's name")},
    "device": {"value": (_is_device, "a torch device")},
    "size": {"value": (_is_ints, "a list of sizes")},  # a torch.Size a module made may hold -1
    "not_stored": {"class": (_is_name, "a class name")},
    "not_saved": {"class": (_is_name, "a class name"), "repr": (_is_text, "a repr")},
    "enum": {"module": (_is_name, "a module name"), "qualname": (_is_name, "a class name"),
             "name": (_is_name, "a member's name"), "repr": (_is_text, "a repr")},
}


# -- the walk ---------------------------------------------------------------------------------------------------------
class _Walk:
    """Checks value nodes, iteratively: depth and node count are bounded however the file is nested."""

    def __init__(self) -> None:
        self.nodes = 0

    def values(self, roots: list[tuple[Any, _Where]], *, structure: bool = False) -> None:
        """Check value nodes; ``structure``: a gradient-input structure, whose leaves are slots, not tensors."""
        stack: list[tuple[Any, _Where, int]] = [(node, where, 0) for node, where in reversed(roots)]
        while stack:
            node, where, depth = stack.pop()
            self.nodes += 1
            if self.nodes > MAX_NODES:
                raise TooLarge(_show(where), f"the manifest holds more than {MAX_NODES:,} values")
            if node is None or isinstance(node, (bool, int, float, str)):
                continue
            if not isinstance(node, dict):
                raise Malformed(_show(where), f"{_describe(node)}, where a value (null, a boolean, a number, a "
                                              "string or an object with a \"type\") belongs")
            kind: str = node.get("type", "")
            if not _is_node_type(kind):
                _need(node, "type", where, _is_node_type, "a node type")
            if kind in _LEAVES:
                if (kind == "slot") != structure and kind in ("slot", "tensor"):
                    raise Malformed(_show(where), f"a {kind} node, which belongs only "
                                                  f"{'in' if kind == 'slot' else 'outside'} a gradient-input "
                                                  "structure")
                for key, (ok, what) in _LEAVES[kind].items():
                    if key not in node or not ok(node[key]):
                        _need(node, key, where, ok, what)  # raises, saying what is wrong
                continue
            if depth >= MAX_DEPTH:
                raise TooLarge(_show(where), f"a value nested more than {MAX_DEPTH} containers deep")
            stack.extend(reversed(self._children(kind, node, where, depth + 1)))

    def _children(self, kind: str, node: dict[str, Any], where: _Where, depth: int) -> list[tuple[Any, _Where, int]]:
        if "module" in node or "qualname" in node or kind in ("namedtuple", "dataclass"):
            _need(node, "module", where, _is_name, "a module name")
            _need(node, "qualname", where, _is_name, "a class name")
        if kind == "dataclass":
            fields = _need(node, "fields", where, _is_dict, "an object of fields")
            return [(v, _item(where, "fields", k), depth) for k, v in fields.items()]
        items = _need(node, "items", where, _is_list, "a list of items")
        if kind == "namedtuple":
            _need(node, "fields", where, lambda v: _is_names(v) and len(v) == len(items),
                  f"a list of {len(items)} field names")
        if kind != "dict":
            return [(v, _item(where, "items", i), depth) for i, v in enumerate(items)]
        children = []
        for i, pair in enumerate(items):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise Malformed(_show(_item(where, "items", i)), f"{_describe(pair)}, where a [key, value] pair "
                                                                 "belongs")
            children += [(pair[0], _at(_item(where, "items", i), 0), depth),
                         (pair[1], _at(_item(where, "items", i), 1), depth)]
        return children

    def slots(self, node: Any, where: _Where) -> None:
        """A list of gradient slots: tensors, or null where no gradient arrived."""
        if node is None:
            return
        if not (isinstance(node, dict) and node.get("type") == "list" and "module" not in node
                and isinstance(node.get("items"), list)):
            raise Malformed(_show(where), f"{_describe(node)}, where a list node of gradients belongs")
        items = node["items"]
        for i, item in enumerate(items):
            if not (item is None or (isinstance(item, dict) and item.get("type") == "tensor")):
                raise Malformed(_show(_item(where, "items", i)), f"{_describe(item)}, where a gradient "
                                                                       "(a tensor node or null) belongs")
        self.values([(item, _item(where, "items", i)) for i, item in enumerate(items)])


def _is_optional_text(v: Any) -> bool:
    return v is None or isinstance(v, str)


def check(manifest: Any) -> None:
    """Raise ``Malformed`` unless ``manifest`` (parsed, of a known format version) has the shape ``save`` writes."""
    top: _Where = ()
    if not isinstance(manifest, dict):
        raise Malformed("", f"it is {_describe(manifest)}, not a JSON object")
    want_inputs = _need(manifest, "inputs", top, _is_bool, "true or false")
    want_grads = _need(manifest, "grads", top, _is_bool, "true or false")
    _need(manifest, "wrapped", top, _is_bool, "true or false")
    layers = _need(manifest, "layers", top, _is_dict, "an object of layers")
    for key in ("order", "selected"):
        names = _need(manifest, key, top, _is_names, "a list of layer names")
        missing = [n for n in names if n not in layers]
        if missing:
            raise Malformed(key, f"layer {missing[0]!r} is listed but has no entry in layers")
    order = manifest["order"]
    if len(set(order)) != len(order):
        raise Malformed("order", "a layer is listed twice")
    if "sha256" in manifest:
        _need(manifest, "sha256", top, lambda v: _is_dict(v) and all(_is_name(x) for x in v.values()),
              "an object of SHA-256 digests")
    walk = _Walk()
    kinds = ["outputs"] + ["inputs", "kwargs"] * want_inputs
    for name, entry in layers.items():
        where = _item(top, "layers", name)
        _name_length(name, where)
        if not isinstance(entry, dict):
            raise Malformed(_show(where), f"{_describe(entry)}, where a layer's entry belongs")
        if "same_as" in entry:
            other = _need(entry, "same_as", where, lambda v: isinstance(v, str) and v in layers,
                          "the name of another layer")
            if not isinstance(layers[other], dict) or "same_as" in layers[other] or other == name:
                raise Malformed(_show(where), f"it is the same as {other!r}, which is not a layer with calls")
            continue
        calls = _need(entry, "calls", where, _is_count, "a number of calls")
        if "forward" in entry:  # each call's forward, ascending (files written before hookkit kept it have none)
            forwards = _need(entry, "forward", where, _is_ints, f"a list of {calls} whole numbers")
            if len(forwards) != calls or forwards != sorted(forwards):
                raise Malformed(_show(_field(where, "forward")), f"not {calls} ascending whole numbers")
        if not calls:
            continue
        for kind in kinds + ["grads", "grad_inputs"] * want_grads:
            found = _need(entry, kind, where, _is_list, f"a list of {calls} call(s)")
            if len(found) != calls:
                raise Malformed(_show(_field(where, kind)), f"a list of {len(found)} call(s), where {calls} belong")
        walk.values([(v, _item(where, kind, i)) for kind in kinds for i, v in enumerate(entry[kind])])
        if want_grads:
            for i, node in enumerate(entry["grads"]):
                _grads(walk, node, _item(where, "grads", i))
            for i, node in enumerate(entry["grad_inputs"]):
                _grad_inputs(walk, node, _item(where, "grad_inputs", i))
    param_grads = _need(manifest, "param_grads", top, _is_dict, "an object of layers")
    for layer, grads in param_grads.items():
        where = _item(top, "param_grads", layer)
        _name_length([layer, *grads] if isinstance(grads, dict) else layer, where)
        if not isinstance(grads, dict):
            raise Malformed(_show(where), f"{_describe(grads)}, where an object of parameter gradients belongs")
        for p, node in grads.items():
            if not (isinstance(node, dict) and node.get("type") == "tensor"):
                raise Malformed(_show(_at(where, p)), f"{_describe(node)}, where a tensor node belongs")
        walk.values([(node, _at(where, p)) for p, node in grads.items()])


def _grads(walk: _Walk, node: Any, where: _Where) -> None:
    if node is None:
        return
    if not isinstance(node, dict):
        raise Malformed(_show(where), f"{_describe(node)}, where a gradient entry belongs")
    if "error" in node:
        _need(node, "error", where, _is_text, "an error message")
    else:
        _need(node, "slots", where, lambda v: v is not None, "a list node of gradients")
        walk.slots(node["slots"], _field(where, "slots"))


def _grad_inputs(walk: _Walk, node: Any, where: _Where) -> None:
    if node is None:
        return
    if not isinstance(node, dict):
        raise Malformed(_show(where), f"{_describe(node)}, where a gradient-input entry belongs")
    _need(node, "error", where, _is_optional_text, "null or an error message")
    structure = _need(node, "structure", where, lambda v: True, "")
    if structure is not None:
        walk.values([(structure, _field(where, "structure"))], structure=True)
    _need(node, "slots", where, lambda v: True, "")
    walk.slots(node["slots"], _field(where, "slots"))



def tensors_in(node: Any) -> int:
    """How many tensors a checked value node holds outside dict keys: the leaves ``core.tree`` walks in its value."""
    n = 0
    stack = [node]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        kind = node["type"]
        if kind == "tensor":
            n += 1
        elif kind == "dataclass":
            stack.extend(node["fields"].values())
        elif kind == "dict":
            stack.extend(value for _key, value in node["items"])
        elif kind in _CONTAINERS:
            stack.extend(node["items"])
    return n
