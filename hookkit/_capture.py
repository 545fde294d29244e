"""``capture()``: record what modules produced (and took in, and got as gradients), keyed by name."""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any, Callable, Iterator, Protocol, Union

import torch
import torch.nn as nn

from . import _tree
from ._errors import GradientUnavailableError, ModifiedInPlaceError, NotRecordedError
from ._handles import HandleGroup
from ._select import Layers, resolve, unwrap

__all__ = ["capture", "Capture", "Store", "concat_calls"]

To = Union[None, str, torch.device, torch.dtype, tuple, list]

# -1 unless autograd is running a backward pass: a forward call then is activation checkpointing recomputing it.
in_backward = torch._C._current_graph_task_id


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
        config = getattr(sys.modules.get("torch._dynamo"), "config", None)
        if config is None or not hasattr(config, "skip_nnmodule_hook_guards"):
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


def _dynamo_has_compiled() -> bool:
    """Whether torch.compile has compiled any frame in this process: only then can a block that recorded nothing
    be explained by compiled code skipping hooks. (Importing torchvision imports dynamo, so being imported is no
    sign.)"""
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    return bool(counters) and counters.get("frames", {}).get("ok", 0) > 0


class _StopForward(Exception):
    """Raised by a hook to end the forward pass early; swallowed by the capture that raised it."""

    def __init__(self, owner: "Capture") -> None:
        super().__init__("hookkit stop=True: every selected layer has run")
        self.owner = owner


class _Call:
    """Everything recorded about one forward call of one module."""

    __slots__ = ("output", "guards", "args", "kwargs", "in_guards", "grad_out", "grad_in", "grad_in_skel",
                 "grad_in_error", "grad_out_error", "aliases", "where")

    def __init__(self) -> None:
        self.output: Any = None
        self.guards: Any = ()
        self.args: Any = None
        self.kwargs: Any = None
        self.in_guards: Any = ()
        self.grad_out: list[Any] | None = None  # one slot per output tensor, once a gradient arrived
        self.grad_in: list[Any] | None = None  # one slot per positional input tensor
        self.grad_in_skel: Any = None
        self.grad_in_error: str | None = None
        self.grad_out_error: str | None = None  # why a gradient w.r.t. the output could not be stored
        self.aliases: Any = None  # (alias, version, base, base_grad_fn, slot, n_slots, handle) per aliased input
        self.where: Any = None  # (name, module, call index), for a listener


class _Listener(Protocol):
    """Told of every hook event of a capture as it happens (how ``trace`` and ``check_finite`` are built)."""

    def forward_pre(self, where: tuple[str, nn.Module, int], args: tuple, kwargs: dict) -> None: ...

    def forward(self, where: tuple[str, nn.Module, int], args: tuple, output: Any) -> None: ...

    def grad(self, where: tuple[str, nn.Module, int], which: str, i: int, n: int, grad: torch.Tensor) -> None: ...


def _parse_to(to: To) -> tuple[torch.device | None, torch.dtype | None]:
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
                raise ValueError(f"to={to!r} names two dtypes ({dtype} and {item}); give one.")
            dtype = item
        elif isinstance(item, (str, torch.device)):
            try:
                new = torch.device(item)
            except RuntimeError:
                raise ValueError(f"to={to!r}: {item!r} is not a device; use e.g. 'cpu', 'cuda:0' or torch.float16.") from None
            if device is not None and new != device:
                raise ValueError(f"to={to!r} names two devices ({device} and {new}); give one.")
            device = new
        else:
            raise TypeError(
                f"to={to!r}: expected a device ('cpu', torch.device), a dtype (torch.float16) or a tuple of both."
            )
    if device is not None:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:  # no CUDA build / no such device index
            reason = " ".join(str(exc).split()).split(". ")[0]
            raise ValueError(f"to={to!r}: device {str(device)!r} is not available here ({reason}). Use 'cpu', or a "
                             "device this machine has.") from None
    return device, dtype


class _Snapshotter:
    """Turns live values into stored ones: detach, move / cast, clone, and guard against later in-place edits."""

    __slots__ = ("detach", "clone", "device", "dtype", "moves", "custom")

    def __init__(self, *, detach: bool, clone: bool, to: To) -> None:
        self.detach = detach
        self.clone = clone
        self.device, self.dtype = _parse_to(to)
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

        Raises ``_Untappable`` for a tensor that cannot be kept past the moment (functorch's wrappers)."""
        if _is_functorch(t):
            raise _Untappable(
                "it arrived inside a torch.func transform (grad, vjp, vmap...) as a functorch-wrapped tensor, which "
                "does not outlive the transform. Use the transform's own results, or call backward() outside it.")
        g = t.detach()
        if self.moves:
            g = g.to(device=self.device, dtype=self.dtype if g.is_floating_point() else None)
        if g.layout != torch.strided:  # sparse (e.g. nn.Embedding(sparse=True)) and others: no data pointer
            return g.clone()
        try:
            shared = g.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor kind without a storage of its own: copy to be safe
            shared = True
        return g.clone() if shared else g

    def __call__(self, value: Any) -> tuple[Any, Any]:
        guards: list = []
        if isinstance(value, torch.Tensor):
            return self.tensor(value, guards), guards
        return _tree.map_leaves(lambda t: self.tensor(t, guards), value, opaque=_tree.NotStored), guards


class _Untappable(Exception):
    """A tap met a tensor it cannot handle; it steps aside and the stores say why."""


def _is_functorch(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _check(guards: Any, what: str) -> None:
    for t, version in guards:
        if t._version != version:
            raise ModifiedInPlaceError(
                f"{what} was modified in place after it was captured (by a later in-place op such as "
                "ReLU(inplace=True) or `+=`), so the stored tensor no longer holds the value that was produced. "
                "Fix: capture(..., clone=True) stores a copy at hook time."
            )


def _refuse_unstored(value: Any, what: str) -> None:
    if isinstance(value, _tree.NotStored):
        raise NotRecordedError(
            f"{what} is a {value.type_name}, which hookkit cannot snapshot: it walks tensors inside tuples, lists, "
            "dicts, dataclasses and ModelOutput, and an object of another class, kept live, would hold its autograd "
            "graph and change with any later in-place op. Return one of those containers from the module, or read "
            "the object yourself with hookkit.hooks(...).")


def _unwrap(args: Any) -> Any:
    return args[0] if isinstance(args, tuple) and len(args) == 1 else args


class _State:
    """What the stores read: the records by name, the order of first calls, and what was asked for.

    Kept apart from ``Capture`` so that stores and capture form no reference cycle: a finished capture is freed
    by reference counting alone, not by the cyclic garbage collector.
    """

    __slots__ = ("records", "order", "selected_names", "want_inputs", "want_grads", "wrapped")

    def __init__(self, selected_names: list[str], want_inputs: bool, want_grads: bool) -> None:
        self.records: dict[str, list[Any]] = {}
        self.order: list[str] = []
        self.selected_names = selected_names
        self.want_inputs = want_inputs
        self.want_grads = want_grads
        self.wrapped = False

    def find(self, name: str) -> list[Any] | None:
        calls = self.records.get(name)
        if calls is None and self.wrapped and name.startswith("module."):
            calls = self.records.get(name[len("module."):])  # DataParallel / DDP: the prefix is optional
        return calls

    def calls_of(self, name: str, kind: str) -> list[Any]:
        if not isinstance(name, str):
            raise TypeError(f"layer names are strings, got {type(name).__name__} {name!r}.")
        calls = self.find(name)
        if calls is None:
            selected = self.selected_names
            shown = ", ".join(repr(n) for n in selected[:10]) + (", ..." if len(selected) > 10 else "")
            raise NotRecordedError(f"{name!r} is not one of the captured layers ({shown}).")
        if not calls:
            raise NotRecordedError(
                f"{name!r} never ran inside the capture block: nothing was recorded for it. "
                "Call the model inside the `with` block (and check that this layer is on the forward path)."
            )
        if kind in ("inputs", "kwargs") and not self.want_inputs:
            raise NotRecordedError(f"inputs were not recorded: pass inputs=True to capture() to read {kind}[{name!r}].")
        if kind in ("grads", "grad_inputs"):
            if not self.want_grads:
                raise NotRecordedError(
                    f"gradients were not recorded: pass grads=True to capture() to read {kind}[{name!r}].")
            if not _has(kind, calls):
                target = "output" if kind == "grads" else "input"
                raise NotRecordedError(
                    f"no gradient w.r.t. the {target} of {name!r} was recorded: no backward() reached it inside the "
                    "capture block (a backward after the block exits records nothing; the input or output may "
                    "also not require grad)."
                )
        return calls


def _has(kind: str, calls: list[Any]) -> bool:
    if not calls or (kind != "outputs" and type(calls[0]) is tuple):  # fast-path records hold outputs only
        return False
    if kind == "grads":
        return any(c.grad_out is not None or c.grad_out_error for c in calls)
    if kind == "grad_inputs":
        # Once backward reached a call's output, its input gradient is known: a tensor, or None where the
        # input needs no grad (the lecture's grad_input[0] for the first conv).
        return any(c.grad_in is not None or c.grad_in_error or c.grad_out is not None or c.grad_out_error
                   for c in calls)
    return True


class Store:
    """A read-only view of one kind of recorded value (outputs, inputs, kwargs, grads, grad_inputs), by layer name.

    ``store[name]`` is the value of the layer's last call, ``store.calls(name)`` every call in call order.
    """

    def __init__(self, state: "_State", kind: str) -> None:
        self._state = state
        self._kind = kind

    # -- Mapping-like surface ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        calls = self._state.calls_of(name, self._kind)
        return self._read(name, calls, len(calls) - 1)

    def calls(self, name: str) -> list[Any]:
        """Every recorded call of layer ``name``, in call order (aligned across outputs, inputs and grads)."""
        calls = self._state.calls_of(name, self._kind)
        return [self._read(name, calls, i) for i in range(len(calls))]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        """Names of the layers with a value of this kind, in order of first call."""
        records = self._state.records
        return [n for n in self._state.order if _has(self._kind, records[n])]

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self[n]) for n in self.keys()]

    def values(self) -> list[Any]:
        return [self[n] for n in self.keys()]

    def __contains__(self, name: object) -> bool:
        calls = self._state.find(name) if isinstance(name, str) else None
        return calls is not None and _has(self._kind, calls)

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"<hookkit {self._kind} of {len(self)} layer(s): {', '.join(self.keys())}>"

    # -- internals -----------------------------------------------------------------------------------------------
    def _read(self, name: str, calls: list[_Call], i: int) -> Any:
        call = calls[i]
        where = f"{name!r}" + (f" (call {i})" if len(calls) > 1 else "")
        kind = self._kind
        if type(call) is tuple:  # the fast path's (tensor, version) record
            t, version = call
            if version is not None and t._version != version:
                _check(((t, version),), f"the output of {where}")
            return t
        if kind == "outputs":
            _check(call.guards, f"the output of {where}")
            _refuse_unstored(call.output, f"the output of {where}")
            return call.output
        if kind == "inputs":
            _check(call.in_guards, f"the input of {where}")
            _refuse_unstored(_unwrap(call.args), f"the input of {where}")
            return _unwrap(call.args)
        if kind == "kwargs":
            _check(call.in_guards, f"a keyword input of {where}")
            return call.kwargs
        if kind == "grads":
            if call.grad_out_error:
                raise GradientUnavailableError(f"the gradient w.r.t. the output of {where} was not stored: "
                                               f"{call.grad_out_error}")
            if call.grad_out is None:
                return None
            return _tree.fill(_tree.skeleton(call.output), call.grad_out)
        # grad_inputs
        if call.grad_in_error:
            raise GradientUnavailableError(f"no gradient w.r.t. the input of {where}: {call.grad_in_error}")
        if call.grad_in is None:
            if call.grad_in_skel is None:
                return None
            return _unwrap(_tree.fill(call.grad_in_skel, [None] * _count_slots(call.grad_in_skel)))
        return _unwrap(_tree.fill(call.grad_in_skel, call.grad_in))


def _count_slots(skel: Any) -> int:
    n = 0

    def count(_s: Any) -> None:
        nonlocal n
        n += 1

    _tree.map_leaves(count, skel, leaf_type=_tree._Slot)
    return n


class Capture(Store):
    """What ``capture()`` yields: the outputs by layer name, plus ``inputs``, ``kwargs``, ``grads``, ``grad_inputs``.

    Stays readable after the ``with`` block; holds neither the model nor (with ``detach=True``) any autograd graph.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Layers,
        *,
        inputs: bool = False,
        grads: bool = False,
        detach: bool = True,
        clone: bool = False,
        to: To = None,
        stop: bool = False,
        param_grads: bool = False,
    ) -> None:
        self._selected = resolve(model, layers)  # checks the model; raises before anything is registered
        self._snap = _Snapshotter(detach=detach, clone=clone, to=to)
        self._want_inputs = bool(inputs)
        self._want_grads = bool(grads)
        self._want_param_grads = bool(param_grads)
        self._stop = bool(stop)
        state = _State([n for names in self._selected.values() for n in names], self._want_inputs, self._want_grads)
        state.wrapped = unwrap(model)[1]
        self._records = state.records
        for names in self._selected.values():
            calls: list[Any] = []
            for n in names:
                self._records[n] = calls  # aliases of a shared module share one list
        self._order = state.order
        self._handles = HandleGroup()
        self._entered = False
        self._active = False
        self._ran: set[int] = set()
        self._listener: _Listener | None = None  # set by trace() / check_finite()
        self._keep = True  # False: tell the listener, store nothing
        super().__init__(state, "outputs")
        self.inputs = Store(state, "inputs")
        self.kwargs = Store(state, "kwargs")
        self.grads = Store(state, "grads")
        self.grad_inputs = Store(state, "grad_inputs")
        self.param_grads: dict[str, dict[str, torch.Tensor]] = {}  # filled by backward passes inside the block

    # -- context manager -----------------------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        if self._entered:
            raise RuntimeError("a Capture can be entered once; call hookkit.capture(...) again for a new block.")
        self._entered = True
        try:
            for module, names in self._selected.items():
                calls = self._records[names[0]]
                pending: list[_Call] = []
                paired = bool(self._want_inputs or self._want_grads or self._listener)
                if paired:
                    self._handles.add(
                        module.register_forward_pre_hook(self._pre_hook(names[0], pending), with_kwargs=True)
                    )
                fast = not (self._want_inputs or self._want_grads or self._stop or self._snap.custom or self._listener)
                hook = self._fast_hook(names, calls) if fast else self._forward_hook(names, calls, pending)
                self._handles.add(module.register_forward_hook(hook))
                if paired:
                    self._handles.add(module.register_forward_hook(_end_of_call(pending), always_call=True))
                if self._want_param_grads:
                    self._hook_params(module, names)
        except BaseException:
            self._handles.remove()
            raise
        self._active = True
        self._dynamo_guard = _hook_guards.acquire()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.remove()
        if exc_type is None and not self._order and self._listener is None and _dynamo_has_compiled():
            warnings.warn(
                "hookkit.capture recorded nothing: no selected layer ran inside the block. If you called a "
                "torch.compile'd version of this model, its compiled code skips hooks added after it was compiled "
                "(torch does not guard on hooks by default). Call the eager model inside the block, or enter the "
                "capture before the first call of the compiled model.",
                stacklevel=2,
            )
        return isinstance(exc, _StopForward) and exc.owner is self

    def remove(self) -> None:
        """Remove every hook this capture made (``__exit__`` does this for you); safe to call twice."""
        self._active = False
        self._handles.remove()
        restore, self._dynamo_guard = getattr(self, "_dynamo_guard", None), None
        if restore is not None:
            restore()
        self._selected = {}  # the stores outlive the block; the model's modules must not

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _hook_params(self, module: nn.Module, names: list[str]) -> None:
        """``param_grads``: after each backward accumulates into ``p.grad``, keep a copy, under every name of the
        module (``register_post_accumulate_grad_hook``; the value is ``.grad`` as it stands then)."""
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                continue

            def hook(param: torch.Tensor, pname: str = pname) -> None:
                if self._active and param.grad is not None:
                    g = self._snap.copy(param.grad)
                    for n in names:
                        self.param_grads.setdefault(n, {})[pname] = g

            self._handles.add(p.register_post_accumulate_grad_hook(hook))

    def _pre_hook(self, name: str, pending: list[_Call]) -> Any:
        snap = self._snap
        want_inputs = self._want_inputs
        want_grads = self._want_grads
        listener = self._listener
        started = [0]

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if in_backward() != -1:
                return None  # activation checkpointing recomputing a forward: not a new call
            call = _Call()
            pending.append(call)
            if listener is not None:
                call.where = (name, module, started[0])
                started[0] += 1
                listener.forward_pre(call.where, args, kwargs)
            if want_inputs:
                guards: list = []
                call.args = _tree.map_leaves(lambda t: snap.tensor(t, guards), args, opaque=_tree.NotStored)
                call.kwargs = _tree.map_leaves(lambda t: snap.tensor(t, guards), kwargs, opaque=_tree.NotStored)
                call.in_guards = guards
            if want_grads and torch.is_grad_enabled():
                new_args = self._alias_inputs(call, args)
                if new_args is not None:
                    return new_args, kwargs
            return None

        return pre_hook

    def _alias_inputs(self, call: _Call, args: tuple) -> tuple | None:
        """Give each positional input that needs grad a view of its own, hooked, so that the gradient this module
        sends back to it can be told apart from what other users of the same tensor send."""
        # Top-level arguments that are not tensors or containers (ints, flags) get None, as in torch's grad_input.
        call.grad_in_skel = _tree.skeleton(tuple(a if isinstance(a, torch.Tensor) or _tree.is_container(a) else None
                                                 for a in args))
        n = _count_slots(call.grad_in_skel)
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
            handle = self._handles.add(a.register_hook(self._grad_in_hook(call, i, n)))
            aliases.append((a, a._version, t, t.grad_fn, i, n, handle))
            return a

        new_args = _tree.map_leaves(alias, args)
        if not aliases:
            return None
        call.aliases = aliases
        return new_args

    def _grad_in_hook(self, call: _Call, i: int, n: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self._active:
                self._store_grad(call, "grad_in", i, n, grad)

        return hook

    def _grad_out_hook(self, call: _Call, i: int, n: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self._active:
                self._store_grad(call, "grad_out", i, n, grad)

        return hook

    def _store_grad(self, call: _Call, field: str, i: int, n: int, grad: torch.Tensor) -> None:
        if self._listener is not None:
            self._listener.grad(call.where, "output" if field == "grad_out" else "input", i, n, grad)
        if not self._keep:
            return
        try:
            g = self._snap.copy(grad)
        except _Untappable as why:
            setattr(call, f"{field}_error", str(why))
            return
        slots = getattr(call, field)
        if slots is None:
            slots = [None] * n
            setattr(call, field, slots)
        slots[i] = g if slots[i] is None else slots[i] + g  # repeated backward() accumulates, like .grad

    def _fix_inplace_inputs(self, call: _Call) -> None:
        """The module changed an input in place: the alias's own hook is gone with the old view, so take the
        gradient where the in-place op hands it to the input's previous value instead."""
        for a, version, base, base_fn, i, n, handle in call.aliases:
            if a._version == version:
                continue
            handle.remove()
            node = base.grad_fn
            edges = node.next_functions if node is not None else ()
            if base_fn is not None and len(edges) >= 1 and edges[0][0] is base_fn and a._version == version + 1:

                def node_hook(grad_inputs: tuple, grad_outputs: tuple, i: int = i, n: int = n) -> None:
                    if self._active and grad_inputs[0] is not None:
                        self._store_grad(call, "grad_in", i, n, grad_inputs[0])

                self._handles.add(node.register_hook(node_hook))
            else:
                call.grad_in_error = (
                    "the module modified that input in place more than once (or through a path hookkit cannot "
                    "follow), so the gradient w.r.t. the value it received cannot be isolated. Use the "
                    "module's out-of-place form (e.g. inplace=False) for gradient capture."
                )
        call.aliases = None

    def _fast_hook(self, names: list[str], calls: list[Any]) -> Any:
        """The default case (outputs only, no options), kept short: a hook runs on every call of the module."""
        order = self._order
        snap = self._snap
        tensor = torch.Tensor

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if in_backward() != -1:
                return  # activation checkpointing recomputing a forward: not a new call
            if not calls:
                order.extend(names)
            if type(output) is tensor:
                t = output.detach() if output.requires_grad else output  # no graph, nothing to detach
                if t.is_inference():
                    calls.append((t.clone(), None))  # keeps no version counter: copy
                else:
                    calls.append((t, t._version))
            else:
                call = _Call()
                call.output, call.guards = snap(output)
                calls.append(call)

        return forward_hook

    def _forward_hook(self, names: list[str], calls: list[_Call], pending: list[_Call]) -> Any:
        snap = self._snap
        want_grads = self._want_grads
        stop = self._stop
        n_selected = len(self._selected)
        order = self._order
        listener = self._listener
        keep = self._keep

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if in_backward() != -1:
                return  # activation checkpointing recomputing a forward: not a new call
            call = pending[-1] if pending else _Call()  # popped by _end_of_call, which runs next
            if keep:
                call.output, call.guards = snap(output)
                if not calls:
                    order.extend(names)
                calls.append(call)
            if listener is not None:
                listener.forward(call.where, args, output)
            if want_grads and torch.is_grad_enabled():
                if call.aliases:
                    self._fix_inplace_inputs(call)
                outs = _tree.leaves(output)
                n = len(outs)
                for i, t in enumerate(outs):
                    if t.requires_grad:
                        self._handles.add(t.register_hook(self._grad_out_hook(call, i, n)))
            if stop:
                self._ran.add(id(module))
                if len(self._ran) == n_selected:
                    raise _StopForward(self)

        return forward_hook

    def __repr__(self) -> str:
        state = "open" if self._active else "closed"
        return f"<hookkit.Capture ({state}) of {len(self)} layer(s) that ran: {', '.join(self.keys())}>"


def _end_of_call(pending: list[_Call]) -> Any:
    """A forward hook run after the recording one, and also when the forward raised (``always_call``): it ends the
    call the pre-hook opened. A module that calls itself and catches a failing inner call thus pairs each output
    with its own inputs: the failed call is dropped here, so the outer call's hook finds its own record on top."""

    def end_of_call(module: nn.Module, args: tuple, output: Any) -> None:
        if in_backward() == -1 and pending:
            pending.pop()

    return end_of_call


def capture(
    model: nn.Module,
    layers: Layers,
    *,
    inputs: bool = False,
    grads: bool = False,
    detach: bool = True,
    clone: bool = False,
    to: To = None,
    stop: bool = False,
    param_grads: bool = False,
) -> Capture:
    """Record what the selected layers produce while the ``with`` block is open; remove every hook on exit.

    Example:
        >>> import torch, torchvision, hookkit
        >>> model = torchvision.models.resnet18().eval()
        >>> with hookkit.capture(model, ["layer1", "fc"]) as cap:
        ...     _ = model(torch.randn(1, 3, 64, 64))
        >>> cap["layer1"].shape
        torch.Size([1, 64, 16, 16])

    Args:
        model: the ``nn.Module`` to hook (not compiled, not TorchScript).
        layers: a name from ``hookkit.layer_names(model)``, a glob (``"layer*.0.conv1"``; ``*`` stays inside one
            dotted part, ``**`` crosses parts), a module class (``nn.Conv2d``), a module object, a predicate
            ``(name, module) -> bool``, or a list of these.
        inputs: also record each call's positional inputs (``cap.inputs``) and keyword inputs (``cap.kwargs``).
        grads: also record gradients w.r.t. each call's output (``cap.grads``) and inputs (``cap.grad_inputs``)
            for every backward that runs while the block is open. Uses tensor hooks, not
            ``register_full_backward_hook``, so in-place ops, dict outputs and reused modules work.
        detach: store tensors without their autograd graph (default ``True``).
        clone: store a copy of every tensor at hook time. By default tensors are stored without copying and a
            later in-place change is detected when you read the value (``ModifiedInPlaceError``).
        to: a device and/or dtype for stored values, e.g. ``"cpu"``, ``torch.float16`` or ``("cpu", torch.float16)``;
            the dtype applies to floating-point tensors only.
        stop: end the forward pass as soon as every selected layer has run once; the ``with`` block swallows the
            stop, so code after the model call inside the block does not run.
        param_grads: also keep, after each backward inside the block, a copy of the accumulated ``.grad`` of
            every parameter of each selected module: ``cap.param_grads[layer][param_name]`` (parameter names are
            relative to the layer, e.g. ``"weight"``, ``"0.bias"``).

    Returns:
        A ``Capture``: ``cap[name]`` (last call), ``cap.calls(name)`` (every call), ``list(cap)`` (layers that ran,
        in order of first call), and the stores ``cap.inputs``, ``cap.kwargs``, ``cap.grads``, ``cap.grad_inputs``.

    Raises:
        LayerNotFoundError: a spec matched no module (before any hook is registered).
        TypeError: ``model`` is not an ``nn.Module``.
        UnsupportedModelError: TorchScript or compiled modules, whose hooks torch would not run.
    """
    return Capture(model, layers, inputs=inputs, grads=grads, detach=detach, clone=clone, to=to, stop=stop,
                   param_grads=param_grads)


def concat_calls(values: list[Any], dim: int = 1) -> Any:
    """Join the calls of one layer into one value: e.g. the steps of ``model.generate()`` with a KV cache, where a
    block sees the prompt first and then one new token per call, concatenated along the sequence dimension.

    Example:
        >>> import torch
        >>> steps = [torch.zeros(1, 5, 8), torch.ones(1, 1, 8), torch.ones(1, 1, 8)]  # prompt, then 2 tokens
        >>> concat_calls(steps, dim=1).shape
        torch.Size([1, 7, 8])

    Nested values (tuples, dicts, ModelOutput) are joined tensor by tensor; ``None`` and other non-tensors are
    taken from the first call. Typical use: ``concat_calls(cap.calls("transformer.h.0"), dim=1)``.

    Raises:
        ValueError: no calls, or calls whose structures differ.
    """
    if not values:
        raise ValueError("concat_calls needs at least one call; did the layer run inside the capture block?")
    per_call = [_tree.leaves(v) for v in values]
    if any(len(p) != len(per_call[0]) for p in per_call):
        raise ValueError("the calls hold different numbers of tensors, so they cannot be joined tensor by tensor.")
    joined = [torch.cat([p[i] for p in per_call], dim=dim) for i in range(len(per_call[0]))]
    return _tree.fill(_tree.skeleton(values[0]), joined)
