"""What identifies an ``extract()`` call without storing its model, options or data: hashes kept in a manifest.

``extraction.extract.extract()`` calls ``call_settings()`` once, before anything is written, and hands the dict to the
``.npy`` folder store (``extraction.npyfolder.NpyFolder``), which writes it into ``manifest.json`` and refuses a resumed
call whose settings differ. The store calls ``sample0_digest()`` on sample 0 of the data (row 0, in whichever batch
holds it), the cheap check that a resumed run reads the same data. Nothing here writes files or raises for bad input: it
only hashes.
"""

from __future__ import annotations

import functools
import hashlib
import re
import types
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import ExtractError
from hookkit.core import tree as _tree

__all__ = ["call_settings", "model_fingerprint", "code_digest", "describe_option", "sample0_digest", "hash_tensor"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def call_settings(model: nn.Module, names: list[str], *, pool: Any, select: Any, dtype: torch.dtype | None,
                  stop: bool, dataset_id: str | None, mask: Any = None) -> dict[str, Any]:
    """The manifest's ``settings``: everything that decides what the rows are, in the order a refusal lists them."""
    return {
        "model": model_fingerprint(model),
        "layers": names,
        "pool": describe_option(pool),
        "select": describe_option(select),
        "dtype": None if dtype is None else str(dtype),
        "stop": stop,
        "dataset_id": dataset_id,
        "mask": describe_option(mask),  # None (the default) as before this option existed: such folders resume
    }


def hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s bytes to the hash ``h`` (its kind only, for a tensor without plain bytes)."""
    t = t.detach()
    if t.layout != torch.strided or t.device.type == "meta" or t.is_quantized:
        h.update(f"<{t.layout} {t.device.type} {t.dtype}>".encode())  # no plain bytes to read: its kind only
        return
    flat = t.reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().resolve_conj().resolve_neg()
    h.update(flat.view(torch.uint8).numpy().data)


def sample0_digest(args: tuple, kwargs: dict, n: int, valid: torch.Tensor | None = None, *, at: int = 0) -> str:
    """A hash of sample 0 of the data, the sample at position ``at`` of a batch of ``n`` (every input tensor's
    row ``at``): the cheap check that a resumed run reads the same data. With the batch's [N, T] mask of ``valid``
    tokens, only the sample's valid tokens count in tensors of that [N, T]: its padding depends on what it was
    batched with, so a run resumed with another batch size or other batches still matches."""
    h = hashlib.sha256()
    for t in _tree.leaves((args, kwargs)):
        first = t[at:at + 1] if t.dim() and t.shape[0] == n else t
        if valid is not None and t.dim() >= 2 and t.shape[:2] == valid.shape:
            first = first[:, valid[at].to(t.device)]
        h.update(f"{first.dtype} {tuple(first.shape)};".encode())
        hash_tensor(h, first)
    return h.hexdigest()[:32]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
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
    lazy = [name for name, t in (*model.named_parameters(), *model.named_buffers())
            if torch.nn.parameter.is_lazy(t)]
    if lazy:
        shown = ", ".join(lazy[:3]) + (", ..." if len(lazy) > 3 else "")
        raise ExtractError(
            f"the model has lazy parameters not yet initialised ({shown}), so what identifies it for resuming would "
            "change after its first forward: run one forward pass (any input of the right shape) before "
            "extract(..., out=...).")
    n_tensors = 0
    with torch.no_grad():
        for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in items:
                n_tensors += 1
                h.update(f"{kind} {name} {t.dtype} {tuple(t.shape)}\n".encode())
                hash_tensor(h, t)
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "tensors": n_tensors,
            "sha256": h.hexdigest()}


def code_digest(fn: Any) -> str:
    """A hash of what a callable does: its code (constants and nested functions included), defaults, the values
    it closes over, and the plain global values it reads; a bound method's object; a module's fingerprint."""
    digest = _CodeDigest()
    digest.add_callable(fn, 0)
    return digest.h.hexdigest()[:32]


class _CodeDigest:
    """``code_digest``'s walk: values and callables fed into one sha256, in an order that must not change (digests
    are kept in manifests, and a resumed run compares them)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add_value(self, v: Any, depth: int) -> None:
        h = self.h
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            h.update(repr(v).encode())
        elif isinstance(v, (tuple, list)):
            h.update(b"(")
            for item in v:
                self.add_value(item, depth)
            h.update(b")")
        elif isinstance(v, (set, frozenset)):
            h.update(repr(sorted(map(repr, v))).encode())
        elif isinstance(v, dict):
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                self.add_value(v[k], depth)
        elif isinstance(v, torch.Tensor):
            h.update(f"tensor {v.dtype} {tuple(v.shape)}".encode())
            hash_tensor(h, v)
        elif isinstance(v, nn.Module):
            h.update(model_fingerprint(v)["sha256"].encode())
        elif isinstance(v, types.CodeType):
            h.update(v.co_code)
            h.update(repr(v.co_names).encode())
            for const in v.co_consts:
                self.add_value(const, depth)
        elif callable(v) and depth < 4:
            self.add_callable(v, depth + 1)
        else:
            h.update(f"<{type(v).__module__}.{type(v).__qualname__}>".encode())

    def add_callable(self, f: Any, depth: int) -> None:
        self.h.update(f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}|".encode())
        if isinstance(f, functools.partial):
            self.add_callable(f.func, depth)
            self.add_value(f.args, depth)
            self.add_value(f.keywords, depth)
        elif isinstance(f, types.MethodType):
            self.add_callable(f.__func__, depth)
            self.add_value(f.__self__, depth)
        elif isinstance(f, types.FunctionType):
            self._add_function(f, depth)
        elif isinstance(f, nn.Module):
            self.add_value(f, depth)
        # (hasattr on a class is true for every class, through its metaclass: kept as it is, digests depend on it)
        elif not isinstance(f, (types.BuiltinFunctionType, type)) and hasattr(type(f), "__call__"):  # noqa: B004
            call = type(f).__call__
            if isinstance(call, types.FunctionType):
                self.add_callable(call, depth)
            self.add_value(getattr(f, "__dict__", {}), depth)

    def _add_function(self, f: types.FunctionType, depth: int) -> None:
        self.add_value(f.__code__, depth)
        self.add_value(f.__defaults__, depth)
        self.add_value(f.__kwdefaults__, depth)
        for cell in f.__closure__ or ():
            try:
                self.add_value(cell.cell_contents, depth)
            except ValueError:  # an empty cell
                self.h.update(b"<empty>")
        for name in f.__code__.co_names:
            g = f.__globals__.get(name)
            if isinstance(g, (bool, int, float, str, tuple, torch.Tensor)):
                self.h.update(name.encode())
                self.add_value(g, depth)


def describe_option(value: Any) -> Any:
    """An option as the manifest keeps it: plain values as they are, a callable as its name and ``code_digest``."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): describe_option(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return {"callable": name, "code": code_digest(value)}
