"""The hook engine: registers hookkit's hooks on the selected modules, records each call, taps gradients, and tells
its listener; owns every handle it made and removes exactly those.

``capture()`` (``record/capture.py``) is the engine plus stores that read its ``Recording``. ``trace()`` and
``check_finite()`` (``debug/trace.py``) and ``extract()`` (``extraction/extract.py``) give the engine a listener at
construction and ask it to keep nothing. Values are snapshotted through ``core.snapshot.Snapshotter``; torch internals
come from ``core.compat``.

Taps, two kinds: module hooks (``_attach_module``: a pre-hook that opens a ``Call``, a forward hook that records
it, an always-called hook that closes it; the default capture's one hook is ``core.fastpath.fast_hook``), and op taps
(``core.ops.OpTaps``: a torch function mode entered inside the modules whose ops were asked for), which record
through ``node_begin`` / ``node_end`` into the same ``Recording`` with the same ``Call`` records (``core.calls``),
snapshotter and listener (``core.listener.Listener``), and register their hooks in the same ``HandleGroup``. Both
finish a call through ``core.fastpath.store_output``; gradients are tapped by ``core.gradtaps.GradTaps``; a forward
that activation checkpointing recomputes is skipped (``core.checkpointing.recomputing``). Stored tensors that were
not copied are watched (``core.snapshot.Watch``): the op taps copy one just before an in-place op writes into it
(copy-on-write).

Forwards: two hooks on the model count its forwards, and each ``Call`` keeps the number of the forward it ran in,
so that the stores read ``name`` as FX does (a module's first call in the last forward; ``name_1`` its second)
and listeners are told each call's index within its forward.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import UsageError
from hookkit.core import tree as _tree
from hookkit.core.calls import Call, Recording, Where, count_slots
from hookkit.core.checkpointing import recomputing
from hookkit.core.compat import dynamo_has_compiled, eager, hook_guards
from hookkit.core.fastpath import NOT_WATCHED, Forwards, fast_hook, store_output
from hookkit.core.gradtaps import GradTaps
from hookkit.core.handles import HandleGroup
from hookkit.core.listener import Listener
from hookkit.core.ops import OpTaps, writer_roots
from hookkit.core.select import Layers, Selection, resolve_nodes, unwrap
from hookkit.core.snapshot import Snapshotter, To, Watch

# Call, Recording, Where and count_slots live in core.calls; named here too for the modules that read them with it.
__all__ = ["Engine", "Options", "Call", "Recording", "Listener", "Where", "StopForward", "count_slots"]


@dataclass(slots=True)
class Options:
    """What an engine records. ``keep=False`` stores nothing (the listener has what it needs); ``inputs`` /
    ``grads`` / ``param_grads``: also inputs, gradients, parameter gradients; ``detach`` / ``clone`` / ``to``: how
    values are stored (``core.snapshot.Snapshotter``); ``stop``: end the forward once every selected layer ran;
    ``ops``: tap every op for the listener; ``op_input_grads``: also tell the listener the gradients each tapped op's
    backward passes to its inputs (``which="input"``, taken where the op's autograd node hands them on), so that it
    can name the op whose backward made a gradient non-finite."""

    keep: bool = True
    inputs: bool = False
    grads: bool = False
    detach: bool = True
    clone: bool = False
    to: To = None
    stop: bool = False
    param_grads: bool = False
    ops: bool = False
    op_input_grads: bool = False


class StopForward(Exception):
    """Raised by a hook to end the forward pass early (``stop=True``); swallowed by the block that owns it."""

    def __init__(self, owner: Engine) -> None:
        super().__init__("hookkit stop=True: every selected layer has run")
        self.owner = owner


class Engine:
    """Hooks on the selected modules of one model, for one ``with`` block; see the module docstring.

    ``listener`` is told of every event; the keyword switches are ``Options``' fields.
    """

    def __init__(self, model: nn.Module, layers: Layers | Selection, *, listener: Listener | None = None,
                 **switches: Any) -> None:
        opts = self._opts = Options(**switches)
        # checks the model; raises before anything is registered
        walked: list[tuple[str, nn.Module]] = []
        self._selected, nodes = resolve_nodes(model, layers, walked)
        self._snap = Snapshotter(detach=opts.detach, clone=opts.clone, to=opts.to)
        self._listener = listener
        inner, wrapped = unwrap(model)
        self.recording = Recording(self._selected, nodes, opts.inputs, opts.grads, wrapped)
        self._handles = HandleGroup()
        self._grads = GradTaps(handles=self._handles, snap=self._snap, recording=self.recording, listener=listener,
                               keep=opts.keep)
        self._op_input_grads = opts.op_input_grads and listener is not None
        self._entered = False
        self._ran: set[Any] = set()
        self._n_selected = len(self._selected) + len(nodes)
        self._node_started: dict[str, tuple[int, int]] = {}  # node name -> (forward, calls so far in it)
        # Forwards: a forward is one call of the model (inside DataParallel / DDP, of the model they wrap). Each
        # call is recorded with its forward's number, so that a store reads a module's first call in the last
        # forward (FX's ``name``; ``name_1`` is its second) and a listener is told each call's index within its
        # forward. A call made outside any forward of the model (a submodule called directly) is one of its own.
        self._root: nn.Module | None = inner
        self._ids = itertools.count(1)
        self._fw = Forwards()
        self._dynamo_guard: Callable[[], None] | None = None
        # Copy-on-write: stored tensors that were not copied are watched, and copied before an in-place write
        # inside the modules whose forward may write (none in a stack of torch.nn layers: then nothing is watched,
        # and a write from elsewhere is still caught on read by the version counter).
        writers = writer_roots(walked) if opts.keep and not opts.clone else []
        self._watch = Watch() if writers else None
        self._watched = self._watch.outputs if self._watch is not None else NOT_WATCHED
        self._ops: OpTaps | None = None
        if nodes or opts.ops or writers:
            self._ops = OpTaps(inner, handles=self._handles, wanted=nodes, name_all=opts.ops, tap_all=opts.ops,
                               watch=self._watch, writers=writers, begin=self.node_begin, end=self.node_end)

    @property
    def copies(self) -> int:
        """How many stored tensors were copied because an in-place op was about to write into them."""
        return self._watch.copies if self._watch is not None else 0

    @property
    def active(self) -> bool:
        return self._grads.active

    def __enter__(self) -> Engine:
        if self._entered:
            raise UsageError("a hookkit block can be entered once; call hookkit.capture(...) (or trace, ...) again "
                               "for a new block.")
        self._entered = True
        self._dynamo_guard = hook_guards.acquire()
        try:
            for module, names in self._selected.items():
                self._attach_module(module, names)
            if self._ops is not None:
                self._ops.attach()
            self._attach_root()
        except BaseException:
            self.remove()
            raise
        self._grads.active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        """Remove everything; swallow this engine's own ``StopForward``."""
        self.remove()
        return isinstance(exc, StopForward) and exc.owner is self

    def remove(self) -> None:
        """Remove every hook this engine made; safe to call twice."""
        self._grads.close()
        self._handles.remove()
        if self._ops is not None:
            self._ops.close()
            self._ops = None  # it holds the model
        if self._watch is not None:
            self._watch.clear()
        restore, self._dynamo_guard = self._dynamo_guard, None
        if restore is not None:
            restore()
        self._selected = {}  # what was recorded outlives the block; the model's modules must not
        self._root = None
        self._listener = None  # trace / check_finite hold this engine: no cycle for the garbage collector

    def warn_if_compiled_code_skipped_hooks(self, what: str) -> None:
        """A block that recorded nothing while torch.compile has compiled code in this process: say why that may
        be, rather than return nothing silently."""
        if not self.recording.order and dynamo_has_compiled():
            warnings.warn(
                f"{what} recorded nothing: no selected layer ran inside the block. If you called a "
                "torch.compile'd version of this model, its compiled code skips hooks added after it was compiled "
                "(torch does not guard on hooks by default). Call the eager model inside the block, or enter the "
                "capture before the first call of the compiled model.",
                stacklevel=3,
            )

    # -- forwards ------------------------------------------------------------------------------------------------
    def _attach_root(self) -> None:
        """Count the model's forwards: a pre-hook that runs before every other (prepended, registered last) and an
        always-called forward hook that runs after every other (registered last)."""
        root, fw, ids = self._root, self._fw, self._ids
        assert root is not None  # noqa: S101 - removed only by remove()

        def begin(module: nn.Module, args: tuple) -> None:
            if recomputing():
                return  # activation checkpointing recomputing a forward: not a new one
            if fw.depth == 0:
                fw.current = next(ids)
            fw.depth += 1

        def end(module: nn.Module, args: tuple, output: Any) -> None:
            if fw.depth and not recomputing():
                fw.depth -= 1
                if fw.depth == 0:
                    fw.current = 0

        self._handles.forward_pre(root, eager(begin), prepend=True)
        self._handles.forward(root, eager(end), always_call=True)

    def _forward_id(self) -> int:
        """The number of the forward a call starting now belongs to (a new one outside every forward)."""
        return self._fw.current or next(self._ids)

    # -- module taps ---------------------------------------------------------------------------------------------
    def _attach_module(self, module: nn.Module, names: list[str]) -> None:
        opts = self._opts
        calls = self.recording.records[names[0]]
        pending: list[Call] = []
        paired = bool(opts.inputs or opts.grads or self._listener)
        if paired:
            self._handles.forward_pre(module, eager(self._pre_hook(names[0], pending)), with_kwargs=True)
        if not (paired or opts.stop or self._snap.custom):
            hook = fast_hook(names, calls, self.recording.order, self._snap, self._watched, self._fw, self._ids)
        else:
            hook = self._forward_hook(names, calls, pending)
        self._handles.forward(module, eager(hook))
        if paired:
            self._handles.forward(module, eager(_end_of_call(pending)), always_call=True)
        if opts.param_grads:
            self._grads.hook_params(module, names)

    def _pre_hook(self, name: str, pending: list[Call]) -> Any:
        want_inputs, want_grads = self._opts.inputs, self._opts.grads
        listener = self._listener
        started = [0, 0]  # the forward of the module's last call, and its calls in that forward so far

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if recomputing():
                return None  # activation checkpointing recomputing a forward: not a new call
            forward = self._forward_id()
            call = Call(forward=forward)
            pending.append(call)
            if listener is not None:
                if started[0] != forward:
                    started[0], started[1] = forward, 0
                call.where = (name, module, started[1])
                started[1] += 1
                listener.forward_pre(call.where, args, kwargs)
            if want_inputs:
                self._store_inputs(call, args, kwargs)
            if want_grads and torch.is_grad_enabled():
                new_args = self._grads.alias_inputs(call, args)
                if new_args is not None:
                    return new_args, kwargs
            return None

        return pre_hook

    def _store_inputs(self, call: Call, args: tuple, kwargs: dict) -> None:
        snap = self._snap
        guards: list = []
        call.args = _tree.map_leaves(lambda t: snap.tensor(t, guards), args, opaque=_tree.NotStored)
        call.kwargs = _tree.map_leaves(lambda t: snap.tensor(t, guards), kwargs, opaque=_tree.NotStored)
        call.in_guards = guards
        if guards and self._watch is not None:
            self._watch.inputs.append(call)

    def _forward_hook(self, names: list[str], calls: list[Call], pending: list[Call]) -> Any:
        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if recomputing():
                return  # activation checkpointing recomputing a forward: not a new call
            call = pending[-1] if pending else Call(forward=self._forward_id())  # popped by _end_of_call, next
            self._finish(call, names, calls, id(module), args, output)

        return forward_hook

    def _finish(self, call: Call, names: list[str], calls: list[Call], key: Any, args: tuple, output: Any) -> None:
        """Record a call's output, tell the listener, hook its gradients, and stop when everything selected ran."""
        if self._opts.keep:
            store_output(call, output, names, calls, self.recording.order, self._snap, self._watched)
        if self._listener is not None:
            self._listener.forward(call.where, args, output)
        if self._opts.grads and torch.is_grad_enabled():
            self._grads.hook_outputs(call, output)
        if self._opts.stop:
            self._ran.add(key)
            if len(self._ran) == self._n_selected:
                raise StopForward(self)

    # -- op taps (``core.ops``) ---------------------------------------------------------------------------------------
    def node_begin(self, name: str, site: Any, args: tuple, kwargs: dict,
                   writes: tuple = ()) -> tuple[Call, tuple | None]:
        """An op (or a repeated call of a leaf module) named ``name`` is about to run: open its ``Call``; returns
        arguments to run it with instead (views tapped for input gradients), or None. ``writes``: the tensors an
        in-place op writes into (``out += identity``)."""
        forward = self._forward_id()
        call = Call(forward=forward)
        last, i = self._node_started.get(name, (0, 0))
        if last != forward:
            i = 0
        self._node_started[name] = (forward, i + 1)
        call.where = (name, site, i)
        if self._listener is not None:
            self._listener.forward_pre(call.where, args, kwargs)
        if self._opts.inputs:
            self._store_inputs(call, args, kwargs)
        if not (self._opts.grads and torch.is_grad_enabled()):
            return call, None
        if name not in self.recording.records:
            if self._op_input_grads:
                call.in_nodes = tuple(t.grad_fn for t in _tree.leaves((args, kwargs)) if t.grad_fn is not None)
            return call, None
        if writes:
            # Writing through a tapped view would leave the output's gradient hook on a view that the next
            # in-place op (the block's ReLU(inplace=True)) rebases, and the gradient would never arrive.
            call.grad_in_error = (
                f"{name!r} writes into its input in place, so the gradient w.r.t. the value it received is not "
                "recorded (its output's gradient is: read grads[...]). For input gradients, capture an "
                "out-of-place copy of the model.")
            return call, None
        return call, self._grads.alias_inputs(call, args)  # (not for every op a listener sees: only those asked for)

    def node_end(self, call: Call, args: tuple, output: Any) -> None:
        name = call.where[0]
        in_nodes, call.in_nodes = call.in_nodes, None
        self._finish(call, [name], self.recording.records.get(name, []), name, args, output)
        if in_nodes is not None:
            self._grads.hook_op_backward(call, in_nodes, output)


def _end_of_call(pending: list[Call]) -> Any:
    """A forward hook run after the recording one, and also when the forward raised (``always_call``): it ends the
    call the pre-hook opened. A module that calls itself and catches a failing inner call thus pairs each output
    with its own inputs: the failed call is dropped here, so the outer call's hook finds its own record on top."""

    def end_of_call(module: nn.Module, args: tuple, output: Any) -> None:
        if pending and not recomputing():
            pending.pop()

    return end_of_call
