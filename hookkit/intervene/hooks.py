"""``hooks()``: the user's own hook functions on named layers, with torch's signatures, removed on exit.

A thin client of core: module names get the user's functions through ``core.handles.HandleGroup`` (torch's own
``register_*_hook``, with its options); op and repeated-call nodes (``"layer1.0.add"``) go to a ``core.ops.OpTaps``
whose ``begin`` / ``end`` call the user's forward-pre / forward functions around the op; whether a replacement sits
inside a checkpointed region is asked of ``core.checkpointing``. Edits (``intervene/edits.py``) are such functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from hookkit._errors import ArgumentError, ArgumentTypeError, EditError, UsageError
from hookkit.core import check as _check
from hookkit.core.checkpointing import inside_checkpoint
from hookkit.core.handles import HandleGroup
from hookkit.core.ops import OpTaps
from hookkit.core.select import LayerSpec, check_model, select, unwrap

__all__ = ["hooks", "Hooks"]

HookFns = Callable[..., Any] | list | tuple
HookMap = Mapping[LayerSpec, HookFns]

_KINDS = ("forward", "forward_pre", "backward", "backward_pre")


class Hooks:
    """What ``hooks()`` returns: a context manager owning the handles it registered.

    ``handles`` maps each kind (``"forward"``, ...) to ``{layer name: [RemovableHandle, ...]}``.
    """

    def __init__(self, model: nn.Module, plan: list[tuple[str, nn.Module, list[str], Callable[..., Any]]],
                 *, with_kwargs: bool, always_call: bool, prepend: bool,
                 node_plan: list[tuple[str, str, str, Callable[..., Any]]] | None = None,
                 checks: list[Callable[[], None]] | None = None) -> None:
        self._model_name = type(model).__name__
        self._checks = checks or []  # bound functions' check(), called after removal on a clean exit
        self._plan = plan
        node_plan = node_plan or []
        # per (kind, op name): the functions, in the order they run (reversed by prepend)
        self._node_fns: dict[tuple[str, str], list[Callable[..., Any]]] = {}
        for kind, name, _, fn in node_plan:
            self._node_fns.setdefault((kind, name), []).append(fn)
        if prepend:
            self._node_fns = {k: v[::-1] for k, v in self._node_fns.items()}
        scopes = {name: scope for _, name, scope, _ in node_plan}
        self._with_kwargs = with_kwargs
        self._always_call = always_call
        self._prepend = prepend
        self._group = HandleGroup()
        self._taps: OpTaps | None = None
        if scopes:
            self._taps = OpTaps(unwrap(model)[0], handles=self._group, wanted=scopes, name_all=False,
                                tap_all=False, watch=None, begin=self._node_begin, end=self._node_end)
        self.handles: dict[str, dict[str, list[Any]]] = {k: {} for k in _KINDS}
        self._entered = False

    def __enter__(self) -> Hooks:
        if self._entered:
            raise UsageError("a Hooks object can be entered once; call hookkit.hooks(...) again.")
        self._entered = True
        try:
            for kind, module, names, fn in self._plan:
                handle = self._register(kind, module, fn)
                for n in names:
                    self.handles[kind].setdefault(n, []).append(handle)
            if self._taps is not None:
                self._taps.attach()
        except BaseException:
            self.remove()
            raise
        return self

    # -- op and repeated-call nodes: the user's functions around the op --------------------------------------------
    def _node_begin(self, name: str, site: Any, args: tuple, kwargs: dict,
                    writes: tuple = ()) -> tuple[Any, tuple | None]:
        new_args = None
        for fn in self._node_fns.get(("forward_pre", name), ()):
            if self._with_kwargs:
                result = fn(site, args, kwargs)
                if result is not None:
                    args, new_kw = result
                    kwargs.clear()
                    kwargs.update(new_kw)  # the op runs with this very dict
                    new_args = args
            else:
                result = fn(site, args)
                if result is not None:
                    args = new_args = result if isinstance(result, tuple) else (result,)
        if new_args is not None:
            _refuse_in_checkpoint(name, "inputs")
        return (name, site, kwargs), new_args

    def _node_end(self, token: Any, args: tuple, output: Any) -> Any:
        name, site, kwargs = token
        replaced = None
        for fn in self._node_fns.get(("forward", name), ()):
            result = fn(site, args, kwargs, output) if self._with_kwargs else fn(site, args, output)
            if result is not None:
                output = replaced = result
        if replaced is not None:
            _refuse_in_checkpoint(name, "output")
        return replaced

    def _register(self, kind: str, module: nn.Module, fn: Callable[..., Any]) -> Any:
        options: dict[str, bool] = {"prepend": self._prepend}  # torch's options, as each kind of hook takes them
        if kind.startswith("forward"):
            options["with_kwargs"] = self._with_kwargs
        if kind == "forward":
            options["always_call"] = self._always_call
        return self._group.module(kind, module, fn, **options)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.remove()
        if exc_type is None:
            for check in self._checks:
                check()

    def remove(self) -> None:
        """Remove every hook this object registered; safe to call twice."""
        self._group.remove()
        if self._taps is not None:
            self._taps.close()

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

    Examples:
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
    Op and repeated-call nodes (``"layer1.0.add"``, from ``hookkit.layer_names(model, x)``) take ``forward`` and
    ``forward_pre`` functions; for an op, the first argument is an ``OpSite`` (``.func``, ``.scope``,
    ``.scope_cls``) in place of a module, and ``args`` are the op's positional arguments. For an op that writes in
    place (``y.add_(1)``, ``out += identity``), a replacement of its output is written into the tensor it changed
    (``copy_``: the model may drop the op's returned value), so it must have that tensor's shape, dtype and device.
    An object whose class defines ``__hookkit_bind__(name)`` (``hookkit.patch`` / ``add`` / ``ablate``) is
    registered as what that returns for each layer name, so one edit can go to several layers; if that defines
    ``__hookkit_check__()``, it is called after the hooks are removed on a clean exit (an edit that never applied
    raises there).

    Activation checkpointing (``torch.utils.checkpoint``, a Hugging Face model's
    ``activation_checkpointing_enable()``): backward runs a checkpointed block's forward again, and torch calls its
    modules' hooks again. ``hooks()`` leaves that as torch does: your function is called for the recomputed call
    too, and must return the same replacement as for the call it repeats (else the gradients belong to another
    output than the forward's). hookkit's edits do this themselves: the recomputation of call i gets call i's edit
    and is not counted again. A function on an op or repeated-call node is not called in a recomputation, so one
    that replaces a value inside a checkpointed block raises ``EditError`` (with grad enabled, and always in a
    ``use_reentrant=True`` block, whose first run is without grad whatever its caller had).

    Args:
        model: the ``nn.Module`` whose layers to hook.
        forward: ``{layer spec: function or list of functions}``, forward hooks; a spec is anything ``capture``
            accepts (name, glob, class, module object, predicate, op or repeated-call node, a tuple of these);
            ``None`` is an ``ArgumentError`` (name the layers).
        forward_pre: the same, forward pre-hooks.
        backward: the same, backward hooks.
        backward_pre: the same, backward pre-hooks.
        with_kwargs: forward / forward_pre hooks also get the keyword inputs (torch's ``with_kwargs=True``).
        always_call: forward hooks also run when the forward raises (torch's ``always_call=True``).
        prepend: run these hooks before hooks already registered (torch's ``prepend=True``).

    Raises:
        LayerNotFoundError: a spec matched no module; nothing has been registered then.
        TypeError: a value is not callable, or ``model`` is not an ``nn.Module``.
        EditError: in the forward, an op node's function whose replacement cannot reach the model (an in-place
            op's replacement of another shape, dtype or device, or of an op that returns no tensor; a swapped
            tensor an op writes into), or that replaces a value inside a checkpointed block.
    """
    check_model(model)  # also checked by resolve(); here so that a bad model fails even with no hooks given
    _check.flag("hookkit.hooks", with_kwargs=with_kwargs, always_call=always_call, prepend=prepend)
    given = {"forward": forward, "forward_pre": forward_pre, "backward": backward, "backward_pre": backward_pre}
    plan: list[tuple[str, nn.Module, list[str], Callable[..., Any]]] = []
    node_plan: list[tuple[str, str, str, Callable[..., Any]]] = []
    checks: list[Callable[[], None]] = []
    for kind, mapping in given.items():
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            raise ArgumentTypeError(f"{kind}= takes a dict {{layer: function}}, got {type(mapping).__name__}.")
        for spec, fns in mapping.items():
            fn_list = list(fns) if isinstance(fns, (list, tuple)) else [fns]
            for fn in fn_list:
                if not callable(fn):
                    raise ArgumentTypeError(f"{kind}[{spec!r}] is {type(fn).__name__} {fn!r}, not a function.")
            chosen = select(model, spec, caller="hookkit.hooks", param=f"a key of {kind}=")
            selected, nodes = chosen.modules, chosen.nodes
            if nodes and kind.startswith("backward"):
                raise ArgumentError(
                    f"{kind}[{next(iter(nodes))!r}]: an op node has no {kind} hook (torch has them for modules "
                    "only). Use hookkit.capture(..., grads=True), or call register_hook on the output tensor "
                    "inside a forward hook.")
            for module, names in selected.items():
                plan.extend((kind, module, names, _bind(fn, names[0], checks)) for fn in fn_list)
            node_plan.extend((kind, n, scope, _bind(fn, n, checks)) for n, scope in nodes.items() for fn in fn_list)
    if not plan and not node_plan:
        raise ArgumentError("hooks() got no hook functions: pass forward=, forward_pre=, backward= or backward_pre=.")
    return Hooks(model, plan, with_kwargs=with_kwargs, always_call=always_call, prepend=prepend,
                 node_plan=node_plan, checks=checks)


def _refuse_in_checkpoint(name: str, what: str) -> None:
    """An op or repeated-call node's function that replaced a value, inside a region of ``torch.utils.checkpoint``:
    backward recomputes the region without op taps (they follow one forward of the model, which a recomputation
    is not), so the gradients would be those of the unedited region. Refuse instead of computing them. Without
    grad no backward follows, except that a ``use_reentrant=True`` region always runs without grad the first time
    (and hookkit cannot tell whether its caller had grad): there it refuses always."""
    if inside_checkpoint():
        raise EditError(
            f"{name!r} is an op (or a repeated call) inside a block run by torch.utils.checkpoint, and a hook replaced "
            f"its {what}: the recomputation in backward cannot repeat an edit of an op node, so the gradients would "
            "not match the edited forward. Edit a module's output instead (its name in hookkit.layer_names(model, "
            "x)), or turn checkpointing off (model.activation_checkpointing_disable() for a Hugging Face model).")


def _bind(fn: Callable[..., Any], name: str, checks: list[Callable[[], None]]) -> Callable[..., Any]:
    """The function to register on layer ``name``: ``fn.__hookkit_bind__(name)`` where ``fn``'s class defines it
    (hookkit's edits), else ``fn``; a bound function's ``__hookkit_check__``, if its class has one, joins
    ``checks``. Looked up on the class under dunder names: a plain ``bind`` attribute is too common (a
    ``unittest.mock.Mock`` has every attribute) to mean "bind me"."""
    if getattr(type(fn), "__hookkit_bind__", None) is None:
        return fn
    bound = fn.__hookkit_bind__(name)  # type: ignore[attr-defined]
    if not callable(bound):
        raise ArgumentTypeError(f"{fn!r}.__hookkit_bind__({name!r}) returned {type(bound).__name__}, not a function.")
    if getattr(type(bound), "__hookkit_check__", None) is not None:
        checks.append(bound.__hookkit_check__)
    return bound
