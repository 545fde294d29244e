"""The records an engine makes: one ``Call`` per forward call of a selected module or op node, and the
``Recording`` that holds them by layer name, for the stores (``record/capture.py``, ``record/saved.py``) to read.

The engine (``core/engine.py``) and its gradient taps (``core/gradtaps.py``) fill these; ``hookkit.load`` and
``hookkit.merge`` rebuild them from a file or from several captures (``Recording.from_calls``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn

from hookkit.core import tree as _tree

__all__ = ["Call", "Recording", "Where", "Alias", "count_slots"]

Where = tuple  # (layer name, module or op site, index of this call among the module's calls in its forward)


class Alias(NamedTuple):
    """A view made of one input that needs grad, so that this module's share of its gradient can be told apart."""

    view: torch.Tensor
    version: int
    base: torch.Tensor
    base_grad_fn: Any
    slot: int
    n_slots: int
    handle: Any


class Call:
    """Everything recorded about one forward call of one module: the one record type the stores read.

    A field that was never set reads as its default (``_CALL_DEFAULTS``): the default capture's hook, which runs on
    every call of every hooked module, sets three fields and allocates nothing else."""

    __slots__ = ("output", "version", "forward", "guards", "args", "kwargs", "in_guards", "grad_out", "grad_in",
                 "grad_in_skel", "grad_in_error", "grad_out_error", "aliases", "where", "in_nodes")

    output: Any
    version: int | None  # the version of ``output`` (a tensor stored without a copy) when it was recorded
    forward: int | None  # which forward of the model the call ran in (``_Forwards``); None: unknown (an old file)
    guards: Any  # (tensor, version) for each other stored tensor that was not copied
    args: Any
    kwargs: Any
    in_guards: Any
    grad_out: list[Any] | None  # one slot per output tensor, once a gradient arrived
    grad_in: list[Any] | None  # one slot per positional input tensor
    grad_in_skel: Any
    grad_in_error: str | None
    grad_out_error: str | None  # why a gradient w.r.t. the output could not be stored
    aliases: list[Alias] | None
    where: Where  # (name, module, call index), for a listener
    in_nodes: Any  # an op's inputs' autograd nodes, from node_begin to node_end (``op_input_grads``)

    def __init__(self, output: Any = None, version: int | None = None, forward: int | None = None) -> None:
        self.output = output
        self.version = version
        self.forward = forward

    def __getattr__(self, name: str) -> Any:  # only reached for a slot never set
        try:
            return _CALL_DEFAULTS[name]
        except KeyError:
            raise AttributeError(f"'Call' record has no field {name!r}") from None

    # -- copy-on-write (``core.snapshot.Watch``) -----------------------------------------------------------------------
    def uncopied(self, field: str) -> Any:
        """The ``(tensor, version)`` pairs stored without a copy in ``field`` ("output" or "inputs")."""
        if field == "output":
            return ((self.output, self.version),) if self.version is not None else self.guards
        return self.in_guards

    def replace(self, field: str, old: torch.Tensor, new: torch.Tensor) -> None:
        """Store ``new`` (a copy) where ``old`` was, and stop guarding ``old``."""

        def swap(t: torch.Tensor) -> torch.Tensor:
            return new if t is old else t

        if field == "output":
            if self.version is not None and self.output is old:
                self.output, self.version = new, None
                return
            self.output = _tree.map_leaves(swap, self.output)
            self.guards = [(t, v) for t, v in self.guards if t is not old]
        else:
            self.args = _tree.map_leaves(swap, self.args)
            self.kwargs = _tree.map_leaves(swap, self.kwargs)
            self.in_guards = [(t, v) for t, v in self.in_guards if t is not old]


_CALL_DEFAULTS: dict[str, Any] = {
    "guards": (), "args": None, "kwargs": None, "in_guards": (), "grad_out": None, "grad_in": None,
    "grad_in_skel": None, "grad_in_error": None, "grad_out_error": None, "aliases": None, "where": (),
    "in_nodes": None,
}


class Recording:
    """What an engine recorded, for the stores to read: calls by layer name, the order of first calls, parameter
    gradients, and what was asked for. Holds no module: it outlives the block without keeping the model."""

    __slots__ = ("records", "order", "selected_names", "want_inputs", "want_grads", "wrapped", "param_grads")

    def __init__(self, selected: dict[nn.Module, list[str]], nodes: dict[str, str], want_inputs: bool,
                 want_grads: bool, wrapped: bool) -> None:
        self.records: dict[str, list[Call]] = {}
        for names in selected.values():
            calls: list[Call] = []
            for n in names:
                self.records[n] = calls  # aliases of a shared module share one list
        for n in nodes:
            self.records[n] = []
        self.order: list[str] = []
        self.selected_names = [n for names in selected.values() for n in names] + list(nodes)
        self.want_inputs = want_inputs
        self.want_grads = want_grads
        self.wrapped = wrapped
        self.param_grads: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_calls(cls, records: dict[str, list[Call]], *, order: list[str], selected_names: list[str],
                   want_inputs: bool, want_grads: bool, wrapped: bool,
                   param_grads: dict[str, dict[str, torch.Tensor]] | None = None) -> Recording:
        """A recording made of calls recorded elsewhere (``hookkit.load`` reads them from a file, ``hookkit.merge``
        joins several captures'); names of one module share one list, as in a live recording."""
        rec = cls({}, {}, want_inputs, want_grads, wrapped)
        rec.records = records
        rec.order = order
        rec.selected_names = selected_names
        rec.param_grads = param_grads or {}
        return rec


def count_slots(skel: Any) -> int:
    """How many slots ``core.tree.skeleton`` left in ``skel``."""
    n = 0

    def count(_s: Any) -> None:
        nonlocal n
        n += 1

    _tree.map_leaves(count, skel, leaf_type=_tree._Slot)
    return n
