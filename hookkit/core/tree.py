"""The one place that walks nested values: tensors inside tuples, lists, dicts, namedtuples, dataclasses, ModelOutput.

Every option (detach, clone, device, dtype, hooking) is applied through ``map_leaves``, so nested containers get
exactly the treatment that a bare tensor gets (baukit's ``recursive_copy`` once forgot ``clone`` in containers).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import itertools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["map_leaves", "leaves", "is_container", "skeleton", "slot", "fill", "NotStored"]

_ATOMS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)
# Values that hold no tensor and cannot change: kept as they are even where unknown objects are not.
_INERT = (*_ATOMS, enum.Enum, type, types.FunctionType, types.BuiltinFunctionType, slice, range, type(Ellipsis),
          np.generic, torch.layout, torch.memory_format, torch.finfo, torch.iinfo)


class NotStored:
    """Stands in a stored value where the module's output (or input) held an object that hookkit cannot walk: an
    instance of a custom class, a set of tensors. Kept live, it would hold its autograd graph and change with any
    later in-place op, silently; so it is left out, visibly."""

    __slots__ = ("type_name",)

    def __init__(self, obj: Any) -> None:
        self.type_name = f"{type(obj).__module__}.{type(obj).__qualname__}"

    def __repr__(self) -> str:
        return (f"<hookkit: not stored: a {self.type_name}, which hookkit cannot walk to detach or copy its tensors "
                "(it walks tuples, lists, dicts, dataclasses and ModelOutput)>")


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def map_leaves(fn: Callable[[Any], Any], obj: Any, leaf_type: type | tuple[type, ...] = torch.Tensor,
               opaque: Callable[[Any], Any] | None = None) -> Any:
    """Return a copy of ``obj`` with every ``leaf_type`` leaf replaced by ``fn(leaf)``, in a fixed depth-first order.

    Containers keep their type: tuple, list, namedtuple, dict (and subclasses such as OrderedDict or Hugging Face
    ``ModelOutput``), and dataclass instances. Anything else is returned as it is, or, when ``opaque`` is given and
    the object is not known to be inert (a number, a string, an enum, a function...), replaced by ``opaque(obj)``;
    numpy arrays are then copied.
    """
    if isinstance(obj, leaf_type):
        return fn(obj)
    if isinstance(obj, _ATOMS):
        return obj
    if _is_namedtuple(obj):
        return type(obj)(*(map_leaves(fn, v, leaf_type, opaque) for v in obj))
    if type(obj) is tuple or type(obj) is list:
        return type(obj)(map_leaves(fn, v, leaf_type, opaque) for v in obj)
    if isinstance(obj, (tuple, list)):
        mapped = [map_leaves(fn, v, leaf_type, opaque) for v in obj]
        try:
            return type(obj)(mapped)
        except TypeError:  # a subclass with another constructor: a plain container of the same kind
            return tuple(mapped) if isinstance(obj, tuple) else mapped
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: map_leaves(fn, v, leaf_type, opaque) for k, v in obj.items()}
        # OrderedDict, defaultdict, ModelOutput (a dict *and* a dataclass): copy, then replace values by key,
        # which for ModelOutput also keeps the attributes in step.
        new = copy.copy(obj)
        for k, v in obj.items():
            new[k] = map_leaves(fn, v, leaf_type, opaque)
        return new
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        copied = copy.copy(obj)
        for f in dataclasses.fields(obj):
            if hasattr(obj, f.name):
                object.__setattr__(copied, f.name, map_leaves(fn, getattr(obj, f.name), leaf_type, opaque))
        return copied
    if opaque is None or isinstance(obj, _INERT):
        return obj
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, (set, frozenset)) and not any(isinstance(v, torch.Tensor) or not isinstance(v, _INERT)
                                                     for v in obj):
        return type(obj)(obj)  # a set of names or numbers: a copy is a snapshot
    return opaque(obj)


def is_container(obj: Any) -> bool:
    """Whether ``map_leaves`` looks inside ``obj``."""
    return isinstance(obj, (tuple, list, dict)) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type))


def leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors inside ``obj``, in ``map_leaves`` order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    found: list[torch.Tensor] = []
    map_leaves(found.append, obj)
    return found


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def skeleton(obj: Any) -> Any:
    """``obj`` with its tensors replaced by numbered slots, holding no tensor (and so no autograd graph)."""
    counter = itertools.count()
    return map_leaves(lambda _t: _Slot(next(counter)), obj)


def slot(index: int) -> Any:
    """Slot ``index`` of a skeleton built elsewhere than by ``skeleton`` (``hookkit.load`` reads one from a file)."""
    return _Slot(index)


def fill(skel: Any, values: list[Any]) -> Any:
    """Put ``values[i]`` where ``skeleton`` left slot ``i``."""
    return map_leaves(lambda s: values[s.index], skel, leaf_type=_Slot)
