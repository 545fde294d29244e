"""A group of hook handles that removes exactly itself, in reverse order, once."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ._compat import full_backward_flag, has_full_backward_hooks, set_full_backward_flag

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
