"""``summary()``: one forward pass, one row per module call: output shapes, parameters, statistics and time.

Capturing and rendering are separate: ``summary()`` records numbers and strings only (no tensor, no module), and
the ``Summary`` it returns renders through rich as a table, to whatever console prints it. The recording is a
listener (``_Recorder``) on the hook engine (``core.engine.Engine``, keeping nothing itself), which places the hooks,
sees through DataParallel / DDP wrappers and numbers each module's calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from hookkit._errors import SummaryError
from hookkit.core import check as _check
from hookkit.core import tree as _tree
from hookkit.core.engine import Engine
from hookkit.core.listener import Listener
from hookkit.core.ops import call_name
from hookkit.core.select import Layers, check_model, select
from hookkit.core.state import restore, save
from hookkit.core.stats import describe, fmt_bytes, fmt_num, nonfinite_words, shorten_name, tensor_stats

__all__ = ["summary", "Summary", "SummaryRow"]

_NAME_LIMIT = 40  # longer layer names keep their first and last dotted parts, with "…" between
_TEXT_WIDTH = 120  # the width of str(summary)
_NO_NODES = ("summary's table has one row per module call, so it takes modules only (hookkit.trace(model, "
             "ops=True) shows ops)")
_EXECUTED_SHOWN = 5  # how many executed layers a SummaryError names


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One call of one module: what it returned (as shapes and statistics), its parameters and its time.

    ``name`` is the call's name as FX and ``capture`` name it: the module's name for its first call, with ``_1``,
    ``_2``... appended for its later calls in the forward (``relu``, ``relu_1``...); ``layer`` is the bare module
    name and ``call`` the 1-based call index.
    Statistics are of the first tensor in the output (``None`` where there is none, or where a number does not
    apply); ``time_ms`` is ``None`` when timing was off.
    """

    name: str
    layer: str
    call: int
    class_name: str
    depth: int
    output: str
    output_shapes: tuple[tuple[int, ...], ...]
    params: int
    trainable: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nan: int
    inf: int
    time_ms: float | None

    def nonfinite_text(self) -> str:
        """E.g. ``"3 NaN 1 Inf"``; empty when the first output tensor is all finite."""
        return " ".join(nonfinite_words(self.nan, self.inf))


@dataclasses.dataclass(frozen=True)
class Summary:
    """What ``summary()`` returns: every module call as a ``SummaryRow``, and totals for the model.

    Prints as a rich table (``console.print(s)``, or ``str(s)`` for plain text 120 columns wide); it never prints
    itself. ``rows`` holds every recorded call; ``depth`` only limits which rows the table shows
    (``dataclasses.replace(s, depth=2)`` shows less of the same summary). It holds no tensor and not the model.
    """

    model: str
    rows: list[SummaryRow]
    total_params: int
    trainable_params: int
    param_bytes: int
    output: str
    output_shapes: tuple[tuple[int, ...], ...]
    time_ms: float | None = None
    depth: int | None = None

    @property
    def shown_rows(self) -> list[SummaryRow]:
        """The rows the table shows: those of depth <= ``depth`` (all of them when ``depth`` is None)."""
        if self.depth is None:
            return list(self.rows)
        return [r for r in self.rows if r.depth <= self.depth]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield _table(self, options.max_width)
        yield _footer(self)

    def __str__(self) -> str:
        """The table as plain text, 120 columns wide, without trailing spaces (what a log file or a test wants)."""
        out = io.StringIO()
        Console(file=out, width=_TEXT_WIDTH, color_system=None, force_terminal=False, legacy_windows=False,
                highlight=False, emoji=False).print(self)
        return "\n".join(line.rstrip() for line in out.getvalue().splitlines())

    def __repr__(self) -> str:
        return (f"<hookkit.Summary of {self.model}: {len(self.rows)} module calls, "
                f"{self.total_params:,} params, output {self.output}>")


def summary(
    model: nn.Module,
    *example_inputs: Any,
    layers: Layers | None = None,
    depth: int | None = None,
    timing: bool = True,
    **forward_kwargs: Any,
) -> Summary:
    """Run ``model(*example_inputs, **forward_kwargs)`` once and summarise every module call, in call order.

    Examples:
        >>> import torch, torch.nn as nn
        >>> from hookkit import summary
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> s = summary(model, torch.ones(1, 4), timing=False)
        >>> print(s)
        Layer  Class   Output shape  Params    Mean    Std     Min     Max
        ──────────────────────────────────────────────────────────────────
        0      Linear  f32[1, 8]         40  -0.193  0.816   -1.46     1.3
        1      ReLU    f32[1, 8]          0   0.202  0.448       0     1.3
        2      Linear  f32[1, 2]         18  -0.159  0.027  -0.178  -0.139
        Sequential: 58 params (232 B) · output f32[1, 2] · 3 module calls · no NaN/Inf
        >>> s.rows[1].name, s.rows[1].min, s.total_params
        ('1', 0.0, 58)

    In a notebook or with ``rich.print(s)`` the same table renders in colour, fitted to the console's width.

    The forward runs under ``torch.no_grad()`` with hookkit's hooks on every submodule (of the model inside a
    DataParallel / DDP wrapper; the root is not a row: its output and totals are in the footer). For each call
    the hooks record the output's shapes, the first output tensor's mean / std / min / max and NaN / Inf counts,
    and the wall time from the start of the call to its end, children included, less the time hookkit spends on
    the children's statistics (on CUDA the hooks synchronise, so the time covers the kernels). Only numbers and
    strings are kept.

    The model is left as it was: its hooks (removed in ``finally``, whatever happens), ``model.training`` (the
    forward runs in the mode the model is in: call ``model.eval()`` first for inference behaviour), grad mode, and
    its buffers (a train-mode BatchNorm's running statistics are put back after the pass).

    Args:
        model: the ``nn.Module`` to run. TorchScript and ``torch.compile``-d models are refused (their module
            hooks do not run).
        *example_inputs: the positional inputs of one forward pass, e.g. ``torch.randn(1, 3, 224, 224)``.
        layers: only these layers get rows (names, globs, classes, module objects, predicates or lists, as in
            ``hookkit.capture``). Default ``None``: every submodule (a DDP / DataParallel wrapper is seen
            through). Modules only: a row is a module call, so an op or repeated-call node (``"layer1.0.add"``,
            ``"relu_1"``) is an ``ArgumentError``; ``hookkit.trace(model, ops=True)`` shows ops.
        depth: the table shows only rows of depth <= ``depth`` (``"layer1"`` has depth 1, ``"layer1.0.conv1"``
            depth 3); ``rows`` still holds every call. Default ``None``: show all.
        timing: record the wall time of each call (column "Time (ms)"). Default ``True``; turn off for output that
            is the same on every run.
        **forward_kwargs: keyword inputs of the forward pass.

    Returns:
        A ``Summary``: ``rows`` (one frozen ``SummaryRow`` per module call), ``total_params``,
        ``trainable_params``, ``param_bytes``, the model's ``output`` (and ``output_shapes``) and ``time_ms``.

    Raises:
        SummaryError: the forward raised; the message names the module it failed in and the layers that ran
            before it, and the original error is chained as ``__cause__``. No hook is left behind.
        LayerNotFoundError: a ``layers`` spec matched nothing (a ``LookupError``); nothing has run.
        ArgumentError: an op or repeated-call node in ``layers``; nothing has run.
        UnsupportedModelError: a TorchScript or compiled model.
        ValueError: ``depth`` is below 1.
    """
    check_model(model)
    _check.whole("hookkit.summary", "depth", depth, minimum=1, none=True, meaning=" (1 shows only top-level layers)")
    _check.flag("hookkit.summary", timing=timing)
    chosen = select(model, layers, caller="hookkit.summary", every_if_none=True, no_nodes=_NO_NODES)
    targets = [(names[0], module) for module, names in chosen.modules.items() if names[0]]

    recorder = _Recorder(targets, timing=timing, sync=_needs_sync(model, example_inputs, forward_kwargs, timing))
    # The engine hooks each target (given as module objects: a name is never read as a glob) and tells the recorder
    # of every call; it keeps nothing itself. A model without submodules has no row: nothing to hook.
    engine = Engine(model, [m for _, m in targets], listener=recorder, keep=False) if targets else None
    saved = save(model)  # every module's flag and buffer: a train-mode BatchNorm's statistics are put back
    try:
        with engine if engine is not None else contextlib.nullcontext():
            start = recorder.now()
            with torch.no_grad():
                output = model(*example_inputs, **forward_kwargs)
            total_s = recorder.now() - start - recorder.overhead
    except Exception as exc:
        raise SummaryError(recorder.failure_message(model, exc)) from exc
    finally:
        restore(saved)

    params = list(model.parameters())
    total = sum(_numel(p) for p in params)
    return Summary(
        model=type(model).__name__,
        rows=recorder.rows(),
        total_params=total,
        trainable_params=sum(_numel(p) for p in params if p.requires_grad),
        param_bytes=sum(_numel(p) * p.element_size() for p in params),
        output=describe(output, stats=False),
        output_shapes=tuple(tuple(t.shape) for t in _tree.leaves(output)),
        time_ms=total_s * 1000 if timing else None,
        depth=depth,
    )


# -- recording -----------------------------------------------------------------------------------------------------
class _Call:
    """One module call while the forward runs; turned into a ``SummaryRow`` once the forward has finished."""

    __slots__ = ("name", "module", "call", "start", "overhead0", "output", "shapes", "stats", "seconds", "done")

    def __init__(self, name: str, module: nn.Module, call: int) -> None:
        self.name = name
        self.module = module  # dropped with the recorder; never reaches the Summary
        self.call = call
        self.start = 0.0
        self.overhead0 = 0.0
        self.output = ""
        self.shapes: tuple[tuple[int, ...], ...] = ()
        self.stats: Any = None
        self.seconds: float | None = None
        self.done = False

    def label(self) -> str:
        return call_name(self.name, self.call - 1)


class _Recorder(Listener):
    """The engine's listener: calls in start order, the stack of running calls, and hookkit's own time."""

    def __init__(self, targets: list[tuple[str, nn.Module]], *, timing: bool, sync: Callable[[], None] | None) -> None:
        self.names = {id(module): name for name, module in targets}  # a row's name: the one it was selected by
        self.timing = timing
        self.sync = sync
        self.calls: list[_Call] = []
        self.stack: list[_Call] = []
        self.finished: list[_Call] = []
        self.overhead = 0.0  # seconds spent in hookkit's statistics, subtracted from the enclosing calls' times

    def now(self) -> float:
        if not self.timing:
            return 0.0
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def forward_pre(self, where: tuple[str, nn.Module, int], args: tuple, kwargs: dict) -> None:
        _, module, index = where  # index: this call's among the module's calls in the forward, from 0
        call = _Call(self.names[id(module)], module, index + 1)
        self.calls.append(call)
        self.stack.append(call)
        call.overhead0 = self.overhead
        call.start = self.now()  # last, so that the bookkeeping above is not timed

    def forward(self, where: tuple[str, nn.Module, int], args: tuple, output: Any) -> None:
        end = self.now()
        call = self._pop(where[1])
        if call is None:  # pragma: no cover - a call that started before the hooks were registered
            return
        if self.timing:
            call.seconds = end - call.start - (self.overhead - call.overhead0)
        call.output = describe(output, stats=False)
        tensors = _tree.leaves(output)
        call.shapes = tuple(tuple(t.shape) for t in tensors)
        call.stats = tensor_stats(tensors[0]) if tensors else None
        call.done = True
        self.finished.append(call)
        if self.timing:
            self.overhead += time.perf_counter() - end

    def _pop(self, module: nn.Module) -> _Call | None:
        # The innermost running call of this module; calls above it that never finished (their forward raised
        # and a parent caught the error) are dropped from the stack.
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i].module is module:
                call = self.stack[i]
                del self.stack[i:]
                return call
        return None

    def failure_message(self, model: nn.Module, exc: BaseException) -> str:
        if self.stack:
            where = f"{self.stack[-1].label()} ({type(self.stack[-1].module).__name__})"
        else:
            where = f"<root> ({type(model).__name__}, in its own forward, outside any hooked layer)"
        before = [c.label() for c in self.finished[-_EXECUTED_SHOWN:]]
        if len(self.finished) > _EXECUTED_SHOWN:
            before.insert(0, "…")
        executed = ", ".join(before) if before else "none"
        return f"forward failed in {where}: {type(exc).__name__}: {exc}; layers executed before: {executed}"

    def rows(self) -> list[SummaryRow]:
        param_counts: dict[int, tuple[int, int]] = {}
        rows = []
        for call in self.calls:
            module = call.module
            if id(module) not in param_counts:
                params = list(module.parameters())
                param_counts[id(module)] = (sum(_numel(p) for p in params),
                                            sum(_numel(p) for p in params if p.requires_grad))
            n_params, n_trainable = param_counts[id(module)]
            s = call.stats
            rows.append(SummaryRow(
                name=call.label(),
                layer=call.name,
                call=call.call,
                class_name=type(module).__name__,
                depth=call.name.count(".") + 1,
                output=call.output if call.done else "(did not finish)",
                output_shapes=call.shapes,
                params=n_params,
                trainable=n_trainable,
                mean=None if s is None else s.mean,
                std=None if s is None else s.std,
                min=None if s is None else s.min,
                max=None if s is None else s.max,
                nan=0 if s is None else s.nan,
                inf=0 if s is None else s.inf,
                time_ms=None if call.seconds is None else call.seconds * 1000,
            ))
        return rows


def _numel(p: torch.Tensor) -> int:
    return 0 if nn.parameter.is_lazy(p) else p.numel()


def _needs_sync(model: nn.Module, inputs: tuple, kwargs: dict, timing: bool) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` when timing a model or inputs on CUDA (kernels run asynchronously)."""
    if not timing or not torch.cuda.is_available():
        return None
    tensors = _tree.leaves(list(inputs)) + _tree.leaves(dict(kwargs))
    tensors += list(model.parameters()) + list(model.buffers())
    return torch.cuda.synchronize if any(t.is_cuda for t in tensors) else None


# -- rendering -----------------------------------------------------------------------------------------------------
def _fmt_params(n: int) -> str:
    return f"{n:,}"


_GAP = 2  # columns are two spaces apart (padding collapsed, box.SIMPLE_HEAD's space between)
# Text columns shrink to these (or their natural width, if less) before numbers or anything else give way.
_MIN_WIDTH = {"Layer": 12, "Class": 8, "Output shape": 24}
_DROP_WHEN_NARROW = ("Class", "Std")  # left out, in this order, when even the minimum widths do not fit
_STYLES = {"Class": "cyan", "Params": "green", "Non-finite": "bold red"}


def _table(s: Summary, width: int) -> Table:
    """The rows as a table that fits ``width``: numbers keep their width; layer names, classes and shapes give way."""
    rows = s.shown_rows
    top = min((r.depth for r in rows), default=1)
    indents = [2 * (r.depth - top) for r in rows]  # relative: rows of only deep layers do not start far right
    columns: dict[str, list[str]] = {
        "Layer": [" " * i + shorten_name(r.name, _NAME_LIMIT) for i, r in zip(indents, rows, strict=True)],
        "Class": [r.class_name for r in rows],
        "Output shape": [r.output for r in rows],
        "Params": [_fmt_params(r.params) for r in rows],
        "Mean": [fmt_num(r.mean) for r in rows],
        "Std": [fmt_num(r.std) for r in rows],
        "Min": [fmt_num(r.min) for r in rows],
        "Max": [fmt_num(r.max) for r in rows],
    }
    if any(r.nan or r.inf for r in rows):  # an all-blank column would only take room: the footer says so instead
        columns["Non-finite"] = [r.nonfinite_text() for r in rows]
    if s.time_ms is not None:
        columns["Time (ms)"] = ["-" if r.time_ms is None else f"{r.time_ms:.2f}" for r in rows]

    widths = {h: max([cell_len(h), *(cell_len(c) for c in cells)]) for h, cells in columns.items()}
    least = {h: min(widths[h], m) for h, m in _MIN_WIDTH.items()}
    text = list(_MIN_WIDTH)
    for drop in _DROP_WHEN_NARROW:
        if _room(widths, text, width) >= sum(least[h] for h in text):
            break
        del columns[drop], widths[drop]
        text = [h for h in text if h != drop]
    _fit(widths, least, text, _room(widths, text, width))

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True,
                  header_style="bold")
    for header in columns:
        is_text = header in _MIN_WIDTH
        table.add_column(header, style=_STYLES.get(header), justify="left" if is_text else "right", no_wrap=True,
                         overflow="ellipsis", width=widths[header] if is_text else None)
    names, layer_width = columns["Layer"], widths["Layer"]
    if any(cell_len(name) > layer_width for name in names):
        # Names too long for the column: indent one space a level instead of two (in every row, so the nesting
        # still reads), then shorten what still does not fit, keeping the last parts that tell layers apart.
        for i, (indent, r) in enumerate(zip(indents, rows, strict=True)):
            indent = min(indent // 2, max(layer_width - 12, 0))
            names[i] = " " * indent + shorten_name(r.name, min(layer_width - indent, _NAME_LIMIT))
    for i in range(len(rows)):
        table.add_row(*(Text(cells[i]) if h in _MIN_WIDTH else cells[i] for h, cells in columns.items()))
    return table


def _room(widths: dict[str, int], text: list[str], width: int) -> int:
    """The width left for the text columns once the numbers and the gaps between all columns have theirs."""
    return width - _GAP * (len(widths) - 1) - sum(w for h, w in widths.items() if h not in text)


def _fit(widths: dict[str, int], least: dict[str, int], text: list[str], room: int) -> None:
    """Shrink the text columns in place to fit ``room``: first a long class name (to 12), then the wider of layer
    and output shape, then the class, each down to its ``least`` width."""
    def excess() -> int:
        return sum(widths[h] for h in text) - room

    if "Class" in text:
        widths["Class"] -= max(0, min(excess(), widths["Class"] - 12))
    while excess() > 0:
        shrinkable = [h for h in ("Layer", "Output shape") if widths[h] > least[h]]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda h: widths[h])] -= 1
    if "Class" in text:
        widths["Class"] -= max(0, min(excess(), widths["Class"] - least["Class"]))
    # Narrower still, rich shares what is left among all the columns.


def _footer(s: Summary) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(s.model, style="bold")
    text.append(f": {_fmt_params(s.total_params)} params ({fmt_bytes(s.param_bytes, si=True)})")
    if s.trainable_params != s.total_params:
        text.append(f", {_fmt_params(s.trainable_params)} trainable")
    text.append(f" · output {s.output} · {len(s.rows)} module calls")
    shown = len(s.shown_rows)
    if shown != len(s.rows):
        text.append(f" ({shown} shown, depth <= {s.depth})")
    bad = [r for r in s.rows if r.nan or r.inf]
    if bad:
        text.append(f" · {len(bad)} with NaN/Inf (first: {bad[0].name})", style="bold red")
    else:
        text.append(" · no NaN/Inf")
    if s.time_ms is not None:
        text.append(f" · forward {s.time_ms:.2f} ms")
    return text
