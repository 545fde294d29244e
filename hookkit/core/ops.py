"""Op taps: what happens between module boundaries, seen through a torch function mode.

The engine (``core/engine.py``) builds an ``OpTaps`` when a block needs it: op nodes were asked for (``"layer1.0.add"``,
``"relu_1"``), a listener wants op events (``trace(ops=True)``, ``check_finite``, ``layer_names(model, x)``), or
stored tensors must be copied before an in-place op overwrites them (copy-on-write, the default capture). It
registers module hooks (into the engine's ``HandleGroup``) that keep a per-thread stack of frames (which module's
``forward`` is running) and push ``_Mode`` only inside the modules that need it; the mode names each op the way
torchvision's FX extractor does (``op_name``), hands the ops that were asked for to the engine
(``Engine.node_begin`` / ``node_end``: the same ``Call`` records, snapshotter and listener as module calls), and tells
the engine's ``core.snapshot.Watch`` before an op writes in place (``written``).

Naming (``core/opnames.py``, as torchvision's ``get_graph_node_names``): an op is named after the innermost
non-leaf module whose ``forward`` runs it (its *scope*) plus the op (``"layer1.0.add"``; no prefix at the root), with
``_1``, ``_2`` ... for repeats counted per full name within one forward of the model; a leaf module's calls share the
counter of its own name (the 2nd call of ``layer1.0.relu`` is ``"layer1.0.relu_1"``, and ``F.relu`` in
``layer1.0``'s forward counts there too); ops inside a leaf are not nodes. Nor are the parallel machinery's ops
(``caller``, ``_is_parallel_op``): FSDP2's all-gather into buffers it allocated uninitialised, DTensor's
redistributions, collectives are not the model's, so they are neither named nor handed on (to ``check_finite``).

Wrapped torch (``_Wrappers``): a library may have replaced torch's functions and Tensor methods with Python wrappers
that call the originals (torchlens does, process-wide). An op is then named where the model called the wrapper (its
operator, its scope), as without the wrapper, and the ops a wrapper's own bookkeeping runs are no nodes.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from hookkit.core.checkpointing import recomputing
from hookkit.core.compat import eager, pop_function_mode, push_function_mode
from hookkit.core.opnames import (
    Node,
    OpSite,
    call_name,
    is_leaf,
    keeps_written,
    known_op_names,
    op_name,
    own_class,
    split_node_name,
    write_into,
    writer_roots,
    writes_in_place,
    written,
)

# The names and writes of ops live in core.opnames; named here too for the modules that read them with the taps.
__all__ = ["OpTaps", "OpSite", "Node", "discover", "discover_nodes", "op_name", "is_leaf", "writes_in_place",
           "writer_roots", "known_op_names", "written", "split_node_name", "call_name"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HOOKKIT_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep  # hookkit/, above core/


_PASS_THROUGH: set[Any] = set()  # code of the mode's own handler: a nested hookkit mode sees the op come from it


# The parallel machinery: FSDP's and DTensor's hooks and dispatch, collectives, tensor parallel's styles, DDP. An op
# it runs is not the model's, and its values are not the model's either (FSDP2 allocates its all-gather buffers
# uninitialised and fills them afterwards): such ops are no nodes, neither named nor checked.
_PARALLEL_DIRS = tuple(os.path.join(_TORCH_DIR, *d) + os.sep for d in (("distributed",), ("nn", "parallel")))
_PARALLEL_OPS = tuple(f"torch._ops.{ns}" for ns in ("fsdp", "c10d", "_c10d_functional", "_dtensor"))
_PARALLEL = object()  # what ``caller`` returns for an op that the parallel machinery ran


def caller(depth: int = 1) -> Any:
    """The first frame above the caller outside torch and outside another hookkit mode's handler: the code that
    called the op (the model's, or hookkit's own when a hook of hookkit runs an op); ``_PARALLEL`` when torch code on
    the way there is the parallel machinery's (``_PARALLEL_DIRS``)."""
    f: Any = sys._getframe(depth + 1)
    while f is not None:
        code = f.f_code
        if code.co_filename.startswith(_TORCH_DIR):
            if code.co_filename.startswith(_PARALLEL_DIRS):
                return _PARALLEL
        elif code not in _PASS_THROUGH:
            break
        f = f.f_back
    return f


def _is_parallel_op(func: Any) -> bool:
    """An op of the parallel machinery's own namespaces (``torch.ops.fsdp``, ``c10d``, ``_c10d_functional``,
    ``_dtensor``), wherever it is called from."""
    return (getattr(func, "__module__", None) or "").startswith(_PARALLEL_OPS)


class _Wrappers:
    """Python functions another library put in place of torch's own (``torch.add``, ``Tensor.__iadd__``,
    ``F.relu``), typically ``functools.wraps`` wrappers that call the original (torchlens wraps them all, for the
    rest of the process, on first use). The op then reaches the function mode from the wrapper's frame: the model's
    frame is the one below it. ``codes``: each wrapper's code -> the top-level package that defined it; ``plain``:
    codes seen calling an op that are no wrapper. Read again (``refresh``) at most once per block, when a code never
    seen calls an op, and at every block while wrappers are known (they may have been removed)."""

    MODULES = ("torch", "torch.nn.functional", "torch.linalg", "torch.special", "torch.fft")
    # Decorators torch applies to its own functions (``typing_extensions.deprecated`` on ``torch._check_is_size``).
    OWN = frozenset({"typing_extensions", "typing", "warnings", "functools", "contextlib"})
    codes: dict[Any, str] = {}
    plain: set[Any] = set()

    @classmethod
    def refresh(cls) -> None:
        found: dict[Any, str] = {}
        spaces: list[tuple[Any, Any]] = [(torch.Tensor, torch._C.TensorBase)]
        spaces += [(m, torch._C._VariableFunctions if name == "torch" else None)
                   for name in cls.MODULES if (m := sys.modules.get(name)) is not None]
        for ns, originals in spaces:
            for name, v in list(vars(ns).items()):
                replaced = originals is not None and hasattr(originals, name)  # a name torch's C code defines
                accessors: tuple[Any, ...] = (v.fget, v.fset) if isinstance(v, property) else (v,)
                for f in accessors:
                    if _replaces_torch(f, replaced):
                        package = (f.__globals__.get("__name__") or "").partition(".")[0]
                        if package not in cls.OWN:
                            found[f.__code__] = package
        cls.codes = found


def _replaces_torch(f: Any, replaced: bool = False) -> bool:
    """Whether ``f``, found in one of torch's namespaces, is a Python function from outside torch that stands in
    for one of torch's: one at a name torch's C code defines (``replaced``), one that wraps a function of torch's
    (``__wrapped__``), or one carrying a torch function's module or qualified name (``functools.wraps`` copies
    them; torchlens deletes ``__wrapped__`` where the original is a builtin)."""
    if type(f) is not types.FunctionType or f.__code__.co_filename.startswith(_TORCH_DIR):
        return False
    if replaced:
        return True
    inner = f.__dict__.get("__wrapped__")
    if inner is not None:
        code = getattr(inner, "__code__", None)
        return code is None or code.co_filename.startswith(_TORCH_DIR) or _replaces_torch(inner)
    mod = f.__module__ or ""
    return mod == "torch" or mod.startswith("torch.") or f.__qualname__.startswith(
        ("TensorBase.", "Tensor.", "_VariableFunctionsClass."))


_BOOKKEEPING = object()  # what ``_through_wrappers`` returns for an op that a wrapper's own code ran


def _through_wrappers(f: Any) -> Any:
    """The model's frame for an op whose first frame outside torch is ``f``, with torch's functions wrapped: the
    first frame below the wrappers (and the torch frames between them), or ``_BOOKKEEPING`` when that is code of
    the wrapper's package run from inside a wrapper (its own bookkeeping: ``untyped_storage``, ``getattr``)."""
    codes = _Wrappers.codes
    while f is not None and (f.f_code in codes or f.f_code.co_filename.startswith(_TORCH_DIR)):
        f = f.f_back
    if f is None:
        return None
    package = (f.f_globals.get("__name__") or "").partition(".")[0]
    g = f.f_back
    while g is not None:
        home = codes.get(g.f_code)
        if home is not None:
            return _BOOKKEEPING if home == package else f
        g = g.f_back
    return f


# -- the mode and the frames -----------------------------------------------------------------------------------------
class _Frame:
    __slots__ = ("path", "module", "counting", "opaque", "node")

    def __init__(self, path: str, module: nn.Module, counting: bool, opaque: bool) -> None:
        self.path = path
        self.module = module
        self.counting = counting  # a non-leaf module: ops in its own forward are named in its scope
        self.opaque = opaque  # a leaf, or inside one: nothing within is a node (FX does not trace into leaves)
        self.node: Any = None  # a leaf call being recorded as a repeated-call node


class _State(threading.local):
    def __init__(self) -> None:
        self.frames: list[_Frame] = []
        self.counts: dict[str, int] = {}  # per full base name, shared by ops and leaf calls (FX's counter)
        self.calls: dict[str, int] = {}  # per leaf module: its own calls in this forward
        self.depth = 0  # how many calls of mode modules are open in this thread
        self.pushed: Any = None  # the mode this thread pushed, while depth > 0
        self.suspended: list[bool] = []  # per open fast-path module call: whether the mode was taken off for it


class _Mode(TorchFunctionMode):
    def __init__(self, taps: OpTaps) -> None:
        super().__init__()
        self.taps: OpTaps | None = taps

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        taps = self.taps
        if kwargs is None:
            kwargs = {}
        if taps is None:  # closed (left on another thread's stack by an interrupted forward): step aside
            return func(*args, **kwargs)
        if taps.watch is not None and taps.watch.active:
            targets = written(func, args, kwargs)
            if targets:
                taps.watch.before_write(targets)
        frames = taps.state.frames
        if frames and frames[-1].counting and taps.naming:
            return taps.op(func, args, kwargs, frames[-1])
        return func(*args, **kwargs)


class OpTaps:
    """Frames, names and the function mode for one engine; see the module docstring.

    ``wanted``: ``{node name: scope path}`` to record through ``begin(name, site, args, kwargs) -> (call, new_args)``
    and ``end(call, args, output)``; ``name_all``: frame every module and name every op (``trace(ops=True)``,
    ``check_finite``, discovery); ``tap_all``: record every op too (a listener wants them all); ``watch``: the
    engine's ``core.snapshot.Watch`` for copy-on-write, or None, and ``writers`` the modules it watches inside
    (``writer_roots``); ``on_name(name, node)``: told every name as it is
    given, with a ``Node`` saying what it names (discovery). Hooks go into ``handles``.
    """

    def __init__(self, model: nn.Module, *, handles: Any, wanted: dict[str, str], name_all: bool, tap_all: bool,
                 watch: Any, writers: Sequence[nn.Module] = (),
                 begin: Callable[..., Any] | None = None, end: Callable[..., Any] | None = None,
                 on_name: Callable[[str, Node], None] | None = None) -> None:
        self.model = model
        self.handles = handles
        self.wanted = wanted  # node name -> scope path
        self.all_ops = name_all
        self.tap_all = tap_all
        self.watch = watch
        self.writers = list(writers)  # writer_roots(...) of the model: where copy-on-write watches
        self.begin = begin
        self.end = end
        self.on_name = on_name
        self.naming = bool(wanted) or name_all
        self.state = _State()
        self.mode = _Mode(self)
        self._paths: dict[int, str] = {}
        self._seen_modules: set[int] = set()
        self._wrappers_read = False  # whether _Wrappers was read again in this block

    # -- registration ---------------------------------------------------------------------------------------------
    def attach(self) -> None:
        framed: dict[int, nn.Module] = {}
        counting: set[int] = set()
        mode_at: set[int] = set()
        if self.naming:
            if _Wrappers.codes:  # torch was wrapped when last looked at: still?
                _Wrappers.refresh()
                self._wrappers_read = True
            named = list(self.model.named_modules())
            self._paths = {id(m): n for n, m in named}
            modules = dict(named)
            if self.all_ops:
                framed = {id(m): m for _, m in named}
                counting = {id(m) for _, m in named if not is_leaf(m)}
                mode_at.add(id(self.model))
            else:
                framed[id(self.model)] = self.model  # its forward starts the counting again
                for scope in set(self.wanted.values()):
                    s = modules[scope]
                    framed[id(s)] = s
                    counting.add(id(s))
                    mode_at.add(id(s))
                    for child in s.children():
                        framed[id(child)] = child
        hooked = dict(framed)
        if self.watch is not None:
            for m in self.writers:
                mode_at.add(id(m))
                hooked.setdefault(id(m), m)
        for key, m in hooked.items():
            self.handles.forward_pre(
                m, eager(self._pre(m, key in framed, key in counting, key in mode_at)), prepend=True, with_kwargs=True)
            self.handles.forward(
                m, eager(self._post(key in framed, key in mode_at)), always_call=True)
        if mode_at:
            for m in _fast_path_modules(self.model):
                self.handles.forward_pre(m, eager(self._suspend), prepend=True)
                self.handles.forward(m, eager(self._resume), always_call=True)

    def _suspend(self, module: nn.Module, args: tuple) -> None:
        """Before a torch.nn module that picks its fast path only when no function mode is active
        (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``): take the mode off, so that it computes exactly
        what it computes without hookkit (nothing inside a torch.nn leaf is a node or writes a stored tensor)."""
        state = self.state
        # (not again inside one already taken off for: nn.TransformerEncoderLayer holds a MultiheadAttention)
        off = state.pushed is not None and not recomputing() and not any(state.suspended)
        if off:
            pop_function_mode(state.pushed)
        state.suspended.append(off)

    def _resume(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self.state
        if state.suspended and state.suspended.pop() and state.pushed is not None:
            push_function_mode(state.pushed)

    def _pre(self, module: nn.Module, frame: bool, counting: bool, pushes: bool) -> Any:
        state = self.state
        path = self._paths.get(id(module), "")
        leaf = frame and is_leaf(module)

        def pre(m: nn.Module, args: tuple, kwargs: dict) -> Any:
            if recomputing():
                return None  # activation checkpointing recomputing a forward
            if pushes:
                if state.depth == 0:
                    push_function_mode(self.mode)
                    state.pushed = self.mode
                state.depth += 1
            if not frame:
                return None
            frames = state.frames
            if not frames:
                state.counts.clear()  # a new forward of the model: counting starts again
                state.calls.clear()
            inside = bool(frames) and frames[-1].opaque
            f = _Frame(path, m, counting and not inside, leaf or inside)
            frames.append(f)
            if self.on_name is not None and id(m) not in self._seen_modules:
                self._seen_modules.add(id(m))
                if path:
                    self.on_name(path, Node("module", m, path, 1))
            if leaf and path and not inside:
                n = state.counts.get(path, 0)
                state.counts[path] = n + 1
                k = state.calls[path] = state.calls.get(path, 0) + 1  # this module's own k-th call
                if n:
                    name = call_name(path, n)
                    if self.on_name is not None:
                        self.on_name(name, Node("call", m, path, k))
                    if name in self.wanted and self.begin is not None:
                        call, new_args = self.begin(name, m, args, kwargs)
                        f.node = call
                        if new_args is not None:
                            return new_args, kwargs
            return None

        return pre

    def _post(self, frame: bool, pushes: bool) -> Any:
        state = self.state

        def post(m: nn.Module, args: tuple, output: Any) -> Any:
            if recomputing():
                return None
            try:
                if frame and state.frames:
                    f = state.frames.pop()
                    if f.node is not None and output is not None and self.end is not None:
                        return self.end(f.node, args, output)  # a hooks() function may replace the output
            finally:
                if pushes and state.depth > 0:
                    state.depth -= 1
                    if state.depth == 0:
                        pop_function_mode(state.pushed)
                        state.pushed = None
            return None

        return post

    def close(self) -> None:
        """After the block: a forward interrupted by a BaseException (KeyboardInterrupt) skips torch's always-called
        hooks, so the mode may still be pushed in this thread: take it off."""
        state = self.state
        if state.pushed is not None:
            pop_function_mode(state.pushed)
            state.pushed = None
        state.depth = 0
        state.frames.clear()
        state.suspended.clear()
        # No reference cycles: a finished block is freed by reference counting, not by the garbage collector.
        self.mode.taps = None
        self.begin = self.end = self.on_name = None
        self.watch = None
        self.writers = []

    # -- ops ------------------------------------------------------------------------------------------------------
    def op(self, func: Any, args: tuple, kwargs: dict, frame: _Frame) -> Any:
        if not _has_tensor(args) and not _has_tensor(kwargs.values()):
            # torch._assert(<a Python bool>), torch.zeros(3): FX runs these while tracing; they are not nodes
            return func(*args, **kwargs)
        f = caller(2)
        if f is _PARALLEL or _is_parallel_op(func):
            return func(*args, **kwargs)  # the parallel machinery's own work (FSDP's all-gather): not the model's
        if f is not None:
            code = f.f_code
            if code not in _Wrappers.plain and code not in _Wrappers.codes:
                if not self._wrappers_read:  # a code never seen: is it a wrapper put in place of torch's function?
                    self._wrappers_read = True
                    _Wrappers.refresh()
                if code not in _Wrappers.codes:
                    _Wrappers.plain.add(code)
            if _Wrappers.codes:
                f = _through_wrappers(f)
                if f is _BOOKKEEPING:
                    return func(*args, **kwargs)
        if f is None or f.f_code.co_filename.startswith(_HOOKKIT_DIR):
            return func(*args, **kwargs)  # hookkit's own work inside a hook (a snapshot's detach): not the model's
        key = op_name(func, f)
        if frame.path:
            key = f"{frame.path}.{key}"
        counts = self.state.counts
        n = counts.get(key, 0)
        counts[key] = n + 1
        name = call_name(key, n)
        if self.on_name is not None:
            self.on_name(name, Node("op", OpSite(func, frame.path, type(frame.module).__name__), frame.path, 0))
        if (name not in self.wanted and not self.tap_all) or self.begin is None or self.end is None:
            return func(*args, **kwargs)
        site = OpSite(func, frame.path, type(frame.module).__name__)
        writes = tuple(written(func, args, kwargs))
        call, new_args = self.begin(name, site, args, kwargs, writes)
        if new_args is not None:
            if writes:
                keeps_written(name, args, new_args, writes)
            args = new_args
        output = func(*args, **kwargs)
        replaced = self.end(call, args, output)
        if replaced is None or replaced is output:
            return output
        if writes:
            return write_into(name, output, replaced, writes)
        return replaced


_FAST_PATH: dict[type, bool] = {}


def _fast_path_modules(model: nn.Module) -> list[nn.Module]:
    """torch.nn modules whose ``forward`` checks ``torch.overrides.has_torch_function`` to pick a fast path (an
    active function mode turns it off and changes the last bits of the result)."""
    found = []
    for m in model.modules():
        cls = type(m)
        fast = _FAST_PATH.get(cls)
        if fast is None:
            code = getattr(getattr(cls, "forward", None), "__code__", None)
            fast = _FAST_PATH[cls] = (own_class(cls).__module__.startswith("torch.nn.") and code is not None
                                      and "has_torch_function" in code.co_names)
        if fast:
            found.append(m)
    return found


def _has_tensor(values: Any) -> bool:
    """A tensor among ``values`` or one list / tuple deep (``torch.cat([x, y])``)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return True
        if isinstance(v, (list, tuple)) and any(isinstance(w, torch.Tensor) for w in v):
            return True
    return False


_PASS_THROUGH.update({_Mode.__torch_function__.__code__, OpTaps.op.__code__})


def discover(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """``layer_names(model, *args, **kwargs)``: run the model once and list every name given, in order."""
    return [name for name, _ in discover_nodes(model, args, kwargs)]


def discover_nodes(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, Node]]:
    """Run the model once (under ``no_grad``; every module's train / eval flag, its buffers and the RNG states
    restored) and return every name given, in order, with what it names (the first time a name is given)."""
    from hookkit.core.handles import HandleGroup
    from hookkit.core.state import restore as restore_state
    from hookkit.core.state import save as save_state

    found: list[tuple[str, Node]] = []
    seen: set[str] = set()

    def on_name(name: str, node: Node) -> None:
        if name not in seen:
            seen.add(name)
            found.append((name, node))

    handles = HandleGroup()
    taps = OpTaps(model, handles=handles, wanted={}, name_all=True, tap_all=False, watch=None, on_name=on_name)
    saved = save_state(model)  # each module's own flag (a frozen BatchNorm stays in eval), and every buffer
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        taps.attach()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        handles.remove()
        taps.close()
        restore_state(saved)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return found
