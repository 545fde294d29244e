"""A library that replaces torch's functions with Python wrappers process-wide, the way torchlens does on first
use (``torchlens.backends.torch.wrappers``: ``torch_func_decorator`` + ``decorate_all_once``): every overridable
function of ``torch``, ``torch.Tensor`` and ``torch.nn.functional`` becomes a ``functools.wraps`` wrapper that does
its own bookkeeping on the tensor arguments (torch ops run from a helper of this module) and calls the original;
``__wrapped__`` is deleted where the original is a builtin (torchlens does so for ``torch.jit``), and a Tensor
property (``getset_descriptor``) becomes a Python ``property`` of wrapped accessors. ``unwrap_torch`` puts every
original back exactly. Not wrapped: ``Tensor.__getitem__`` / ``__setitem__``, whose assignment on the class fills
CPython's sequence slot for good (torchlens clears it again with ctypes; a test cannot undo it).

Used by tests/test_wrapped_torch.py."""

from __future__ import annotations

import functools
import threading
import types
from typing import Any

import torch
import torch.nn.functional as F

_ORIGINALS: list[tuple[Any, str, Any, bool]] = []  # (namespace, name, original, whether it was in vars(namespace))
_state = threading.local()
_NOT_WRAPPED = frozenset({"__init__", "__new__", "__torch_function__", "__getitem__", "__setitem__"})
seen = [0]  # how many wrapped calls ran (a test checks the wrappers are really in the way)


def _bookkeeping(args: tuple) -> None:
    """What torchlens's wrapper does before an op: look at the tensors' storages and shapes (torch ops of its own,
    which a function mode sees, called from this module)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            a.untyped_storage()
            _ = a.shape


def _decorate(func: Any) -> Any:
    @functools.wraps(func)
    def wrapped_func(*args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "busy", False):
            return func(*args, **kwargs)
        _state.busy = True
        try:
            seen[0] += 1
            _bookkeeping(args)
        finally:
            _state.busy = False
        return func(*args, **kwargs)

    if not hasattr(func, "__code__"):
        del wrapped_func.__wrapped__
    return wrapped_func


def wrap_torch() -> None:
    if _ORIGINALS:
        return
    namespaces = {torch: torch, torch.Tensor: torch.Tensor, torch.nn.functional: F}
    for ns, funcs in torch.overrides.get_overridable_functions().items():
        if ns not in namespaces:
            continue
        for func in funcs:
            name = getattr(func, "__name__", None)
            if name is None:
                continue
            if name == "__get__":  # Tensor.<property>.__get__: the property itself is replaced below
                continue
            if getattr(ns, name, None) is not func or name in _NOT_WRAPPED:
                continue
            _ORIGINALS.append((ns, name, func, name in vars(ns)))
            setattr(ns, name, _decorate(func))
    for name, d in vars(torch._C.TensorBase).items():
        if isinstance(d, types.GetSetDescriptorType) and not name.startswith("_") and name not in vars(torch.Tensor):
            _ORIGINALS.append((torch.Tensor, name, d, False))
            setattr(torch.Tensor, name, property(_decorate(d.__get__), _decorate(d.__set__)))


def unwrap_torch() -> None:
    while _ORIGINALS:
        ns, name, func, own = _ORIGINALS.pop()
        if own:
            setattr(ns, name, func)
        else:
            delattr(ns, name)
