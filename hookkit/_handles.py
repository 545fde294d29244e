"""A group of hook handles that removes exactly itself, in reverse order, once."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

__all__ = ["HandleGroup"]


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
        before = module._is_full_backward_hook
        handle = self.add(module.register_full_backward_hook(hook, **kwargs))
        if before is None:
            def restore() -> None:
                if not module._backward_hooks and not module._backward_pre_hooks:
                    module._is_full_backward_hook = None
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
