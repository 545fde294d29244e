"""``hooks()``: the user's own hook functions on named layers, with torch's signatures, removed on exit."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from ._handles import HandleGroup
from ._select import LayerSpec, check_model, resolve

__all__ = ["hooks", "Hooks"]

HookFns = Callable[..., Any] | list | tuple
HookMap = Mapping[LayerSpec, HookFns]

_KINDS = ("forward", "forward_pre", "backward", "backward_pre")


class Hooks:
    """What ``hooks()`` returns: a context manager owning the handles it registered.

    ``handles`` maps each kind (``"forward"``, ...) to ``{layer name: [RemovableHandle, ...]}``.
    """

    def __init__(self, model: nn.Module, plan: list[tuple[str, nn.Module, list[str], Callable[..., Any]]],
                 *, with_kwargs: bool, always_call: bool, prepend: bool) -> None:
        self._model_name = type(model).__name__
        self._plan = plan
        self._with_kwargs = with_kwargs
        self._always_call = always_call
        self._prepend = prepend
        self._group = HandleGroup()
        self.handles: dict[str, dict[str, list[Any]]] = {k: {} for k in _KINDS}
        self._entered = False

    def __enter__(self) -> Hooks:
        if self._entered:
            raise RuntimeError("a Hooks object can be entered once; call hookkit.hooks(...) again.")
        self._entered = True
        try:
            for kind, module, names, fn in self._plan:
                handle = self._register(kind, module, fn)
                for n in names:
                    self.handles[kind].setdefault(n, []).append(handle)
        except BaseException:
            self._group.remove()
            raise
        return self

    def _register(self, kind: str, module: nn.Module, fn: Callable[..., Any]) -> Any:
        if kind == "forward":
            return self._group.add(module.register_forward_hook(
                fn, with_kwargs=self._with_kwargs, always_call=self._always_call, prepend=self._prepend))
        if kind == "forward_pre":
            return self._group.add(module.register_forward_pre_hook(
                fn, with_kwargs=self._with_kwargs, prepend=self._prepend))
        if kind == "backward":
            return self._group.full_backward_hook(module, fn, prepend=self._prepend)
        return self._group.add(module.register_full_backward_pre_hook(fn, prepend=self._prepend))

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered; safe to call twice."""
        self._group.remove()

    def __len__(self) -> int:
        return len(self._group)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={sum(len(v) for v in self.handles[k].values())}" for k in _KINDS)
        return f"<hookkit.Hooks on {self._model_name}: {counts}>"


def hooks(
    model: nn.Module,
    *,
    forward: HookMap | None = None,
    forward_pre: HookMap | None = None,
    backward: HookMap | None = None,
    backward_pre: HookMap | None = None,
    with_kwargs: bool = False,
    always_call: bool = False,
    prepend: bool = False,
) -> Hooks:
    """Register your own hook functions on layers picked by name, glob, class or predicate; remove them on exit.

    Example:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> zero = lambda module, args, output: output * 0  # a returned value replaces the output
        >>> with hookkit.hooks(model, forward={"0": zero}):
        ...     model(torch.ones(1, 4)).sum().item()
        0.0

    Each function has torch's signature and return semantics for its kind:
    ``forward``: ``fn(module, args, output)`` (``register_forward_hook``);
    ``forward_pre``: ``fn(module, args)`` (``register_forward_pre_hook``);
    ``backward``: ``fn(module, grad_input, grad_output)`` (``register_full_backward_hook``);
    ``backward_pre``: ``fn(module, grad_output)`` (``register_full_backward_pre_hook``).
    A value that the function returns replaces the output / input / grad_input / grad_output, as in torch.

    Args:
        model: the ``nn.Module`` whose layers to hook.
        forward, forward_pre, backward, backward_pre: ``{layer spec: function or list of functions}``; a spec is
            anything ``capture`` accepts (name, glob, class, module object, predicate).
        with_kwargs: forward / forward_pre hooks also get the keyword inputs (torch's ``with_kwargs=True``).
        always_call: forward hooks also run when the forward raises (torch's ``always_call=True``).
        prepend: run these hooks before hooks already registered (torch's ``prepend=True``).

    Raises:
        LayerNotFoundError: a spec matched no module; nothing has been registered then.
        TypeError: a value is not callable, or ``model`` is not an ``nn.Module``.
    """
    check_model(model)  # also checked by resolve(); here so that a bad model fails even with no hooks given
    given = {"forward": forward, "forward_pre": forward_pre, "backward": backward, "backward_pre": backward_pre}
    plan: list[tuple[str, nn.Module, list[str], Callable[..., Any]]] = []
    for kind, mapping in given.items():
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            raise TypeError(f"{kind}= takes a dict {{layer: function}}, got {type(mapping).__name__}.")
        for spec, fns in mapping.items():
            fn_list = list(fns) if isinstance(fns, (list, tuple)) else [fns]
            for fn in fn_list:
                if not callable(fn):
                    raise TypeError(f"{kind}[{spec!r}] is {type(fn).__name__} {fn!r}, not a function.")
            for module, names in resolve(model, spec).items():
                plan.extend((kind, module, names, fn) for fn in fn_list)
    if not plan:
        raise ValueError("hooks() got no hook functions: pass forward=, forward_pre=, backward= or backward_pre=.")
    return Hooks(model, plan, with_kwargs=with_kwargs, always_call=always_call, prepend=prepend)
