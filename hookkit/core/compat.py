"""Every use of a torch internal, in one small module: what hookkit needs, why, and since which torch.

hookkit declares ``torch>=2.13`` and CI runs the suite on 2.13 and on the pinned 2.14; the rest of the package goes
through these functions, so that a torch release that moves one of them breaks one place, with its name on it.

| what                                                | used by                  | since | fallback here         |
|-----------------------------------------------------|--------------------------|-------|-----------------------|
| ``torch._C._current_graph_task_id``                 | checkpointing, gradtaps  | 2.1   | -1: "not in backward" |
| ``Variable._execution_engine.queue_callback``       | gradtaps (param_grads)   | 1.0   | required              |
| ``torch.utils.checkpoint``'s frames (see below)     | checkpointing (edits)    | 2.1   | no region found       |
| ``torch._dynamo.config.skip_nnmodule_hook_guards``  | engine (compile)         | 2.1   | nothing to switch     |
| ``torch._dynamo.utils.counters``                    | engine (compile warning) | 2.0   | "nothing compiled"    |
| ``torch._dynamo.trace_rules.add``                   | engine, ops (hooks run   | 2.1   | required              |
| ``torch.compiler.is_compiling`` / ``.disable``      |   eagerly under compile) | 2.3   | required              |
| ``Module._is_full_backward_hook``                   | handles                  | 1.8   | required              |
| ``Module._backward_hooks``                          | handles                  | 1.0   | required              |
| ``Module._compiled_call_impl``                      | select (``.compile()``)  | 2.2   | "not compiled"        |
| ``Module._buffers``                                 | summary (BN restore)     | 1.0   | required              |
| ``torch._C._functorch.is_functorch_wrapped_tensor`` | snapshots                | 2.0   | "not wrapped"         |
| ``torch._C._push_on_torch_function_stack`` / pop    | ops (the function mode   | 2.0   | required              |
|   / ``_len_torch_function_stack`` / ``_get_...at``  |   pushed in a hook)      |       |                       |
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "current_graph_task_id",
    "at_end_of_backward",
    "after_gradient_reduction",
    "checkpoint_regions",
    "dynamo_config",
    "hook_guards",
    "dynamo_has_compiled",
    "eager",
    "keep_dynamo_out",
    "full_backward_flag",
    "set_full_backward_flag",
    "has_full_backward_hooks",
    "is_compiled_in_place",
    "buffers_of",
    "is_functorch_wrapped",
    "push_function_mode",
    "pop_function_mode",
    "function_mode_stack",
]


def _not_in_backward() -> int:
    return -1


# -1 unless autograd is running a backward pass (a forward then is activation checkpointing recomputing it).
current_graph_task_id = getattr(torch._C, "_current_graph_task_id", _not_in_backward)


def at_end_of_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the running backward pass has finished its graph, after the end-of-backward callbacks queued
    before it (autograd runs them in order: DDP's reducer queues the one that writes the averaged gradients into
    ``.grad`` as soon as its last bucket is ready, FSDP2 its root's at the first pre-backward hook). Only inside a
    backward (``current_graph_task_id() != -1``)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def after_gradient_reduction(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the running backward has finished and the end-of-backward callbacks queued *during* it have run
    too: DDP queues its finalizer (which writes the averaged gradients into ``.grad``) only when its last bucket is
    ready, after a callback queued at the first gradient; so a callback is queued that queues ``fn``, and ``fn``
    sees ``p.grad`` as the optimizer will."""
    at_end_of_backward(lambda: at_end_of_backward(fn))


def _checkpoint_codes() -> tuple[str, Any, Any]:
    from torch.utils import checkpoint as ckpt

    fn = ckpt.CheckpointFunction
    return ckpt.__file__, fn.forward.__code__, fn.backward.__code__


_CKPT_CODES: list[tuple[str, Any, Any]] = []


def checkpoint_regions() -> list[tuple[bool, Any, bool]]:
    """The ``torch.utils.checkpoint`` regions running on this thread's stack, innermost first, as ``(recomputing,
    region, reentrant)``: ``region`` is the same object while the checkpointed function first runs (``recomputing``
    False) and while backward recomputes it (True), so that a call made in the recomputation can be paired with the
    call it repeats; ``reentrant``: ``use_reentrant=True``, whose first run is always without grad. torch keeps no
    public record of the region that is running; it is read from torch's own frames:

    - ``use_reentrant=True``: ``CheckpointFunction.forward`` / ``.backward``, whose ``ctx`` is the region;
    - ``use_reentrant=False``: in the forward, the function that drives the ``_checkpoint_without_reentrant``
      generator (``checkpoint``, ``_checkpoint_impl`` in 2.14) holds it suspended as local ``gen``, whose
      ``new_frame`` (a ``_CheckpointFrame``) is the region; in backward, the saved-tensor ``unpack_hook`` that
      recomputes holds the same object as ``frame``.

    A torch that renames these finds no region: a recomputation then counts as a new call, and the tests that pair
    them (``tests/test_checkpointing.py``) fail."""
    if not _CKPT_CODES:
        _CKPT_CODES.append(_checkpoint_codes())
    file, reentrant_fwd, reentrant_bwd = _CKPT_CODES[0]
    found: list[tuple[bool, Any, bool]] = []
    f: Any = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if code.co_filename == file:
            if code is reentrant_fwd or code is reentrant_bwd:
                ctx = f.f_locals.get("ctx")
                if ctx is not None:
                    found.append((code is reentrant_bwd, ctx, True))
            elif code.co_name == "unpack_hook":
                frame = f.f_locals.get("frame")
                if frame is not None:
                    found.append((True, frame, False))
            else:
                gen = f.f_locals.get("gen")
                inner = getattr(gen, "gi_frame", None)
                region = inner.f_locals.get("new_frame") if inner is not None else None
                if region is not None:
                    found.append((False, region, False))
        f = f.f_back
    return found


def dynamo_config() -> Any:
    """``torch._dynamo.config`` if dynamo is already imported and has the hook-guard switch, else None. Never
    imports dynamo itself (that takes a second, and a process that never compiles does not need it)."""
    config = getattr(sys.modules.get("torch._dynamo"), "config", None)
    return config if config is not None and hasattr(config, "skip_nnmodule_hook_guards") else None


def dynamo_has_compiled() -> bool:
    """Whether torch.compile has compiled any frame in this process (importing dynamo alone is no sign)."""
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    if not counters:
        return False
    return counters.get("frames", {}).get("ok", 0) > 0


_SKIPPED: list[bool] = []


def keep_dynamo_out() -> bool:
    """If dynamo is imported, make it skip hookkit's own code (``torch._dynamo.trace_rules.add``) and say True;
    else False, without importing it (that takes a second that a process that never compiles should not pay).

    Traced, hookkit's hooks and its function mode would be turned into graph code: their side effects (records in
    Python lists, tensor hooks registered on outputs, copies made before an in-place write) are not what dynamo is
    built for, and some of it it cannot trace at all. Skipped, they run eagerly on real tensors, at the cost of a
    graph break at each hooked module (and at each op while an op tap is on) while a block is open; the compiled
    code is guarded on hooks then, and runs without breaks again after the block."""
    if _SKIPPED:
        return True
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return False
    dynamo.trace_rules.add(__name__.partition(".")[0])
    _SKIPPED.append(True)
    return True


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(*args)


_DISABLED: list[Callable[..., Any]] = []  # ``_call`` wrapped by torch.compiler.disable, made when first needed


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a module hook), kept out of torch.compile's graphs (``keep_dynamo_out``) also when dynamo is first
    imported while the block is open: then a wrapper checks ``torch.compiler.is_compiling()`` (one flag read per
    call) and, traced, calls ``fn`` through ``torch.compiler.disable``."""
    if keep_dynamo_out():
        return fn

    def hook(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            if not _DISABLED:  # once: from now on dynamo skips hookkit's code, the function mode's included
                keep_dynamo_out()
                _DISABLED.append(torch.compiler.disable(_call))
            return _DISABLED[0](fn, args)
        return fn(*args)

    return hook


class HookGuards:
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


hook_guards = HookGuards()


def full_backward_flag(module: nn.Module) -> bool | None:
    """``Module._is_full_backward_hook``: None until a backward hook is registered, then which kind it was; torch
    never resets it, and refuses the other kind while it is set."""
    return module._is_full_backward_hook


def set_full_backward_flag(module: nn.Module, value: bool | None) -> None:
    module._is_full_backward_hook = value


def has_full_backward_hooks(module: nn.Module) -> bool:
    """Whether ``module._backward_hooks`` (the dict ``register_full_backward_hook`` fills) holds any hook."""
    return bool(module._backward_hooks)


def is_compiled_in_place(module: nn.Module) -> bool:
    """``module.compile()`` (in place, unlike ``torch.compile(module)``) stores ``_compiled_call_impl``; its hooks
    then run only if they existed when it was compiled."""
    return module.__dict__.get("_compiled_call_impl") is not None


def buffers_of(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """A module's own buffer dict (not its children's), the one ``register_buffer`` writes: restoring an entry in
    it restores the buffer object itself, as ``core.state.restore`` needs after a forward in training mode."""
    return module._buffers


def is_functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functorch wrapper (inside ``torch.func.grad`` / ``vmap``), which has no storage and does
    not outlive its transform."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def push_function_mode(mode: Any) -> None:
    """Push a ``TorchFunctionMode`` on this thread's stack from a module hook, where a ``with`` block cannot span
    the pre-hook and the forward hook."""
    torch._C._push_on_torch_function_stack(mode)


def pop_function_mode(mode: Any) -> None:
    """Take ``mode`` off this thread's function-mode stack; modes a user left above it are put back in order."""
    above = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


def function_mode_stack() -> list[Any]:
    """This thread's torch function modes, bottom first."""
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
