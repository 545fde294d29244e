"""Debugging views on the same hooks as ``capture``: ``trace()`` prints every hook event, ``check_finite()`` stops
at the first module that produces NaN or Inf.

Both are the hook engine (``core.engine.Engine``, as ``capture`` is) given a listener and asked to store nothing, so
they share its selection, its error messages, its gradient taps (tensor hooks that survive in-place ops and dict
outputs) and its promise that every hook comes off on exit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn
from rich.console import Console
from rich.text import Text

from hookkit._errors import ArgumentTypeError, NonFiniteError
from hookkit.core import check as _check
from hookkit.core import tree as _tree
from hookkit.core.compat import current_graph_task_id
from hookkit.core.engine import Engine
from hookkit.core.listener import Listener
from hookkit.core.ops import OpSite, call_name
from hookkit.core.select import Layers, select
from hookkit.core.stats import TensorStats, describe, shorten_name, tensor_stats

__all__ = ["trace", "Trace", "TraceEvent", "check_finite", "CheckFinite"]

EventKind = Literal["forward_pre", "forward", "grad_output", "grad_input"]

_GLYPH = {"forward_pre": "▷", "forward": "◁", "grad_output": "◀", "grad_input": "◀"}
_LABEL = {"forward_pre": "in", "forward": "out", "grad_output": "grad_output", "grad_input": "grad_input"}
_STYLE = {"forward_pre": "cyan", "forward": "green", "grad_output": "magenta", "grad_input": "magenta"}
_NAME_WIDTH = 40


def _stats_of(value: Any) -> tuple[TensorStats, ...]:
    return tuple(tensor_stats(t) for t in _tree.leaves(value))


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    """One hook event: which module, which call, what it saw (as text and as statistics; no tensors are kept)."""

    kind: EventKind
    name: str
    cls: str
    call: int  # 0 for the module's first call in its forward of the model, 1 for the second...
    depth: int  # how many traced modules enclose this one
    text: str  # the values, as ``describe`` writes them
    stats: tuple[TensorStats, ...]
    index: int | None = None  # which output / input tensor, for gradients of modules with several

    def line(self) -> Text:
        """The event as one line of rich ``Text``: indentation, glyph, name (FX's: ``relu_1`` for the second call
        of ``relu`` in one forward), class, what was seen."""
        label = _LABEL[self.kind] + (f"[{self.index}]" if self.index is not None else "")
        name = call_name(shorten_name(self.name, _NAME_WIDTH) if self.name else "(model)", self.call)
        text = Text("  " * self.depth)
        text.append(f"{_GLYPH[self.kind]} ", style=_STYLE[self.kind])
        text.append(name, style="bold")
        text.append(f" {self.cls} ", style="dim")
        text.append(f"{label}: ", style=_STYLE[self.kind])
        bad = any(not s.finite for s in self.stats)
        text.append(self.text, style="bold red" if bad else "")
        return text


class Trace:
    """What ``trace()`` yields: prints each event while open, and keeps them in ``.events``."""

    def __init__(self, model: nn.Module, layers: Layers | None, *, console: Console | None, backward: bool,
                 inputs: bool, stats: bool, ops: bool = False) -> None:
        if console is not None and not isinstance(console, Console):
            raise ArgumentTypeError(f"console= takes a rich.console.Console, got {type(console).__name__} "
                                    f"{console!r}. For standard output leave it out; for text, "
                                    "Console(file=io.StringIO(), color_system=None).")
        _check.flag("hookkit.trace", backward=backward, inputs=inputs, stats=stats, ops=ops)
        self._printer = _TracePrinter(console, inputs=inputs, stats=stats)
        chosen = select(model, layers, caller="hookkit.trace", every_if_none=True)
        self._engine = Engine(model, chosen, listener=self._printer, keep=False, grads=backward, ops=ops)
        self.events: list[TraceEvent] = self._printer.events

    def __enter__(self) -> Trace:
        if self._printer.console is None:
            self._printer.console = Console()
        self._engine.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._engine.__exit__(*exc)
        self._printer.stack.clear()


class _TracePrinter(Listener):
    """The engine's listener for ``trace``: turns each hook event into a ``TraceEvent``, prints its line to the
    console and keeps it in ``events`` (the list ``Trace.events`` shows)."""

    def __init__(self, console: Console | None, *, inputs: bool, stats: bool) -> None:
        self.console = console  # (``Trace.__enter__`` opens standard output if this is None)
        self._inputs = inputs
        self._stats = stats
        self.stack: list[nn.Module] = []
        self._depth: dict[tuple[str, int], int] = {}
        self._needs_input_grad: dict[tuple[str, int], bool] = {}
        self.events: list[TraceEvent] = []

    def _emit(self, kind: EventKind, where: tuple[str, nn.Module, int], value: Any, depth: int,
              index: int | None = None) -> None:
        name, module, call = where
        cls = module.label if isinstance(module, OpSite) else type(module).__name__
        event = TraceEvent(kind, name, cls, call, depth, describe(value, stats=self._stats),
                           _stats_of(value) if self._stats else (), index)
        self.events.append(event)
        assert self.console is not None, "a bug in hookkit: Trace.__enter__ sets the console"
        self.console.print(event.line(), no_wrap=True, overflow="ellipsis", crop=True, soft_wrap=False)

    def forward_pre(self, where: tuple[str, nn.Module, int], args: tuple, kwargs: dict) -> None:
        name, module, call = where
        depth = len(self.stack)
        self.stack.append(module)
        self._depth[(name, call)] = depth
        self._needs_input_grad[(name, call)] = torch.is_grad_enabled() and any(
            t.requires_grad for t in _tree.leaves(args))
        if self._inputs:
            value = _unwrap(args)
            if kwargs:
                value = (value, kwargs) if args else kwargs
            self._emit("forward_pre", where, value, depth)

    def forward(self, where: tuple[str, nn.Module, int], args: tuple, output: Any) -> None:
        name, module, call = where
        while self.stack and self.stack.pop() is not module:
            pass  # a child that raised and was caught inside its parent left its entry behind
        self._emit("forward", where, output, self._depth.get((name, call), 0))

    def grad(self, where: tuple[str, nn.Module, int], which: str, i: int, n: int, grad: torch.Tensor) -> None:
        name, module, call = where
        depth = self._depth.get((name, call), 0)
        if which == "output":
            self._emit("grad_output", where, grad, depth, i if n > 1 else None)
            if not self._needs_input_grad.get((name, call), True):
                self._needs_input_grad[(name, call)] = True  # say it once
                self._emit("grad_input", where, None, depth)
        else:
            self._emit("grad_input", where, grad, depth, i if n > 1 else None)


def _unwrap(args: tuple) -> Any:
    return args[0] if len(args) == 1 else args


def trace(
    model: nn.Module,
    layers: Layers | None = None,
    *,
    console: Console | None = None,
    backward: bool = True,
    inputs: bool = True,
    stats: bool = True,
    ops: bool = False,
) -> Trace:
    """Print one line per hook event (input, output, gradients) of the selected modules while the block is open.

    Examples:
        >>> import io, torch, torch.nn as nn, hookkit
        >>> from rich.console import Console
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> out = Console(file=io.StringIO(), width=120, color_system=None)
        >>> with hookkit.trace(model, console=out) as t:
        ...     _ = model(torch.ones(1, 2))
        >>> [e.kind for e in t.events]
        ['forward_pre', 'forward', 'forward_pre', 'forward']

    Lines are indented by nesting (a parent encloses its children), a module's later calls in one forward are
    named as ``hookkit.layer_names(model, x)`` and ``capture`` name them (``relu_1``, ``relu_2``...), and every
    value is shown with its type, shape, dtype and statistics (mean, std, range, NaN/Inf counts; computed under
    ``no_grad``, keeping no graph and no tensor).

    Args:
        model: the ``nn.Module`` to trace.
        layers: anything ``capture`` accepts, op nodes included; ``None`` (default): every submodule, modules
            only (the model itself if it has none; a DDP / DataParallel wrapper is seen through).
        console: the ``rich.console.Console`` to write to (default: standard output). For plain, testable text:
            ``Console(file=io.StringIO(), color_system=None)``.
        backward: also show the gradients w.r.t. each module's output and inputs during ``backward()``.
        inputs: also show each module's inputs before it runs.
        stats: compute statistics (turn off for the cheapest trace: types and shapes only).
        ops: also show each functional op and tensor method run in the traced modules' own ``forward`` code
            (``F.relu``, ``out += identity``), named as ``hookkit.layer_names(model, x)`` names them, with the op
            in place of the class (``'layer1.0.add' Tensor.add_``). Costs a few microseconds per op.

    Returns:
        A ``Trace`` whose ``events`` list holds every ``TraceEvent`` after the block.

    Raises:
        LayerNotFoundError: as ``capture``, before anything is registered.
        UnsupportedModelError: as ``capture``, before anything is registered.
        TypeError: as ``capture``, before anything is registered; also for a ``console`` that is not a rich
            ``Console``.
    """
    return Trace(model, layers, console=console, backward=backward, inputs=inputs, stats=stats, ops=ops)


# -- check_finite ----------------------------------------------------------------------------------------------------

class CheckFinite:
    """What ``check_finite()`` returns: raises ``NonFiniteError`` at the first non-finite module while open."""

    def __init__(self, model: nn.Module, layers: Layers | None, *, backward: bool, ops: bool = True) -> None:
        _check.flag("hookkit.check_finite", backward=backward, ops=ops)
        self._checker = _FiniteChecker(ops=ops)
        chosen = select(model, layers, caller="hookkit.check_finite", every_if_none=True)
        self._engine = Engine(model, chosen, listener=self._checker, keep=False, grads=backward, ops=ops,
                              op_input_grads=True)

    def __enter__(self) -> CheckFinite:
        self._engine.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._checker.forget()
        self._engine.__exit__(*exc)


class _FiniteChecker(Listener):
    """The engine's listener for ``check_finite``: raises ``NonFiniteError`` at the first non-finite output or
    gradient, naming where it was made."""

    def __init__(self, *, ops: bool) -> None:
        self._ops = ops
        self._last: tuple[torch.Tensor, int | None] | None = None  # the tensor checked last, and its version
        # In the backward pass running now (autograd's graph task): the checked layers whose output received a
        # finite gradient, {name: (call, class)}, to tell where a non-finite gradient was made.
        self._task = -1
        self._reached: dict[str, tuple[int, str]] = {}

    def forget(self) -> None:
        """Drop what the block saw (the last tensor checked, the layers reached in backward) when it closes."""
        self._last = None
        self._reached.clear()

    def forward(self, where: tuple[str, nn.Module, int], args: tuple, output: Any) -> None:
        for t in _tree.leaves(output):
            version = None if t.is_inference() else t._version
            if self._last is not None and t is self._last[0] and version is not None and version == self._last[1]:
                continue  # a container returning its last child's output, unchanged since it was checked
            self._last = (t, version)
            if _nonfinite(t):
                s = tensor_stats(t)
                name, module, call = where
                came = describe(_unwrap(args))
                upstream = any(not st.finite for st in _stats_of(args))
                if isinstance(module, OpSite):
                    scope = _scope(module)
                    said = ("its input was already non-finite: the problem is upstream (the data, or code outside "
                            "the checked modules)" if upstream else "its inputs were finite")
                    raise NonFiniteError(
                        f"{name!r} ({module.label}) in {scope} produced {s.nonfinite_text()} in forward; {said}. "
                        f"Output {describe(t)}; input {came}.",
                        layer=name, phase="forward", call=call, stats=s,
                    )
                hint = (" Its input was already non-finite: the problem is upstream of every checked module "
                        "(the data, or an operation outside a module)." if upstream else
                        " Its input was finite, so this module made them.")
                raise NonFiniteError(
                    f"{call_name(name, call)!r} ({type(module).__name__}) produced {s.nonfinite_text()} in forward; "
                    f"output {describe(t)}; input {came}.{hint}",
                    layer=name, phase="forward", call=call, stats=s,
                )

    def grad(self, where: tuple[str, nn.Module, int], which: str, i: int, n: int, grad: torch.Tensor) -> None:
        name, module, call = where
        task = current_graph_task_id()
        if task != self._task:  # a new backward pass: what reached the checked layers so far is forgotten
            self._task = task
            self._reached.clear()
        if not _nonfinite(grad):
            if which == "output":
                self._reached[name] = (call, _cls(module))
            return
        s = tensor_stats(grad)
        cls = _cls(module)
        if which == "input":
            if isinstance(module, OpSite):  # (``i`` counts the inputs of the op's autograd node, in its order)
                raise NonFiniteError(
                    f"{call_name(name, call)!r} ({cls}) in {_scope(module)} made {s.nonfinite_text()} in backward: "
                    "the gradient became non-finite in its backward: the gradient arriving at its output was finite, "
                    f"the gradient it passed to {'its input' if n == 1 else 'one of its inputs'} is not "
                    f"({describe(grad)}).",
                    layer=name, phase="backward", call=call, stats=s,
                )
            raise NonFiniteError(
                f"{call_name(name, call)!r} ({cls}) has {s.nonfinite_text()} in backward: its backward produced a "
                f"non-finite gradient w.r.t. its {'input' if n == 1 else f'input {i}'} ({describe(grad)}) from a "
                "finite gradient at its output.",
                layer=name, phase="backward", call=call, stats=s,
            )
        what = f"output {i}" if n > 1 else "output"
        enclosing = self._enclosing_reached(name, module)
        if enclosing is None:
            raise NonFiniteError(
                f"{call_name(name, call)!r} ({cls}) has {s.nonfinite_text()} in backward: the gradient arriving at "
                f"its {what} is already non-finite ({describe(grad)}): it comes from outside the checked modules "
                "(the loss, or an operation between modules).",
                layer=name, phase="backward", call=call, stats=s,
            )
        # A checked module around this one received a finite gradient at its output: the non-finite one was made
        # on the way from there to here, by that module's own code (between its checked submodules and ops).
        outer, (outer_call, outer_cls) = enclosing
        unseen = ("an operation in its forward that check_finite(ops=True) does not see (such as a custom "
                  "autograd.Function)" if self._ops else
                  "an operation in its own forward code, between its submodules (check_finite(ops=True) names it)")
        raise NonFiniteError(
            f"{_named(outer, outer_call)} ({outer_cls}) made {s.nonfinite_text()} in backward: the gradient "
            f"became non-finite inside it: it received a finite gradient at its output, and the gradient it passed "
            f"back to the {what} of {call_name(name, call)!r} ({cls}) is not ({describe(grad)}). The cause is "
            f"{unseen}, unless that output is also used outside it (an auxiliary loss on it).",
            layer=outer, phase="backward", call=outer_call, stats=s,
        )

    def _enclosing_reached(self, name: str, module: Any) -> tuple[str, tuple[int, str]] | None:
        """The innermost checked module around ``name`` (by name: an op's scope, a module's parents) that received
        a finite gradient at its output in this backward pass."""
        path = module.scope if isinstance(module, OpSite) else name.rpartition(".")[0] if name else None
        while path is not None:
            found = self._reached.get(path)
            if found is not None:
                return path, found
            path = path.rpartition(".")[0] if path else None
        return None


def _cls(module: Any) -> str:
    return module.label if isinstance(module, OpSite) else type(module).__name__


def _scope(site: OpSite) -> str:
    return (f"{site.scope!r}" if site.scope else "the model") + f" ({site.scope_cls})"


def _named(name: str, call: int) -> str:
    return repr(call_name(name, call)) if name else "the model"


def _nonfinite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0 or t.device.type == "meta":
        return False
    with torch.no_grad():
        # One reduction without a temporary: NaN and Inf always reach the sum. Only when the sum is not finite
        # (which an overflow can also cause) is the exact, allocating check needed.
        total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
        if bool(torch.isfinite(total)):
            return False
        return not bool(torch.isfinite(t).all())


def check_finite(model: nn.Module, layers: Layers | None = None, *, backward: bool = True,
                 ops: bool = True) -> CheckFinite:
    """Raise ``NonFiniteError`` at the first module (in execution order) whose output has NaN or Inf, or, in
    backward, at the first module or op whose backward turned a finite gradient into a non-finite one.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.LogSigmoid(), nn.Linear(2, 1))
        >>> with hookkit.check_finite(model):
        ...     model(torch.tensor([[float("inf"), 1.0]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        hookkit.NonFiniteError: '0' (Linear) produced ...

    The message names the module, its class, forward or backward, what was found (``"2 NaN of 2 values"``), the
    call, and the statistics of what went in. Hooks come off when the error leaves the block.

    In backward the culprit is the module or op whose incoming gradient (w.r.t. its output) was finite and whose
    gradient w.r.t. its inputs is not: an op's backward (``"'2.sqrt' (torch.sqrt) in '2' (Block) made 512 Inf of
    512 values in backward"``, with ``ops=True``), else the checked module whose own code lies between the finite
    gradient at its output and the non-finite one at a submodule's output. A gradient that is already non-finite
    where it enters the checked modules is said to come from outside them (the loss).

    Args:
        model: the ``nn.Module`` to watch.
        layers: anything ``capture`` accepts, op nodes included; ``None`` (default): every submodule, modules
            only (the model itself if it has none; a DDP / DataParallel wrapper is seen through).
        backward: also check gradients during ``backward()`` inside the block.
        ops: also check every functional op and tensor method in the watched modules' own ``forward`` code, so
            that the error names the op (``"'2.sqrt' (torch.sqrt) in '2' (Block) produced 243 NaN of 512 values
            in forward; its inputs were finite"``), and the gradients each op's backward passes on; ``False``
            checks module outputs and gradients only (cheaper).

    Raises:
        NonFiniteError: (while the block is open) at the first non-finite module.
        LayerNotFoundError, TypeError, UnsupportedModelError: as ``capture``, before anything is registered.
    """
    return CheckFinite(model, layers, backward=backward, ops=ops)
