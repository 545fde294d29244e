"""Every hook hookkit places is registered here: a ``HandleGroup`` registers module forward / pre / backward hooks,
tensor and autograd-node hooks and parameter hooks, owns their handles, and removes exactly itself, in reverse order,
once. No other module of the package calls torch's ``register_*hook`` (a test checks it)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from hookkit.core.compat import full_backward_flag, has_full_backward_hooks, set_full_backward_flag

__all__ = ["HandleGroup"]

# Modules whose ``_is_full_backward_hook`` flag hookkit turned on (it was None before). Shared by every group, so
# that whichever of several open blocks is removed last puts the flag back, whatever order they exit in.
_FLAG_SET_BY_HOOKKIT: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_FLAG_LOCK = threading.Lock()  # check-then-act on the flag and the set, from any thread


class HandleGroup:
    """Owns the handles one hookkit context made; ``remove()`` is idempotent and leaves other hooks alone."""

    __slots__ = ("_handles", "_undo")

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []

    def add(self, handle: Any) -> Any:
        self._handles.append(handle)
        return handle

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        """``module.register_forward_pre_hook(hook, **kwargs)``."""
        return self.add(module.register_forward_pre_hook(hook, **kwargs))

    def forward(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        """``module.register_forward_hook(hook, **kwargs)``."""
        return self.add(module.register_forward_hook(hook, **kwargs))

    def backward_pre(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        """``module.register_full_backward_pre_hook(hook, **kwargs)``."""
        return self.add(module.register_full_backward_pre_hook(hook, **kwargs))

    def tensor(self, tensor_or_node: Any, hook: Callable[..., Any]) -> Any:
        """``register_hook`` on a tensor (its gradient) or on an autograd node (``grad_fn``)."""
        return self.add(tensor_or_node.register_hook(hook))

    def param_grad(self, param: torch.Tensor, hook: Callable[..., Any]) -> Any:
        """``param.register_post_accumulate_grad_hook(hook)``: runs once ``param.grad`` holds this backward's sum."""
        return self.add(param.register_post_accumulate_grad_hook(hook))

    def full_backward_hook(self, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        """``register_full_backward_hook``, undoing the ``_is_full_backward_hook`` flag torch leaves behind."""
        with _FLAG_LOCK:
            ours = full_backward_flag(module) is None or module in _FLAG_SET_BY_HOOKKIT
            handle = self.add(module.register_full_backward_hook(hook, **kwargs))
            if ours:
                _FLAG_SET_BY_HOOKKIT.add(module)
        if ours:

            def restore() -> None:
                # Only full backward hooks depend on the flag (pre-hooks run either way).
                with _FLAG_LOCK:
                    if module in _FLAG_SET_BY_HOOKKIT and not has_full_backward_hooks(module):
                        set_full_backward_flag(module, None)
                        _FLAG_SET_BY_HOOKKIT.discard(module)

            self._undo.append(restore)
        return handle

    def module(self, kind: str, module: nn.Module, hook: Callable[..., Any], **kwargs: Any) -> Any:
        """The module hook of ``kind``: "forward", "forward_pre", "backward" (full) or "backward_pre"."""
        if kind == "forward":
            return self.forward(module, hook, **kwargs)
        if kind == "forward_pre":
            return self.forward_pre(module, hook, **kwargs)
        if kind == "backward":
            return self.full_backward_hook(module, hook, **kwargs)
        if kind == "backward_pre":
            return self.backward_pre(module, hook, **kwargs)
        raise AssertionError(f"hookkit bug: no module hook of kind {kind!r}")

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        undo, self._undo = self._undo, []
        # Remove every handle even if one removal fails; re-raise the first failure afterwards.
        first: BaseException | None = None
        for handle in reversed(handles):
            try:
                handle.remove()
            except BaseException as exc:  # pragma: no cover - torch's remove() does not raise
                first = first or exc
        for fn in reversed(undo):
            fn()
        if first is not None:  # pragma: no cover
            raise first
