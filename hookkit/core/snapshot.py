"""Snapshots: how a live value becomes a stored one (detach, move / cast, copy), and how a stored tensor that was
not copied is checked for later in-place edits.

The engine (``core/engine.py``) snapshots each recorded output, input and gradient through a ``Snapshotter``; the
stores (``record/capture.py``) call ``check_guards`` / ``refuse_unstored`` when a value is read.
"""

from __future__ import annotations

from typing import Any

import torch

from hookkit._errors import ArgumentError, ArgumentTypeError, ModifiedInPlaceError, NotRecordedError
from hookkit.core import tree as _tree
from hookkit.core.compat import is_functorch_wrapped

__all__ = ["To", "parse_to", "Snapshotter", "Untappable", "Watch", "check_guards", "refuse_unstored", "shares_memory"]

To = None | str | torch.device | torch.dtype | tuple | list


def parse_to(to: To) -> tuple[torch.device | None, torch.dtype | None]:
    """``to=`` as (device, dtype), checked now rather than inside the forward: one of each at most, and a device
    that exists on this machine."""
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    items = list(to) if isinstance(to, (tuple, list)) else [to]
    for item in items:
        if item is None:
            continue
        if isinstance(item, torch.dtype):
            if dtype is not None and item != dtype:
                raise ArgumentError(f"to={to!r} names two dtypes ({dtype} and {item}); give one.")
            dtype = item
        elif isinstance(item, (str, torch.device)):
            try:
                new = torch.device(item)
            except RuntimeError:
                raise ArgumentError(
                    f"to={to!r}: {item!r} is not a device; use e.g. 'cpu', 'cuda:0' or torch.float16.") from None
            if device is not None and new != device:
                raise ArgumentError(f"to={to!r} names two devices ({device} and {new}); give one.")
            device = new
        else:
            raise ArgumentTypeError(
                f"to={to!r}: expected a device ('cpu', torch.device), a dtype (torch.float16) or a tuple of both."
            )
    if device is not None:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:  # no CUDA build / no such device index
            reason = " ".join(str(exc).split()).split(". ")[0]
            raise ArgumentError(f"to={to!r}: device {str(device)!r} is not available here ({reason}). Use 'cpu', or a "
                                "device this machine has.") from None
    return device, dtype


class Snapshotter:
    """Turns live values into stored ones: detach, move / cast, clone, and guard against later in-place edits."""

    __slots__ = ("detach", "clone", "device", "dtype", "moves", "custom")

    def __init__(self, *, detach: bool, clone: bool, to: To) -> None:
        self.detach = detach
        self.clone = clone
        self.device, self.dtype = parse_to(to)
        self.moves = self.device is not None or self.dtype is not None
        self.custom = self.moves or clone or not detach

    def tensor(self, t: torch.Tensor, guards: list) -> torch.Tensor:
        s = t.detach() if self.detach and t.requires_grad else t
        if self.moves:
            dtype = self.dtype if self.dtype is not None and s.is_floating_point() else None
            moved = s.to(device=self.device, dtype=dtype)
            if moved is not s:
                return moved  # a fresh copy: nothing can change it behind our back
        if self.clone or s.is_inference():
            # Inference tensors keep no version counter, so a later in-place op could not be detected: copy.
            return s.clone()
        guards.append((s, s._version))
        return s

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A detached copy of ``t`` on the requested device / dtype, never sharing memory with ``t`` (gradients:
        autograd may pass a buffer on and accumulate into it later).

        Raises ``Untappable`` for a tensor that cannot be kept past the moment (functorch's wrappers)."""
        if is_functorch_wrapped(t):
            raise Untappable(
                "it arrived inside a torch.func transform (grad, vjp, vmap...) as a functorch-wrapped tensor, which "
                "does not outlive the transform. Use the transform's own results, or call backward() outside it.")
        g = t.detach()
        if self.moves:
            g = g.to(device=self.device, dtype=self.dtype if g.is_floating_point() else None)
        if g.layout != torch.strided:  # sparse (e.g. nn.Embedding(sparse=True)) and others: no data pointer
            return g.clone()
        return g.clone() if shares_memory(g, t) else g

    def __call__(self, value: Any) -> tuple[Any, Any]:
        guards: list = []
        if isinstance(value, torch.Tensor):
            return self.tensor(value, guards), guards
        return _tree.map_leaves(lambda t: self.tensor(t, guards), value, opaque=_tree.NotStored), guards


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` use the same storage (a view at any offset counts); True when it cannot be told, so
    that the caller copies to be safe."""
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor kind without a storage of its own
        return True


class Watch:
    """Copy-on-write: the stored tensors that were not copied, and the copy made just before an in-place op that
    hookkit sees (``core.ops``) writes into storage one of them uses.

    Holders are the engine's ``Call`` records, appended to ``outputs`` / ``inputs``: ``uncopied(field)`` gives
    ``(tensor, version)`` pairs and ``replace(field, old, new)`` swaps a stored tensor for its copy. Adding is one
    list append (a hook runs on every call); tensors are indexed by storage only when an in-place op comes, and each
    at most once.
    """

    __slots__ = ("outputs", "inputs", "by_storage", "copies")

    def __init__(self) -> None:
        self.outputs: list[Any] = []  # holders whose "output" field stores tensors without a copy, not yet indexed
        self.inputs: list[Any] = []  # the same for "inputs"
        self.by_storage: dict[int, list[tuple[torch.Tensor, int, Any, str]]] = {}
        self.copies = 0

    @property
    def active(self) -> bool:
        return bool(self.outputs or self.inputs or self.by_storage)

    def before_write(self, targets: list[torch.Tensor]) -> None:
        """``targets`` are about to be written in place: copy every stored tensor sharing storage with one."""
        for field, pending in (("output", self.outputs), ("inputs", self.inputs)):
            for holder in pending:
                for t, version in holder.uncopied(field):
                    key = _storage_key(t)
                    if key:
                        self.by_storage.setdefault(key, []).append((t, version, holder, field))
            pending.clear()
        for w in targets:
            entries = self.by_storage.pop(_storage_key(w), None)
            if not entries:
                continue
            made: dict[int, torch.Tensor] = {}
            for t, version, holder, field in entries:
                if t._version != version:
                    continue  # already changed by a write hookkit did not see: reading it will say so
                copy = made.get(id(t))
                if copy is None:
                    copy = made[id(t)] = t.clone()  # of a view, only the part the view covers
                    self.copies += 1
                holder.replace(field, t, copy)

    def clear(self) -> None:
        self.outputs.clear()
        self.inputs.clear()
        self.by_storage.clear()


def _storage_key(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (0 when it has none, or no elements: nothing to overwrite). A stored tensor
    keeps its storage alive, so no other storage can have the same address while it is watched."""
    try:
        return t.untyped_storage().data_ptr() if t.numel() else 0
    except (RuntimeError, NotImplementedError):
        return 0


class Untappable(Exception):
    """A tap met a tensor it cannot handle; it steps aside and the stores say why."""


def check_guards(guards: Any, what: str) -> None:
    for t, version in guards:
        if t._version != version:
            raise ModifiedInPlaceError(
                f"{what} was modified in place after it was captured (by a later in-place op such as "
                "ReLU(inplace=True) or `+=`), so the stored tensor no longer holds the value that was produced. "
                "Fix: capture(..., clone=True) stores a copy at hook time."
            )


def refuse_unstored(value: Any, what: str) -> None:
    if isinstance(value, _tree.NotStored):
        raise NotRecordedError(
            f"{what} is a {value.type_name}, which hookkit cannot snapshot: it walks tensors inside tuples, lists, "
            "dicts, dataclasses and ModelOutput, and an object of another class, kept live, would hold its autograd "
            "graph and change with any later in-place op. Return one of those containers from the module, or read "
            "the object yourself with hookkit.hooks(...).")
