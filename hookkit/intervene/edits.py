"""Edits of a layer's output: ``patch``, ``add`` (steering) and ``ablate``, and the ``edits()`` block that applies them.

An edit is a forward hook that is not yet tied to a layer. ``hooks()`` (``intervene/hooks.py``) calls its ``bind(name)``
(as ``__hookkit_bind__``, the name it looks for on the class) for each layer it goes to and registers the
``BoundEdit`` that returns (which counts the layer's calls, edits the chosen ones out of place, and remembers how
many it edited; a call that activation checkpointing recomputes in backward is paired with the call it repeats,
through ``core.checkpointing.CallNumbers``, and gets the same edit); after removing its hooks on a
clean exit, ``Hooks`` calls each bound edit's ``check()`` (as ``__hookkit_check__``), which raises ``EditError``
for an edit that never applied. ``edits()`` is ``hooks()`` with edits only, plus ``applied``. ``patch(capture)``
reads the clean run's values through the capture's public ``Store`` surface (``store.calls(name)``). Where in an
output an edit lands (the tensor ``out`` names, ``output[index]``, a value fitted to it) is ``intervene/target.py``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError, ArgumentTypeError, EditError, NotRecordedError
from hookkit.core import check as _check
from hookkit.core.checkpointing import CallNumbers
from hookkit.core.select import LayerSpec, layers_needed
from hookkit.intervene.hooks import Hooks, hooks
from hookkit.intervene.target import (
    Index,
    Out,
    check_edit_args,
    fit_value,
    fmt_index,
    index_region,
    pick_tensor,
    shape_of,
)
from hookkit.record.capture import CaptureBlock, Store

__all__ = ["patch", "add", "ablate", "edits", "Edit", "Edits", "BoundEdit"]


# -- edits --------------------------------------------------------------------------------------------------------
class Edit:
    """An edit of a layer's output, not yet tied to a layer: ``patch``, ``add`` and ``ablate`` return one.

    Give it to ``hookkit.edits(model, {layer: edit})`` or ``hookkit.hooks(model, forward={layer: edit})``; both
    call ``bind(layer name)`` and register the ``BoundEdit`` it returns, so one edit can go to several layers.
    """

    _kind = "edit"

    def __init__(self, *, index: Index, call: int | None, out: Out) -> None:
        check_edit_args(f"hookkit.{self._kind}", index, call, out)
        self.index = index
        self.call = None if call is None else int(call)
        self.out = out

    def bind(self, name: str) -> BoundEdit:
        """This edit for layer ``name``, with its own call counter: a forward hook ``(module, args, output)``."""
        return BoundEdit(self, name)

    __hookkit_bind__ = bind  # how hooks() asks for it (``intervene.hooks._bind``)

    def __call__(self, module: Any, args: Any, *rest: Any) -> Any:
        raise EditError(f"{self!r} is not tied to a layer: give it to hookkit.edits(model, {{layer: edit}}) or "
                        "hookkit.hooks(model, forward={layer: edit}), or register edit.bind(layer name) as a "
                        "forward hook yourself.")

    def _replacement(self, region: torch.Tensor, target: torch.Tensor, name: str, call: int,
                     where: str) -> torch.Tensor | float:
        raise NotImplementedError(f"a bug in hookkit: {type(self).__name__} does not say what replaces the "
                                  "output")

    def _apply(self, name: str, call: int, output: Any) -> Any:
        where = f"hookkit.{self._kind} on {name!r} (call={call})"
        target, rebuild = pick_tensor(output, self.out, where)
        region = index_region(target, self.index, where)
        replacement = self._replacement(region, target, name, call, where)
        edited = target.clone()  # never the layer's own tensor: autograd and later readers see the original
        edited[... if self.index is None else self.index] = replacement
        return rebuild(edited)

    def _options(self) -> str:
        shown = []
        if self.index is not None:
            shown.append(f"index={fmt_index(self.index)}")
        if self.call is not None:
            shown.append(f"call={self.call}")
        if self.out != 0:
            shown.append(f"out={self.out!r}")
        return "".join(", " + s for s in shown)

    def __repr__(self) -> str:
        return f"hookkit.{self._kind}({self._options().lstrip(', ')})"


class _Patch(Edit):
    _kind = "patch"

    def __init__(self, value: torch.Tensor | Store | CaptureBlock, *, index: Index, call: int | None,
                 out: Out) -> None:
        if isinstance(value, CaptureBlock):  # `block = hookkit.capture(...)` kept instead of `with ... as cap`
            value = value.capture
        if not isinstance(value, (torch.Tensor, Store)):
            raise ArgumentTypeError(f"hookkit.patch: value= takes a tensor or a hookkit.Capture (or one of its "
                                    f"stores), got {type(value).__name__}; to zero an output use hookkit.ablate().")
        super().__init__(index=index, call=call, out=out)
        self.value = value

    def _replacement(self, region: torch.Tensor, target: torch.Tensor, name: str, call: int,
                     where: str) -> torch.Tensor:
        if isinstance(self.value, torch.Tensor):
            return fit_value(self.value, region, target, self.index, where, "the value")
        try:
            calls = self.value.calls(name)
        except NotRecordedError as e:  # not one of the captured layers, or it never ran there
            raise EditError(f"{where}: the capture to patch from holds no value of {name!r}: {e} Capture this "
                            f"layer in the clean run: hookkit.capture(model, [{name!r}]).") from None
        if call >= len(calls):
            raise EditError(f"{where}: the capture holds {len(calls)} call(s) of {name!r}, and this is its "
                            f"calls({name!r})[{call}] in this block: patch(capture) takes each call's value from the "
                            "same call of the capture. "
                            "Run the same inputs in both runs, or patch only some calls with call=.")
        captured, _ = pick_tensor(calls[call], self.out, f"{where}, the captured value")
        source = index_region(captured, self.index, where, of="the captured value")
        return fit_value(source, region, target, self.index, where, "the captured value")

    def __repr__(self) -> str:
        value = (f"<{type(self.value).__name__}>" if isinstance(self.value, Store)
                 else f"<tensor of shape {shape_of(self.value)}>")
        return f"hookkit.patch({value}{self._options()})"


class _Add(Edit):
    _kind = "add"

    def __init__(self, vector: torch.Tensor, *, scale: float, index: Index, call: int | None, out: Out) -> None:
        if not isinstance(vector, torch.Tensor):
            raise ArgumentTypeError(f"hookkit.add: vector= takes a tensor (e.g. a [d_model] steering vector), got "
                                    f"{type(vector).__name__}.")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise ArgumentTypeError(f"hookkit.add: scale= takes a number, got {type(scale).__name__} {scale!r}.")
        super().__init__(index=index, call=call, out=out)
        self.vector: torch.Tensor = vector
        self.scale: float = float(scale)

    def _replacement(self, region: torch.Tensor, target: torch.Tensor, name: str, call: int,
                     where: str) -> torch.Tensor:
        return region + self.scale * fit_value(self.vector, region, target, self.index, where, "the vector")

    def __repr__(self) -> str:
        return f"hookkit.add(<tensor of shape {shape_of(self.vector)}>, scale={self.scale}{self._options()})"


class _Ablate(Edit):
    _kind = "ablate"

    def __init__(self, kind: str, *, over: int | tuple[int, ...], mean: torch.Tensor | None, index: Index,
                 call: int | None, out: Out) -> None:
        _check.choice("hookkit.ablate", "kind", kind, ("zero", "mean"))
        over_dims = over if isinstance(over, tuple) else (over,)
        if not over_dims or any(isinstance(d, bool) or not isinstance(d, int) for d in over_dims):
            raise ArgumentTypeError(f"hookkit.ablate: over= takes a dim or a tuple of dims (ints), got {over!r}.")
        if mean is not None and not isinstance(mean, torch.Tensor):
            raise ArgumentTypeError(f"hookkit.ablate: mean= takes a tensor, got {type(mean).__name__}.")
        if mean is not None and kind != "mean":
            raise ArgumentError("hookkit.ablate: mean= is the value of a mean ablation; pass kind='mean' with it.")
        super().__init__(index=index, call=call, out=out)
        self.kind = kind
        self.over = over_dims
        self.mean = mean

    def _replacement(self, region: torch.Tensor, target: torch.Tensor, name: str, call: int,
                     where: str) -> torch.Tensor | float:
        if self.kind == "zero":
            return 0.0
        if self.mean is not None:
            return fit_value(self.mean, region, target, self.index, where, "the mean")
        try:
            return region.mean(dim=self.over, keepdim=True)
        except (IndexError, RuntimeError) as e:
            raise EditError(f"{where}: cannot take the mean over dims {self.over} of output"
                            f"{fmt_index(self.index)}, of shape {shape_of(region)} and dtype {region.dtype}: "
                            f"{e}") from None

    def __repr__(self) -> str:
        what = "" if self.kind == "zero" else (", mean=<tensor>" if self.mean is not None else f", over={self.over}")
        return f"hookkit.ablate({self.kind!r}{what}{self._options()})"


class BoundEdit:
    """An edit tied to one layer name: the forward hook ``(module, args, output)`` that ``hooks()`` registers.

    ``calls`` counts the layer's calls since the block began, ``applied`` those it edited; ``check()`` raises
    ``EditError`` if it edited none. A call that activation checkpointing (``torch.utils.checkpoint``) recomputes
    during backward is not a new call: it gets the edit of the call it repeats (the same ``call=`` choice, the same
    value of a capture) and is not counted again.
    """

    def __init__(self, edit: Edit, name: str) -> None:
        self.edit = edit
        self.name = name
        self._numbers = CallNumbers()  # one call identity with the engine: core.checkpointing
        self.applied = 0

    @property
    def calls(self) -> int:
        return self._numbers.count

    def __call__(self, module: Any, args: Any, *rest: Any) -> Any:
        if not rest:
            raise EditError(f"{self.edit!r} on {self.name!r} was called as a forward-pre hook; an edit is a forward "
                            "hook (module, args, output): give it as forward=.")
        call, again = self._numbers.next()
        if call is None or (self.edit.call is not None and call != self.edit.call):
            return None  # torch: a forward hook returning None leaves the output as it is
        edited = self.edit._apply(self.name, call, rest[-1])  # rest is (output,) or, with_kwargs, (kwargs, output)
        if not again:
            self.applied += 1
        return edited

    def check(self) -> None:
        """Raise ``EditError`` if this edit never applied (its layer, or its ``call=k``, never ran)."""
        # An edit that silently never applies (nnsight issues 143 and 502) gives a result that looks like an
        # intervention and is not one: refuse it.
        if self.applied:
            return
        if self.calls == 0:
            seen, fix = ("the layer never ran inside the block",
                         "call the model inside the block, and check that the layer is on its forward path "
                         "(hookkit.layer_names(model, x) lists the layers that run)")
        else:
            seen, fix = (f"the layer ran {self.calls} time(s) and call={self.edit.call} needs "
                         f"{self.edit.call + 1 if self.edit.call is not None else 1}",
                         f"pass call= below {self.calls}, or call=None to edit every call")
        raise EditError(f"{self.edit!r} on {self.name!r} never applied: {seen}. Fix: {fix}.")

    __hookkit_check__ = check  # how hooks() runs it on a clean exit (``intervene.hooks._bind``)

    def __repr__(self) -> str:
        return f"<{self.edit!r} on {self.name!r}: applied {self.applied} of {self.calls} call(s)>"


def patch(value: torch.Tensor | Store | CaptureBlock, *, index: Index = None, call: int | None = None,
          out: Out = 0) -> Edit:
    """Replace a layer's output, or ``output[index]``, by ``value``: a tensor, or the same layer's value in a capture.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        >>> with hookkit.edits(model, {"0": hookkit.patch(torch.zeros(3), index=0)}) as ed:
        ...     y = model(torch.ones(2, 3))
        >>> y[0].tolist(), ed.applied
        ([0.0, 0.0, 0.0], {'0': 1})

    Activation patching: capture the clean run, then patch position 5 of a block in the corrupted run.

        with hookkit.capture(model, ["transformer.h.3"]) as clean:
            model(clean_ids)
        with hookkit.edits(model, {"transformer.h.3": hookkit.patch(clean, index=(slice(None), 5))}):
            patched = model(corrupt_ids)

    Args:
        value: a tensor that broadcasts to ``output[index]`` (moved to its device and dtype), or a
            ``hookkit.Capture`` (or one of its stores): call i of the layer in this block takes call i of the
            capture's value of the same layer name, picked by ``out`` and indexed by ``index`` the same way.
        index: what ``tensor[...]`` takes: ``(slice(None), 5)`` is token position 5 of a ``[B, T, D]`` output,
            ``(..., slice(0, 8))`` the first 8 channels of the last dim. ``None`` (default): the whole output.
        call: ``None`` (default) edits every call of the layer in the block; ``k`` only its k-th call (from 0).
        out: for a tuple / list / dict / ModelOutput / dataclass output, which tensor to edit: a position (an int,
            default 0) or a key or field (a str); the other parts are kept. A tensor output ignores it.

    Returns:
        An ``Edit``: give it to ``hookkit.edits`` or ``hookkit.hooks(model, forward=...)``.

    Raises:
        ArgumentTypeError, ArgumentError: a bad argument (before any hook is registered).
        EditError: in the forward, a value whose shape does not broadcast to ``output[index]`` or a capture
            without this layer's call; on a clean exit, an edit that never applied.
    """
    return _Patch(value, index=index, call=call, out=out)


def add(vector: torch.Tensor, *, scale: float = 1.0, index: Index = None, call: int | None = None,
        out: Out = 0) -> Edit:
    """Steer a layer: replace ``output[index]`` by ``output[index] + scale * vector``.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Identity())
        >>> with hookkit.edits(model, {"0": hookkit.add(torch.tensor([1.0, 0.0]), scale=4)}):
        ...     model(torch.zeros(2, 3, 2))[1, 2].tolist()
        [4.0, 0.0]

    Args:
        vector: a tensor that broadcasts to ``output[index]``: a ``[d_model]`` vector adds to every position of a
            ``[B, T, d_model]`` output.
        scale: the factor on ``vector`` (default 1.0).
        index: as for ``hookkit.patch``.
        call: as for ``hookkit.patch``.
        out: as for ``hookkit.patch``.

    Returns:
        An ``Edit``.

    Raises:
        ArgumentTypeError, ArgumentError: a bad argument (before any hook is registered).
        EditError: in the forward, a vector whose shape does not broadcast to ``output[index]``; on a clean exit,
            an edit that never applied.
    """
    return _Add(vector, scale=scale, index=index, call=call, out=out)


def ablate(kind: Literal["zero", "mean"] = "zero", *, over: int | tuple[int, ...] = 0,
           mean: torch.Tensor | None = None, index: Index = None, call: int | None = None, out: Out = 0) -> Edit:
    """Ablate a layer: zero ``output[index]``, or replace it by its mean (over dims ``over``) or a given mean.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Identity())
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
        >>> with hookkit.edits(model, {"0": hookkit.ablate("mean", over=0, index=(..., 1))}):
        ...     model(x).tolist()
        [[1.0, 4.0], [3.0, 4.0]]

    Args:
        kind: ``"zero"`` (default) or ``"mean"``.
        over: for ``kind="mean"`` without ``mean=``: the dims of ``output[index]`` to average over, an int or a
            tuple (default 0, the batch); the mean of this very output, kept in the autograd graph.
        mean: for ``kind="mean"``: a tensor that broadcasts to ``output[index]`` (e.g. averaged over a reference
            dataset), used in place of the output's own mean.
        index: as for ``hookkit.patch``.
        call: as for ``hookkit.patch``.
        out: as for ``hookkit.patch``.

    Returns:
        An ``Edit``.

    Raises:
        ArgumentError: ``kind`` is not ``"zero"`` / ``"mean"``, or ``mean=`` without ``kind="mean"``.
        ArgumentTypeError: a bad ``over``, ``mean``, ``index``, ``call`` or ``out`` (before any hook is registered).
        EditError: in the forward, a ``mean`` that does not broadcast to ``output[index]`` or dims ``over`` it
            lacks; on a clean exit, an edit that never applied.
    """
    return _Ablate(kind, over=over, mean=mean, index=index, call=call, out=out)


# -- the block ----------------------------------------------------------------------------------------------------
class _Collect:
    """Stands for an edit in ``hooks()``: binds it and keeps each bound copy by layer name for ``Edits.applied``."""

    def __init__(self, edit: Edit, into: dict[str, BoundEdit]) -> None:
        self._edit = edit
        self._into = into

    def bind(self, name: str) -> BoundEdit:
        if name in self._into:
            raise ArgumentError(f"hookkit.edits: two edits for layer {name!r} ({self._into[name].edit!r} and "
                                f"{self._edit!r}); give one per layer, or several with "
                                "hookkit.hooks(model, forward={layer: [edit1, edit2]}).")
        bound = self._into[name] = self._edit.bind(name)
        return bound

    __hookkit_bind__ = bind

    def __call__(self, *args: Any) -> Any:  # never registered: hooks() registers what bind returns
        return self._edit(*args)


class Edits:
    """What ``edits()`` returns: a context manager applying edits while it is open.

    ``applied`` maps each layer name to the number of its calls edited so far.
    """

    def __init__(self, model: nn.Module, edits: Mapping[LayerSpec, Edit]) -> None:
        _check.instance("hookkit.edits", "edits", edits, Mapping, "a dict {layer: edit}")
        if not edits:
            raise ArgumentError("hookkit.edits: edits={} holds no edit; give {layer: edit}, e.g. "
                                "{'layer1': hookkit.ablate()}.")
        for spec, edit in edits.items():
            if spec is None:
                raise layers_needed("hookkit.edits", "a key of edits=")
            if not isinstance(edit, Edit):
                raise ArgumentTypeError(f"hookkit.edits: the value for {spec!r} is {type(edit).__name__}, not an edit "
                                        "(hookkit.patch / add / ablate); for your own functions use hookkit.hooks().")
        self._bound: dict[str, BoundEdit] = {}
        self._hooks: Hooks = hooks(model, forward={spec: _Collect(edit, self._bound) for spec, edit in edits.items()})

    @property
    def applied(self) -> dict[str, int]:
        """``{layer name: number of calls edited}`` since the block began."""
        return {name: bound.applied for name, bound in self._bound.items()}

    def __enter__(self) -> Edits:
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._hooks.__exit__(exc_type, exc, tb)  # removes every hook, then (clean exit) checks each edit applied

    def remove(self) -> None:
        """Remove every hook of this block (``__exit__`` does this for you); safe to call twice."""
        self._hooks.remove()

    def __repr__(self) -> str:
        return "<hookkit.Edits: " + ", ".join(f"{b.edit!r} on {n!r}" for n, b in self._bound.items()) + ">"


def edits(model: nn.Module, edits: Mapping[LayerSpec, Edit]) -> Edits:
    """Apply edits to layers' outputs while the ``with`` block is open; remove them on exit and check they applied.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with hookkit.edits(model, {"0": hookkit.add(torch.ones(2)), "1": hookkit.ablate()}) as ed:
        ...     y = model(torch.randn(3, 2))
        >>> ed.applied
        {'0': 1, '1': 1}
        >>> torch.equal(y, model[2].bias.expand(3, 1))   # everything after the zeroed ReLU is the bias
        True

    Args:
        model: the ``nn.Module`` to edit.
        edits: ``{layer spec: edit}``; a spec is anything ``hooks`` takes (a name from
            ``hookkit.layer_names(model, x)``, op nodes such as ``"layer1.0.add"`` included, a glob, a class...),
            an edit is what ``patch``, ``add`` or ``ablate`` returns. A ``None`` key is an ``ArgumentError``.

    Returns:
        An ``Edits`` context manager; ``applied`` is ``{layer name: number of calls edited}``.

    Raises:
        TypeError: ``edits`` is not a dict of edits; LayerNotFoundError: a spec matched no layer (both before any
            hook is registered).
        EditError: in the forward, a value that does not fit the output; on a clean exit (after the hooks are
            removed), an edit that never applied, naming the layer and how many calls it saw.
    """
    return Edits(model, edits)
