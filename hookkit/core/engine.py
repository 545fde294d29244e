"""The hook engine: registers hookkit's hooks on the selected modules, records each call, taps gradients, and tells
its listener; owns every handle it made and removes exactly those.

``capture()`` (``record/capture.py``) is the engine plus stores that read its ``Recording``. ``trace()`` and
``check_finite()`` (``debug/trace.py``) and ``extract()`` (``extraction/extract.py``) give the engine a listener at
construction and ask it to keep nothing. Values are snapshotted through ``core.snapshot.Snapshotter``; torch internals
come from ``core.compat``.

Taps, two kinds: module hooks (``_attach_module``: a pre-hook that opens a ``Call``, a forward hook that records
it, an always-called hook that closes it, tensor hooks for gradients), and op taps (``core.ops.OpTaps``: a torch
function mode entered inside the modules whose ops were asked for), which record through ``node_begin`` /
``node_end`` into the same ``Recording`` with the same ``Call`` records, snapshotter and listener, and register their
hooks in the same ``HandleGroup``. Stored tensors that were not copied are watched (``core.snapshot.Watch``): the op
taps copy one just before an in-place op writes into it (copy-on-write).

Forwards: two hooks on the model count its forwards, and each ``Call`` keeps the number of the forward it ran in,
so that the stores read ``name`` as FX does (a module's first call in the last forward; ``name_1`` its second)
and listeners are told each call's index within its forward.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn as nn

from hookkit.core import tree as _tree
from hookkit.core.compat import (
    after_gradient_reduction,
    current_graph_task_id,
    dynamo_config,
    dynamo_has_compiled,
    eager,
)
from hookkit.core.handles import HandleGroup
from hookkit.core.ops import OpTaps, writer_roots
from hookkit.core.select import Layers, Selection, resolve_nodes, unwrap
from hookkit.core.snapshot import Snapshotter, To, Untappable, Watch

__all__ = ["Engine", "Call", "Recording", "Listener", "Where", "StopForward", "count_slots"]

Where = tuple  # (layer name, module, index of this call among the module's calls in its forward)


class Listener(Protocol):
    """Told of every hook event as it happens (how ``trace``, ``check_finite`` and ``extract`` are built)."""

    def forward_pre(self, where: Where, args: tuple, kwargs: dict) -> None: ...

    def forward(self, where: Where, args: tuple, output: Any) -> None: ...

    def grad(self, where: Where, which: str, i: int, n: int, grad: torch.Tensor) -> None: ...


class _Alias(NamedTuple):
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
    aliases: list[_Alias] | None
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


class _HookGuards:
    """While any capture is open, make torch.compile guard on module hooks, so that code compiled inside a block
    sees them (and is recompiled when they change); only when dynamo is already in use.

    Counted rather than saved per block: captures may be exited in any order (A opens, B opens, A exits, B
    exits), and dynamo's flag must be back at the user's value exactly when the last one closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._saved: Any = None
        self._config: Any = None

    def acquire(self) -> Callable[[], None] | None:
        config = dynamo_config()
        if config is None:
            return None
        with self._lock:
            if self._open == 0:
                self._config, self._saved = config, config.skip_nnmodule_hook_guards
            self._open += 1
            config.skip_nnmodule_hook_guards = False
        return self._release

    def _release(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                self._config.skip_nnmodule_hook_guards = self._saved
                self._config = self._saved = None


_hook_guards = _HookGuards()




class _Forwards(threading.local):
    """Which forward of the model the running code belongs to, per thread (DataParallel runs its replicas in
    threads): ``current`` while ``depth`` (open calls of the model) is above 0, else 0."""

    def __init__(self) -> None:
        self.depth = 0
        self.current = 0


class StopForward(Exception):
    """Raised by a hook to end the forward pass early (``stop=True``); swallowed by the block that owns it."""

    def __init__(self, owner: Engine) -> None:
        super().__init__("hookkit stop=True: every selected layer has run")
        self.owner = owner


class Engine:
    """Hooks on the selected modules of one model, for one ``with`` block; see the module docstring.

    ``listener`` is told of every event; ``keep=False`` stores nothing (the listener has what it needs).
    ``op_input_grads``: also tell the listener the gradients each tapped op's backward passes to its inputs
    (``which="input"``, taken where the op's autograd node hands them on), for every op it is told of, so that it
    can name the op whose backward made a gradient non-finite.
    """

    def __init__(self, model: nn.Module, layers: Layers | Selection, *, listener: Listener | None = None,
                 keep: bool = True,
                 inputs: bool = False, grads: bool = False, detach: bool = True, clone: bool = False, to: To = None,
                 stop: bool = False, param_grads: bool = False, ops: bool = False,
                 op_input_grads: bool = False) -> None:
        # checks the model; raises before anything is registered
        walked: list[tuple[str, nn.Module]] = []
        self._selected, nodes = resolve_nodes(model, layers, walked)
        self._snap = Snapshotter(detach=detach, clone=clone, to=to)
        self._listener = listener
        self._keep = keep
        self._want_inputs = bool(inputs)
        self._want_grads = bool(grads)
        self._want_param_grads = bool(param_grads)
        # param_grads: per running backward (its graph task), the parameters whose gradient arrived in it
        self._param_waiting: dict[int, list[tuple[torch.Tensor, str, list[str]]]] = {}
        self._param_lock = threading.Lock()
        self._stop = bool(stop)
        self._op_input_grads = bool(op_input_grads) and listener is not None
        inner, wrapped = unwrap(model)
        self.recording = Recording(self._selected, nodes, self._want_inputs, self._want_grads, wrapped)
        self._handles = HandleGroup()
        self._entered = False
        self._active = False
        self._ran: set[Any] = set()
        self._n_selected = len(self._selected) + len(nodes)
        self._node_started: dict[str, tuple[int, int]] = {}  # node name -> (forward, calls so far in it)
        # Forwards: a forward is one call of the model (inside DataParallel / DDP, of the model they wrap). Each
        # call is recorded with its forward's number, so that a store reads a module's first call in the last
        # forward (FX's ``name``; ``name_1`` is its second) and a listener is told each call's index within its
        # forward. A call made outside any forward of the model (a submodule called directly) is one of its own.
        self._root: nn.Module | None = inner
        self._ids = itertools.count(1)
        self._fw = _Forwards()
        self._dynamo_guard: Callable[[], None] | None = None
        # Copy-on-write: stored tensors that were not copied are watched, and copied before an in-place write
        # inside the modules whose forward may write (none in a stack of torch.nn layers: then nothing is watched,
        # and a write from elsewhere is still caught on read by the version counter).
        writers = writer_roots(walked) if keep and not clone else []
        self._watch = Watch() if writers else None
        self._ops: OpTaps | None = None
        if nodes or ops or writers:
            self._ops = OpTaps(inner, handles=self._handles, wanted=nodes, name_all=ops, tap_all=ops,
                               watch=self._watch, writers=writers, begin=self.node_begin, end=self.node_end)

    @property
    def copies(self) -> int:
        """How many stored tensors were copied because an in-place op was about to write into them."""
        return self._watch.copies if self._watch is not None else 0

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self) -> Engine:
        if self._entered:
            raise RuntimeError("a hookkit block can be entered once; call hookkit.capture(...) (or trace, ...) again "
                               "for a new block.")
        self._entered = True
        self._dynamo_guard = _hook_guards.acquire()
        try:
            for module, names in self._selected.items():
                self._attach_module(module, names)
            if self._ops is not None:
                self._ops.attach()
            self._attach_root()
        except BaseException:
            self.remove()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        """Remove everything; swallow this engine's own ``StopForward``."""
        self.remove()
        return isinstance(exc, StopForward) and exc.owner is self

    def remove(self) -> None:
        """Remove every hook this engine made; safe to call twice."""
        self._active = False
        self._handles.remove()
        with self._param_lock:
            self._param_waiting.clear()  # a backward that raised never reached its end: hold no parameter
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
            if current_graph_task_id() != -1:
                return  # activation checkpointing recomputing a forward: not a new one
            if fw.depth == 0:
                fw.current = next(ids)
            fw.depth += 1

        def end(module: nn.Module, args: tuple, output: Any) -> None:
            if current_graph_task_id() == -1 and fw.depth:
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
        calls = self.recording.records[names[0]]
        pending: list[Call] = []
        paired = bool(self._want_inputs or self._want_grads or self._listener)
        if paired:
            self._handles.forward_pre(module, eager(self._pre_hook(names[0], pending)), with_kwargs=True)
        fast = not (self._want_inputs or self._want_grads or self._stop or self._snap.custom or self._listener)
        hook = self._fast_hook(names, calls) if fast else self._forward_hook(names, calls, pending)
        self._handles.forward(module, eager(hook))
        if paired:
            self._handles.forward(module, eager(_end_of_call(pending)), always_call=True)
        if self._want_param_grads:
            self._hook_params(module, names)

    def _hook_params(self, module: nn.Module, names: list[str]) -> None:
        """``param_grads``: once a backward has accumulated into ``p.grad``, keep a copy of ``p.grad`` as it stands at
        the end of that backward, under every name of the module."""
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                continue

            def hook(param: torch.Tensor, pname: str = pname) -> None:
                if self._active and param.grad is not None:
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
        if self._active:
            self._store_param_grads(waiting)

    def _store_param_grads(self, arrived: list[tuple[torch.Tensor, str, list[str]]]) -> None:
        copies: dict[int, torch.Tensor] = {}  # a parameter shared by several selected modules is copied once
        for param, pname, names in arrived:
            grad = param.grad
            if grad is None:  # set to None after the hook (by a callback of the user's)
                continue
            g = copies.get(id(param))
            if g is None:
                g = copies[id(param)] = self._snap.copy(grad)
            for n in names:
                self.recording.param_grads.setdefault(n, {})[pname] = g

    def _pre_hook(self, name: str, pending: list[Call]) -> Any:
        want_inputs = self._want_inputs
        want_grads = self._want_grads
        listener = self._listener
        started = [0, 0]  # the forward of the module's last call, and its calls in that forward so far

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if current_graph_task_id() != -1:
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
                new_args = self._alias_inputs(call, args)
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

    def _alias_inputs(self, call: Call, args: tuple) -> tuple | None:
        """Give each positional input that needs grad a view of its own, hooked, so that the gradient this module
        sends back to it can be told apart from what other users of the same tensor send."""
        # Top-level arguments that are not tensors or containers (ints, flags) get None, as in torch's grad_input.
        call.grad_in_skel = _tree.skeleton(tuple(a if isinstance(a, torch.Tensor) or _tree.is_container(a) else None
                                                 for a in args))
        n = count_slots(call.grad_in_skel)
        aliases: list = []
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
            handle = self._handles.tensor(a, self._grad_in_hook(call, i, n))
            aliases.append(_Alias(a, a._version, t, t.grad_fn, i, n, handle))
            return a

        new_args = _tree.map_leaves(alias, args)
        if not aliases:
            return None
        call.aliases = aliases
        return new_args

    def _grad_in_hook(self, call: Call, i: int, n: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self._active:
                self._store_grad(call, "grad_in", i, n, grad)

        return hook

    def _grad_out_hook(self, call: Call, i: int, n: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self._active:
                self._store_grad(call, "grad_out", i, n, grad)

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
                    if self._active and grad_inputs[0] is not None:
                        self._store_grad(call, "grad_in", i, n, grad_inputs[0])

                self._handles.tensor(node, node_hook)
            else:
                call.grad_in_error = (
                    "the module modified that input in place more than once (or through a path hookkit cannot "
                    "follow), so the gradient w.r.t. the value it received cannot be isolated. Use the "
                    "module's out-of-place form (e.g. inplace=False) for gradient capture."
                )
        call.aliases = None

    def _fast_hook(self, names: list[str], calls: list[Any]) -> Any:
        """The default case (outputs only, no options), kept short: a hook runs on every call of the module."""
        order = self.recording.order
        snap = self._snap
        tensor = torch.Tensor
        watched = self._watch.outputs if self._watch is not None else _NOT_WATCHED
        fw, ids = self._fw, self._ids

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if current_graph_task_id() != -1:
                return  # activation checkpointing recomputing a forward: not a new call
            if not calls:
                order.extend(names)
            forward = fw.current or next(ids)
            if type(output) is tensor:
                t = output.detach() if output.requires_grad else output  # no graph, nothing to detach
                if t.is_inference():
                    calls.append(Call(t.clone(), None, forward))  # keeps no version counter: copy
                else:
                    call = Call(t, t._version, forward)
                    calls.append(call)
                    watched.append(call)
            else:
                call = Call(None, None, forward)
                call.output, call.guards = snap(output)
                calls.append(call)
                if call.guards:
                    watched.append(call)

        return forward_hook

    def _forward_hook(self, names: list[str], calls: list[Call], pending: list[Call]) -> Any:
        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if current_graph_task_id() != -1:
                return  # activation checkpointing recomputing a forward: not a new call
            call = pending[-1] if pending else Call(forward=self._forward_id())  # popped by _end_of_call, next
            self._finish(call, names, calls, id(module), args, output)

        return forward_hook

    def _finish(self, call: Call, names: list[str], calls: list[Call], key: Any, args: tuple, output: Any) -> None:
        """Record a call's output, tell the listener, hook its gradients, and stop when everything selected ran."""
        if self._keep:
            call.output, call.guards = self._snap(output)
            if not calls:
                self.recording.order.extend(names)
            calls.append(call)
            if call.guards and self._watch is not None:
                self._watch.outputs.append(call)
        if self._listener is not None:
            self._listener.forward(call.where, args, output)
        if self._want_grads and torch.is_grad_enabled():
            if call.aliases:
                self._fix_inplace_inputs(call)
            outs = _tree.leaves(output)
            n = len(outs)
            for i, t in enumerate(outs):
                if t.requires_grad:
                    self._handles.tensor(t, self._grad_out_hook(call, i, n))
        if self._stop:
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
        if self._want_inputs:
            self._store_inputs(call, args, kwargs)
        if not (self._want_grads and torch.is_grad_enabled()):
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
        return call, self._alias_inputs(call, args)  # (not for every op a listener sees: only those asked for)

    def node_end(self, call: Call, args: tuple, output: Any) -> None:
        name = call.where[0]
        in_nodes, call.in_nodes = call.in_nodes, None
        self._finish(call, [name], self.recording.records.get(name, []), name, args, output)
        if in_nodes is not None:
            self._hook_op_backward(call, in_nodes, output)

    def _hook_op_backward(self, call: Call, in_nodes: tuple, output: Any) -> None:
        """``op_input_grads``: hook the autograd nodes this op made (not those of its inputs: ``x.contiguous()`` may
        return ``x`` itself), to tell the listener what each one's backward passes on, right after it ran."""
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
            if self._active and listener is not None:
                n = len(grad_inputs)
                for i, g in enumerate(grad_inputs):
                    if g is not None:
                        listener.grad(call.where, "input", i, n, g)

        return hook

class _NotWatched:
    """Stands for ``Watch.outputs`` where nothing is watched: the fast hook appends without a test."""

    __slots__ = ()

    def append(self, call: Call) -> None:
        pass


_NOT_WATCHED = _NotWatched()


def _end_of_call(pending: list[Call]) -> Any:
    """A forward hook run after the recording one, and also when the forward raised (``always_call``): it ends the
    call the pre-hook opened. A module that calls itself and catches a failing inner call thus pairs each output
    with its own inputs: the failed call is dropped here, so the outer call's hook finds its own record on top."""

    def end_of_call(module: nn.Module, args: tuple, output: Any) -> None:
        if current_graph_task_id() == -1 and pending:
            pending.pop()

    return end_of_call


def count_slots(skel: Any) -> int:
    """How many slots ``core.tree.skeleton`` left in ``skel``."""
    n = 0

    def count(_s: Any) -> None:
        nonlocal n
        n += 1

    _tree.map_leaves(count, skel, leaf_type=_tree._Slot)
    return n
