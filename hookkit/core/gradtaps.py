"""Gradient taps: the tensor, autograd-node and parameter hooks through which an engine records gradients.

``core/engine.py`` builds one ``GradTaps`` per engine and calls it from its module hooks and op taps: ``alias_inputs``
before a call (each positional input that needs grad gets a view of its own, hooked), ``hook_outputs`` after it
(each output that needs grad), ``hook_op_backward`` for an op whose backward a listener wants to see
(``check_finite``), and ``hook_params`` at entry (``param_grads``). Gradients go into the ``Call`` records
(``core/calls.py``) and the ``Recording``'s ``param_grads``, and to the listener. Hooks are registered through the
engine's ``HandleGroup``; nothing is recorded once ``active`` is False.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn as nn

from hookkit.core import tree as _tree
from hookkit.core.calls import Alias, Call, Recording, count_slots
from hookkit.core.compat import after_gradient_reduction, current_graph_task_id
from hookkit.core.handles import HandleGroup
from hookkit.core.listener import Listener
from hookkit.core.snapshot import Snapshotter, Untappable

__all__ = ["GradTaps"]


class GradTaps:
    """The gradient hooks of one engine; see the module docstring. ``keep=False``: tell the listener, store nothing."""

    def __init__(self, *, handles: HandleGroup, snap: Snapshotter, recording: Recording, listener: Listener | None,
                 keep: bool) -> None:
        self.active = False
        self._handles = handles
        self._snap = snap
        self._recording = recording
        self._listener = listener
        self._keep = keep
        # param_grads: per running backward (its graph task), the parameters whose gradient arrived in it
        self._param_waiting: dict[int, list[tuple[torch.Tensor, str, list[str]]]] = {}
        self._param_lock = threading.Lock()

    def close(self) -> None:
        """Record nothing more, hold no parameter (a backward that raised never reached its end) and no listener."""
        self.active = False
        with self._param_lock:
            self._param_waiting.clear()
        self._listener = None

    # -- a call's inputs and outputs -------------------------------------------------------------------------------
    def alias_inputs(self, call: Call, args: tuple) -> tuple | None:
        """Give each positional input that needs grad a view of its own, hooked, so that the gradient this module
        sends back to it can be told apart from what other users of the same tensor send. Returns the arguments to
        call the module with instead, or None."""
        # Top-level arguments that are not tensors or containers (ints, flags) get None, as in torch's grad_input.
        call.grad_in_skel = _tree.skeleton(tuple(a if isinstance(a, torch.Tensor) or _tree.is_container(a) else None
                                                 for a in args))
        n = count_slots(call.grad_in_skel)
        aliases: list[Alias] = []
        slot = iter(range(n))

        def alias(t: torch.Tensor) -> torch.Tensor:
            i = next(slot)
            if not t.requires_grad:
                return t
            try:
                a = t.view_as(t)
            except (RuntimeError, NotImplementedError) as exc:  # e.g. sparse tensors have no views: step aside
                call.grad_in_error = (
                    f"input {i} is a {str(t.layout).replace('torch.', '')} tensor, of which hookkit cannot make the "
                    f"view it taps ({type(exc).__name__}), so its gradient was not recorded; the user's computation "
                    "ran unchanged. Gradients w.r.t. the output are recorded as usual.")
                return t
            handle = self._handles.tensor(a, self._grad_hook(call, "grad_in", i, n))
            aliases.append(Alias(a, a._version, t, t.grad_fn, i, n, handle))
            return a

        new_args = _tree.map_leaves(alias, args)
        if not aliases:
            return None
        call.aliases = aliases
        return new_args

    def hook_outputs(self, call: Call, output: Any) -> None:
        """After the call: hook each output that needs grad (and re-hook inputs the call changed in place)."""
        if call.aliases:
            self._fix_inplace_inputs(call)
        outs = _tree.leaves(output)
        n = len(outs)
        for i, t in enumerate(outs):
            if t.requires_grad:
                self._handles.tensor(t, self._grad_hook(call, "grad_out", i, n))

    def _grad_hook(self, call: Call, field: str, i: int, n: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self.active:
                self._store_grad(call, field, i, n, grad)

        return hook

    def _store_grad(self, call: Call, field: str, i: int, n: int, grad: torch.Tensor) -> None:
        if self._listener is not None:
            self._listener.grad(call.where, "output" if field == "grad_out" else "input", i, n, grad)
        if not self._keep:
            return
        try:
            g = self._snap.copy(grad)
        except Untappable as why:
            setattr(call, f"{field}_error", str(why))
            return
        slots = getattr(call, field)
        if slots is None:
            slots = [None] * n
            setattr(call, field, slots)
        slots[i] = g if slots[i] is None else slots[i] + g  # repeated backward() accumulates, like .grad

    def _fix_inplace_inputs(self, call: Call) -> None:
        """The module changed an input in place: the alias's own hook is gone with the old view, so take the
        gradient where the in-place op hands it to the input's previous value instead."""
        for a, version, base, base_fn, i, n, handle in call.aliases or ():
            if a._version == version:
                continue
            handle.remove()
            node = base.grad_fn
            edges = node.next_functions if node is not None else ()
            if (node is not None and base_fn is not None and len(edges) >= 1 and edges[0][0] is base_fn
                    and a._version == version + 1):

                def node_hook(grad_inputs: tuple, grad_outputs: tuple, i: int = i, n: int = n) -> None:
                    if self.active and grad_inputs[0] is not None:
                        self._store_grad(call, "grad_in", i, n, grad_inputs[0])

                self._handles.tensor(node, node_hook)
            else:
                call.grad_in_error = (
                    "the module modified that input in place more than once (or through a path hookkit cannot "
                    "follow), so the gradient w.r.t. the value it received cannot be isolated. Use the "
                    "module's out-of-place form (e.g. inplace=False) for gradient capture."
                )
        call.aliases = None

    # -- an op's backward (``op_input_grads``) ---------------------------------------------------------------------
    def hook_op_backward(self, call: Call, in_nodes: tuple, output: Any) -> None:
        """Hook the autograd nodes this op made (not those of its inputs: ``x.contiguous()`` may return ``x``
        itself), to tell the listener what each one's backward passes on, right after it ran."""
        seen = {id(node) for node in in_nodes}  # (alive: in_nodes holds them)
        for t in _tree.leaves(output):
            node = t.grad_fn
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            self._handles.tensor(node, self._op_grad_in_hook(call))

    def _op_grad_in_hook(self, call: Call) -> Any:
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            listener = self._listener
            if self.active and listener is not None:
                n = len(grad_inputs)
                for i, g in enumerate(grad_inputs):
                    if g is not None:
                        listener.grad(call.where, "input", i, n, g)

        return hook

    # -- parameters (``param_grads``) ------------------------------------------------------------------------------
    def hook_params(self, module: nn.Module, names: list[str]) -> None:
        """Once a backward has accumulated into ``p.grad``, keep a copy of ``p.grad`` as it stands at the end of that
        backward, under every name of the module."""
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                continue

            def hook(param: torch.Tensor, pname: str = pname) -> None:
                if self.active and param.grad is not None:
                    self._param_grad_arrived(param, pname, names)

            self._handles.param_grad(p, hook)

    def _param_grad_arrived(self, param: torch.Tensor, pname: str, names: list[str]) -> None:
        """``register_post_accumulate_grad_hook`` runs when autograd has accumulated this rank's own gradient into
        ``.grad``: under DDP that is before the all-reduce, whose average the reducer writes into ``.grad`` in an
        end-of-backward callback. So the copy is taken at the end of the backward instead, after the callbacks queued
        before it: two hops, since the first of ours may be queued (at the first parameter's hook) before DDP's (at
        its last bucket's). Under FSDP2, which calls the hook itself once the reduce-scattered shard is in
        ``.grad``, the end of the backward holds that same shard. Outside any backward (a hook called by hand),
        ``.grad`` as it stands."""
        task = current_graph_task_id()
        if task == -1:
            self._store_param_grads([(param, pname, names)])
            return
        with self._param_lock:
            first = task not in self._param_waiting
            self._param_waiting.setdefault(task, []).append((param, pname, names))
        if first:
            after_gradient_reduction(lambda: self._end_of_backward(task))

    def _end_of_backward(self, task: int) -> None:
        with self._param_lock:
            waiting = self._param_waiting.pop(task, [])
        if self.active:
            self._store_param_grads(waiting)

    def _store_param_grads(self, arrived: list[tuple[torch.Tensor, str, list[str]]]) -> None:
        copies: dict[int, torch.Tensor] = {}  # a parameter shared by several selected modules is copied once
        for param, pname, names in arrived:
            grad = param.grad
            if grad is None:  # set to None after the hook (by a callback of the user's)
                continue
            if self._listener is not None:
                for n in names:
                    self._listener.param_grad(n, pname, grad)
            if not self._keep:  # the listener read it; nothing is stored, so nothing is copied
                continue
            g = copies.get(id(param))
            if g is None:
                g = copies[id(param)] = self._snap.copy(grad)
            for n in names:
                self._recording.param_grads.setdefault(n, {})[pname] = g
