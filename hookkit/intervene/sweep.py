"""``patching_sweep()``: activation patching from a clean run into a corrupted one, layer by layer and position by
position, as a table of the metric (TransformerLens' ``patching`` / nnsight's patching tutorial, with hookkit's
checks).

How it connects: one ``capture`` (``record.capture``) of the clean input records every selected layer's output; then
each cell (layer, position) is one copy of the corrupted input inside a batch of up to ``batch`` copies, and one forward
hook per layer (``hooks()``, ``intervene.hooks``; module and op nodes alike) writes the clean values into the copies
that belong to it. Every other copy passes that layer untouched, so one forward serves many cells, across layers too.
The outputs are split back per copy and handed to the user's ``metric``. ``Sweep`` holds the numbers and draws them:
a rich table (rendering only) and a PNG heatmap (matplotlib, optional, as in ``monitoring.plot``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError, ArgumentTypeError
from hookkit.core import check as _check
from hookkit.core import tree as _tree
from hookkit.core.select import Layers, select
from hookkit.intervene.hooks import hooks
from hookkit.record.capture import capture

__all__ = ["patching_sweep", "Sweep"]

_COLORBAR_LABEL = "fraction of the clean-vs-corrupt gap restored"
_FONT_PT = 10  # tick labels; axis labels +1, the title +2: readable at any grid size (the figure grows instead)
_MAX_INCHES = 60.0  # matplotlib refuses figures of more than 2^16 pixels a side
_NOISE = 0.01  # beyond [0, 1] by less: drawn at the end, not flagged (a hundredth of the scale is no colour step)
_UNDER = "#4393c3"  # below 0: blue, the opposite of restoring
_OVER = "#3f007d"  # above 1: dark purple, past the reddest red


class Sweep:
    """What ``patching_sweep`` returns: ``values[i, j]``, the metric with layer ``layers[i]`` patched at position
    ``positions[j]`` (one column, ``positions == [None]``, when whole outputs were patched), beside the metric of
    the clean and of the corrupted run, and what it cost."""

    def __init__(self, values: torch.Tensor, layers: list[str], positions: list[int | None], clean: float,
                 corrupt: float, forwards: int, seconds: float, forward_seconds: float) -> None:
        self.values = values
        self.layers = layers
        self.positions = positions
        self.clean = clean
        self.corrupt = corrupt
        self.forwards = forwards  # patched forwards run (the clean and corrupt runs not counted)
        self.seconds = seconds  # wall time of the patched forwards
        self.forward_seconds = forward_seconds  # one unpatched forward of the corrupted input, for scale

    @property
    def restored(self) -> torch.Tensor:
        """``(values - corrupt) / (clean - corrupt)``: 1 where patching restores the clean metric, 0 where it changes
        nothing (NaN everywhere when clean and corrupt agree)."""
        span = self.clean - self.corrupt
        return (self.values - self.corrupt) / span if span else torch.full_like(self.values, math.nan)

    def __repr__(self) -> str:
        return (f"<hookkit.Sweep {len(self.layers)} layer(s) x {len(self.positions)} position(s); clean "
                f"{self.clean:.4g}, corrupt {self.corrupt:.4g}; {self.forwards} forward(s)>")

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.table import Table
        from rich.text import Text

        restored = self.restored
        table = Table(title=f"metric with one layer patched (clean {self.clean:.4g}, corrupt {self.corrupt:.4g})",
                      caption=f"{self.forwards} patched forward(s), {self.seconds:.2f} s "
                              f"({self.seconds / max(self.forward_seconds, 1e-9):.1f}x one forward)")
        table.add_column("layer", no_wrap=True)
        for p in self.positions:
            table.add_column("all" if p is None else str(p), justify="right")
        for i, name in enumerate(self.layers):
            cells = []
            for j in range(len(self.positions)):
                r = float(restored[i, j])
                style = "" if math.isnan(r) else "bold red" if r >= 0.5 else "yellow" if r >= 0.1 else "dim"
                cells.append(Text(f"{float(self.values[i, j]):.3g}", style=style))
            table.add_row(name, *cells)
        yield table

    def save_png(self, path: str | Path, *, title: str | None = None, labels: Sequence[str] | None = None) -> Path:
        """Draw ``restored`` as a layer x position heatmap into ``path`` (PNG), the positions named by ``labels``
        (e.g. the tokens) if given; needs matplotlib (``pip install 'hookkit[plot]'``).

        The colours are on one fixed scale in every sweep: the fraction of the clean-vs-corrupt gap that patching
        the cell restores, white at 0 (no effect) to red at 1 (the clean metric restored), with a colour bar saying
        so. A cell more than 0.01 outside [0, 1] gets its own colour: below 0 (patching moved the metric away from
        clean) blue, above 1 (overshoot) dark purple; the colour bar then has an arrow at that end and the title
        counts those cells, with the extreme value. A cell within 0.01 of an end (float noise, e.g. -0.003) is
        drawn at that end: the colours cannot show a hundredth of the scale anyway. When clean and corrupt agree
        there is no gap: every cell is grey, and the title says so. Font sizes and the figure size follow the number
        of layers and positions, so the labels stay readable on a large grid.
        """
        where = "Sweep.save_png"
        _check.path(where, "path", path)
        _check.instance(where, "title", title, (str, type(None)), "a str or None")
        _check.instance(where, "labels", labels, (list, tuple, type(None)), "a list of position names or None")
        if labels is not None and len(labels) < max((p for p in self.positions if p is not None), default=-1) + 1:
            raise ArgumentError(f"labels has {len(labels)} name(s), too few for positions {self.positions}.")
        fig = self._figure(title, labels)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)  # as save_feature_grid and plot_run do
        fig.savefig(path, dpi=110)
        return path

    def _figure(self, title: str | None, labels: Sequence[str] | None) -> Any:
        """The matplotlib ``Figure`` that ``save_png`` saves (tests read its colour bar and labels)."""
        from matplotlib import colormaps

        from hookkit.monitoring.plot import matplotlib_figure

        Figure, FigureCanvasAgg = matplotlib_figure("drawing a patching sweep")
        n_layers, n_pos = self.values.shape
        names = ["all" if p is None else f"{p}: {labels[p]}" if labels is not None else str(p)
                 for p in self.positions]
        longest = max((len(n) for n in self.layers), default=1)
        font = _FONT_PT
        # Wide enough for the layer names (at ~0.6 of a point per character) and ~0.45 in per column, tall
        # enough for ~0.28 in per row: the labels keep their size, the figure grows instead.
        width = 2.5 + longest * font * 0.6 / 72 + max(0.45 * n_pos, 2.5)
        height = 1.8 + max(0.28 * n_layers, 2.0) + (max(len(n) for n in names) * font * 0.45 / 72 if labels else 0)
        fig = Figure(figsize=(min(width, _MAX_INCHES), min(height, _MAX_INCHES)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        restored = self.restored.double()
        finite = restored[~restored.isnan()]
        below, above = int((finite < -_NOISE).sum()), int((finite > 1 + _NOISE).sum())
        # within _NOISE of an end: drawn at that end, as the colour scale cannot show a hundredth anyway
        near = ((restored < 0) & (restored >= -_NOISE)) | ((restored > 1) & (restored <= 1 + _NOISE))
        restored = torch.where(near, restored.clamp(0.0, 1.0), restored)
        extend = "both" if below and above else "min" if below else "max" if above else "neither"
        cmap = colormaps["Reds"].with_extremes(under=_UNDER, over=_OVER, bad="lightgray")
        image = ax.imshow(restored.numpy(), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, extend=extend, label=_COLORBAR_LABEL)
        bar.ax.tick_params(labelsize=font)
        bar.set_label(_COLORBAR_LABEL, fontsize=font + 1)
        ax.set_yticks(range(n_layers), self.layers, fontsize=font)
        ax.set_xticks(range(n_pos), names, fontsize=font, rotation=45 if labels else 0,
                      ha="right" if labels else "center")
        ax.set_xlabel("position patched", fontsize=font + 1)
        ax.set_ylabel("layer patched", fontsize=font + 1)
        head = title or f"activation patching: clean {self.clean:.3g}, corrupt {self.corrupt:.3g}"
        notes = []
        if not finite.numel():
            notes.append("clean and corrupt agree: no gap to restore")
        if below:
            notes.append(f"{below} cell(s) below 0 (blue; lowest {float(finite.min()):.2g})")
        if above:
            notes.append(f"{above} cell(s) above 1 (purple; highest {float(finite.max()):.3g})")
        ax.set_title(head + ("\n" + "; ".join(notes) if notes else ""), fontsize=font + 2)
        return fig


def patching_sweep(model: nn.Module, clean: Any, corrupt: Any, layers: Layers, metric: Callable[[Any], Any], *,
                   positions: Sequence[int] | bool | None = None, dim: int = 1, batch: int = 16,
                   forward: Callable[[nn.Module, Any], Any] | None = None) -> Sweep:
    """Patch each layer's clean output into the corrupted run, one layer (and position) at a time, and measure.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
        >>> clean, corrupt = torch.ones(1, 4), torch.zeros(1, 4)
        >>> sweep = hookkit.patching_sweep(model, clean, corrupt, ["0", "2"], lambda out: out.sum())
        >>> [round(v, 4) == round(sweep.clean, 4) for v in sweep.values[:, 0].tolist()]  # a chain: all restore
        [True, True]

    The clean input runs once, with its layers captured. Each cell is one copy of the corrupted input in which
    that layer's output (the first tensor of a tuple / ModelOutput, as an HF block returns it) is replaced by the
    clean one: whole, or only at ``positions`` along ``dim`` (token positions of a ``[batch, seq, ...]`` output).
    Up to ``batch`` copies go through the model in one forward (cells of different layers too), so the model must
    treat batch elements independently; a model with a module in training mode (Dropout, BatchNorm) is refused
    before anything runs: call ``model.eval()``. ``batch=1`` runs one forward per cell. A layer that runs several
    times in a forward is patched call by call.

    Args:
        model: the ``nn.Module``.
        clean: the clean input: a tensor, or a tuple / dict of tensors (a dict is passed as keyword arguments),
            with the batch on dim 0.
        corrupt: the corrupted input, of the same structure and shapes as ``clean``.
        layers: anything ``capture`` accepts, op nodes included (``"layer1.0.add"``); rows in the order
            ``capture`` selects them (modules in ``named_modules`` order, then nodes). Required: ``None`` is an
            ``ArgumentError``.
        metric: ``metric(model_output) -> number`` (a 0-d tensor or float), called on the output of the clean,
            the corrupted and each patched run, each with the batch of the given inputs. E.g. a logit
            difference: ``lambda out: out.logits[0, -1, good] - out.logits[0, -1, bad]``.
        positions: ``None``: whole outputs (one column); ``True``: every position along ``dim``; or a list of
            positions (negative ones count from the end).
        dim: the position dimension of the patched outputs.
        batch: at most this many cells per forward.
        forward: how to call the model on one input (default: ``model(x)``, ``model(*x)`` for a tuple,
            ``model(**x)`` for a dict).

    Returns:
        A ``Sweep``: ``values`` (layers x positions, float64), ``layers``, ``positions``, ``clean``, ``corrupt``,
        ``restored`` (0 = no effect, 1 = clean restored), ``forwards`` and ``seconds`` (the cost), ``save_png()``;
        it renders as a rich table (``rich.print(sweep)``).

    Raises:
        LayerNotFoundError: a spec matched no layer (before anything runs).
        ArgumentError: a module of the model is in training mode (before anything runs: call ``model.eval()``).
        ArgumentError: clean and corrupt differ in structure or shape, a bad ``batch`` / ``positions``, a layer
            whose output has no position ``p`` along ``dim``, or a layer that ran in the clean run but not in a
            patched one (or the other way round).
        ArgumentTypeError: ``metric`` did not return a single number, or a bad ``metric`` / ``forward`` / ``dim``
            / ``batch`` (before anything runs).
    """
    where = "hookkit.patching_sweep"
    _check.function(where, "metric", metric, meaning=" (the model's output -> one number)")
    _check.function(where, "forward", forward, none=True, meaning=" (model, input) -> output")
    _check.whole(where, "dim", dim)
    _check.whole(where, "batch", batch, minimum=1, meaning=" (the most cells per forward; 1: no batching)")
    _same_structure(clean, corrupt)
    names = select(model, layers, caller=where).names  # LayerNotFoundError before anything runs
    _refuse_training(model)
    run = forward or _call
    n_in = _batch_size(clean)

    with torch.no_grad():
        with capture(model, names, clone=True) as cache:
            clean_out = run(model, clean)
        clean_value = _number(metric(clean_out), "the clean run")
        start = time.perf_counter()
        corrupt_value = _number(metric(run(model, corrupt)), "the corrupted run")
        forward_seconds = time.perf_counter() - start
    missing = [n for n in names if n not in cache]
    if missing:
        raise ArgumentError(f"layer(s) {missing} did not run in the clean forward, so there is nothing to patch in; "
                            "pick layers that run (hookkit.layer_names(model, x) lists those of a forward).")
    calls = {n: [_first_tensor(v, n) for v in cache.calls(n)] for n in names}  # what is patched in, per call
    cols = _positions(positions, calls, dim)
    cells = [(i, j) for i in range(len(names)) for j in range(len(cols))]
    values = torch.full((len(names), len(cols)), math.nan, dtype=torch.float64)

    forwards = 0
    start = time.perf_counter()
    for first in range(0, len(cells), batch):
        chunk = cells[first:first + batch]
        plan: dict[str, list[tuple[int, int | None]]] = {}  # layer -> (copy index, position)
        for k, (i, j) in enumerate(chunk):
            plan.setdefault(names[i], []).append((k, cols[j]))
        seen = dict.fromkeys(plan, 0)
        fns: dict[Any, Any] = {name: _patcher(name, calls[name], plan[name], n_in, dim, seen) for name in plan}
        x = _repeat(corrupt, len(chunk))
        with torch.no_grad(), hooks(model, forward=fns):
            out = run(model, x)
        forwards += 1
        for name, n in seen.items():
            if n != len(calls[name]):
                raise ArgumentError(f"layer {name!r} ran {len(calls[name])} time(s) in the clean forward but {n} in a "
                                    "patched one, so its calls cannot be paired; patching needs the same control flow "
                                    "in both runs.")
        for k, (i, j) in enumerate(chunk):
            values[i, j] = _number(metric(_slice(out, k * n_in, (k + 1) * n_in, len(chunk) * n_in)),
                                   f"the run with {names[i]!r} patched")
    seconds = time.perf_counter() - start
    return Sweep(values, names, cols, clean_value, corrupt_value, forwards, seconds, forward_seconds)


# -- pieces ------------------------------------------------------------------------------------------------------------
def _refuse_training(model: nn.Module) -> None:
    """A sweep compares forwards of copies batched together: in training mode Dropout draws other masks and
    BatchNorm normalizes with the batch's statistics (so a cell would depend on ``batch=`` and on its neighbours)
    and updates its running statistics at every forward. Refuse before anything runs, naming the modules."""
    training = [(name, m) for name, m in model.named_modules() if m.training]
    if not training:
        return
    kinds = ("Dropout", "BatchNorm", "InstanceNorm")  # the modules whose forward depends on the mode
    telling = [nm for nm in training if any(k in type(nm[1]).__name__ for k in kinds)]
    shown = ", ".join(f"{repr(name) if name else 'the model itself'} ({type(m).__name__})"
                      for name, m in (telling or training)[:3])
    raise ArgumentError(
        f"patching_sweep needs the model in eval mode, and {len(training)} of its modules are in training mode "
        f"(e.g. {shown}): there, Dropout and BatchNorm make each cell depend on the other copies in its batch "
        "(and on batch=), and every forward would update BatchNorm's running statistics. Call model.eval() "
        "before the sweep (and model.train() after it, to go on training).")


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _same_structure(clean: Any, corrupt: Any) -> None:
    a, b = _tree.leaves(clean), _tree.leaves(corrupt)
    if type(clean) is not type(corrupt) or len(a) != len(b):
        raise ArgumentError(f"clean and corrupt must have the same structure: got {type(clean).__name__} with {len(a)} "
                            f"tensor(s) and {type(corrupt).__name__} with {len(b)}.")
    if not a:
        raise ArgumentError("clean and corrupt hold no tensor: pass the model's input (a tensor, tuple or dict).")
    for k, (u, v) in enumerate(zip(a, b, strict=True)):
        if u.shape != v.shape:
            raise ArgumentError(f"clean and corrupt differ in shape at tensor {k}: {tuple(u.shape)} vs "
                                f"{tuple(v.shape)}; pad them to the same length (the same number of tokens), since "
                                "patching pairs positions one to one.")


def _batch_size(x: Any) -> int:
    sizes = {t.shape[0] if t.dim() else None for t in _tree.leaves(x)}
    if len(sizes) != 1 or None in sizes:
        raise ArgumentError("every input tensor needs the batch on dim 0, of one size; got first dims "
                            f"{sorted(map(str, sizes))}.")
    return int(next(iter(sizes)))  # type: ignore[arg-type]


def _repeat(x: Any, k: int) -> Any:
    return _tree.map_leaves(lambda t: t.repeat(k, *([1] * (t.dim() - 1))) if k > 1 else t, x)


def _slice(out: Any, lo: int, hi: int, total: int) -> Any:
    """The part of a batched output that belongs to one copy: tensors whose dim 0 is the whole batch are sliced,
    others (a scalar the model returned) are passed as they are."""
    return _tree.map_leaves(lambda t: t[lo:hi] if t.dim() and t.shape[0] == total else t, out)


def _number(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ArgumentTypeError(f"metric returned a tensor of shape {tuple(value.shape)} for {what}; it must "
                                    "return one number (reduce it, e.g. .mean()).")
        return float(value.detach().double())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ArgumentTypeError(f"metric returned {type(value).__name__} for {what}; it must return one number.")


def _first_tensor(value: Any, name: str) -> torch.Tensor:
    found = _tree.leaves(value)
    if not found:
        raise ArgumentError(f"layer {name!r} returned no tensor ({type(value).__name__}), so there is nothing to "
                            "patch.")
    return found[0]


def _positions(positions: Sequence[int] | bool | None, calls: dict[str, list[torch.Tensor]],
               dim: int) -> list[int | None]:
    if positions is None or positions is False:
        return [None]
    lengths = {}
    for name, tensors in calls.items():
        for t in tensors:
            if t.dim() <= dim:
                raise ArgumentError(f"layer {name!r} returns shape {tuple(t.shape)}, which has no position dim {dim}; "
                                    "pass dim= (the position dimension), or positions=None to patch whole outputs.")
            lengths[name] = t.shape[dim]
    if len(set(lengths.values())) > 1:
        (a, n), (b, m) = min(lengths.items(), key=lambda kv: kv[1]), max(lengths.items(), key=lambda kv: kv[1])
        raise ArgumentError(f"layer {a!r} has {n} position(s) along dim {dim} and {b!r} has {m}: a position sweep "
                            "needs layers of one sequence length; sweep those apart, or positions=None for whole "
                            "outputs.")
    length = next(iter(lengths.values()))
    if positions is True:
        return list(range(length))
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or not positions:
        raise ArgumentError(f"positions={positions!r}: None, True, or a non-empty list of positions.")
    out: list[int | None] = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -length <= p < length:
            raise ArgumentError(f"position {p!r} is outside the layers' outputs, which have {length} positions along "
                                f"dim {dim}.")
        out.append(p % length)
    return out


def _patcher(name: str, clean_calls: list[torch.Tensor], cells: list[tuple[int, int | None]], n_in: int, dim: int,
             seen: dict[str, int]) -> Callable[..., Any]:
    """The forward hook of one layer in one batched forward: in copy ``k`` of the input, the output of call ``c``
    takes the clean run's call ``c`` (its first tensor: all of it, or at one position along ``dim``)."""

    def hook(module: Any, args: tuple, output: Any) -> Any:
        c = seen[name]
        seen[name] = c + 1
        if c >= len(clean_calls):
            return None  # counted: the caller reports the mismatch after the forward
        clean = clean_calls[c]
        target = _first_tensor(output, name)
        patched = target.clone()
        for k, pos in cells:
            rows = slice(k * n_in, (k + 1) * n_in)
            if pos is None:
                patched[rows] = clean.to(patched.dtype)
            else:
                index = (rows,) + (slice(None),) * (dim - 1) + (pos,)
                patched[index] = clean.select(dim, pos).to(patched.dtype)
        return _replace_first(output, target, patched)

    return hook


def _replace_first(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    if output is old:
        return new
    done = [False]

    def swap(t: torch.Tensor) -> torch.Tensor:
        if t is old and not done[0]:
            done[0] = True
            return new
        return t

    return _tree.map_leaves(swap, output)
