"""Pictures and tables of a ``hookkit.monitor`` run: ``plot_run()`` draws its statistics as a PNG, ``summary_table()``
renders them as a rich table.

    with hookkit.monitor(model, ["layer1", "fc"], every=100, log="runs/exp1") as mon:
        for x, y in loader:
            ...; opt.step(); opt.zero_grad(); mon.step()
    hookkit.plot_run("runs/exp1")          # runs/exp1/monitor.png

The seams: ``monitoring.monitor`` records and ``monitoring.sinks`` writes ``<run>/monitor.jsonl``, one JSON object per
recorded step (``{"step", "time", "layers": {name: {stat: value}}, "params": {name: {stat: value}}, "alerts": [...]}``;
a non-finite float is ``"nan"`` / ``"inf"`` / ``"-inf"`` or ``null``). This module only reads that file
(``read_run``), so it draws a finished run, one still being written, or one copied from another machine, and it never
imports the monitor. ``summary_table`` is rendering only: the monitor prints it at the end of a run and ``hookkit plot``
(``hookkit.cli.plot``) prints it to its console. matplotlib is optional (``pip install 'hookkit[plot]'``): it is
imported when a figure is drawn, with the Agg canvas (no display, no pyplot state), so ``import hookkit`` and
``summary_table`` work without it.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from hookkit._errors import ArgumentError, PlotError
from hookkit.core import check as _check
from hookkit.monitoring.records import JSONL_NAME, LAYER_STATS, PARAM_STATS, BadLine, read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_run", "save_png", "summary_table", "read_run", "check_stats", "matplotlib_figure", "STATS"]

_INSTALL = "pip install 'hookkit[plot]'"
_PNG_FILE = "monitor.png"

# Every name --stats / stats= takes; grad_norm is both a layer's (its output gradient) and a parameter's, and
# "layer:grad_norm" / "param:grad_norm" choose.
STATS = (*dict.fromkeys([*LAYER_STATS, *PARAM_STATS]), "layer:grad_norm", "param:grad_norm")
_LOG_SCALE = {"grad_norm", "weight_norm", "update_ratio", "act_absmax"}  # norms and ratios span decades
MAX_LINES = 12  # above this many names a panel is a heatmap (name x step) unless heatmap=False


# -- reading -------------------------------------------------------------------------------------------------------
def _log_path(run: str | os.PathLike[str]) -> Path:
    """``<run>/monitor.jsonl`` for a run folder, ``run`` itself for a file."""
    path = Path(run)
    if path.is_dir():
        log = path / JSONL_NAME
        if not log.is_file():
            found = sorted(p.name for p in path.glob("*.jsonl"))
            hint = (f" It holds {', '.join(found)}: pass one of those files." if found else
                    " Pass the folder given to hookkit.monitor(log=...), or the .jsonl file itself.")
            raise PlotError(f"{str(path)!r} is a folder without {JSONL_NAME}, so it is not a monitor run.{hint}")
        return log
    if not path.exists():
        raise PlotError(f"no monitor run at {str(path)!r}: there is no such folder or file. Pass the folder given "
                        "to hookkit.monitor(log=...) (it holds monitor.jsonl), or the .jsonl file.")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` (``monitoring.records.read_jsonl``, which owns the format and checks each record's
    shape).
    A last line cut short (a run killed while writing) is left out with a warning; any other line that is not a monitor
    record (not JSON, or a field of the wrong shape) is a ``PlotError`` naming the line and what is wrong."""

    def torn(number: int, reason: str) -> None:
        warnings.warn(f"{path}: line {number} is cut short ({reason}), left out: the run was probably stopped while "
                      "writing it.", stacklevel=5)

    try:
        records = read_jsonl(path, torn=torn)
    except OSError as exc:
        raise PlotError(f"cannot read the monitor log {str(path)!r} ({exc}); pass a monitor.jsonl that hookkit "
                        "wrote.") from None
    except BadLine as exc:
        what = "a monitor record" if exc.json_ok else "JSON of a monitor record"
        raise PlotError(f"{str(path)!r} line {exc.number} is not {what} ({exc.reason}): {exc.text[:60]!r}; pass a "
                        "monitor.jsonl that hookkit wrote.") from None
    return records


def read_run(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a monitor run, in step order: ``run`` is the folder given to ``hookkit.monitor(log=...)``
    (its ``monitor.jsonl`` is read) or a ``.jsonl`` file.

    Examples:
        >>> records = read_run("runs/exp1")  # doctest: +SKIP
        >>> records[-1]["layers"]["layer1"]["zero_frac"]  # doctest: +SKIP
        0.41

    Raises:
        PlotError: no such folder or file, a folder without ``monitor.jsonl``, a file that is empty or not
            monitor records (a line that is not JSON, or whose ``step``, ``layers``, ``params``, ``alerts``...
            are not shaped as hookkit writes them; the message names the line and the field).
    """
    path = _log_path(run)
    records = _read_jsonl(path)
    if not records:
        raise PlotError(f"the monitor log {str(path)!r} holds no records (empty): the run recorded no step yet. "
                        "Call mon.step() after each optimizer step; step 0 is recorded on the first call.")
    return sorted(records, key=lambda r: r["step"])


# -- values --------------------------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A float for a recorded value (``"nan"`` / ``"inf"`` / ``"-inf"`` strings included); None if not recorded."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class _Series:
    """One statistic of every layer or parameter over the run: ``values[i][j]`` is ``names[i]`` at ``steps[j]``
    (None: not recorded)."""

    kind: str  # "layers" or "params"
    stat: str
    steps: list[int]
    names: list[str]
    values: list[list[float | None]]


def _names(records: Sequence[dict[str, Any]], kind: str, stat: str | None = None) -> list[str]:
    """The layers or parameters of ``records`` (in order of first appearance), those recording ``stat`` if given."""
    names: dict[str, None] = {}
    for record in records:
        for name, stats in (record.get(kind) or {}).items():
            if stat is None or (isinstance(stats, dict) and stat in stats):
                names[name] = None
    return list(names)


def _series(records: Sequence[dict[str, Any]], kind: str, stat: str) -> _Series:
    names = _names(records, kind, stat)
    steps = [r["step"] for r in records]
    values = [[_number(((r.get(kind) or {}).get(name) or {}).get(stat)) for r in records] for name in names]
    return _Series(kind, stat, steps, names, values)


def _resolve_stat(records: Sequence[dict[str, Any]], stat: str) -> tuple[str, str]:
    """``(kind, stat)`` for a name of ``STATS``: a bare ``grad_norm`` is the parameters' when the run recorded any
    parameter gradient norm, else the layers'."""
    if stat not in STATS:
        close = difflib.get_close_matches(stat, STATS, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise PlotError(f"unknown statistic {stat!r}.{hint} The statistics are {', '.join(STATS)}.")
    if ":" in stat:
        prefix, name = stat.split(":")
        return ("layers" if prefix == "layer" else "params"), name
    if stat in PARAM_STATS and (stat not in LAYER_STATS or _has_values(records, "params", stat)):
        return "params", stat
    return "layers", stat


def _has_values(records: Sequence[dict[str, Any]], kind: str, stat: str) -> bool:
    return any(_number(s.get(stat)) is not None for r in records for s in (r.get(kind) or {}).values()
               if isinstance(s, dict))


# -- drawing -------------------------------------------------------------------------------------------------------
def matplotlib_figure(what: str = "drawing a monitor run") -> Any:
    """matplotlib's ``Figure`` and Agg canvas, imported now: matplotlib is an optional dependency, and ``what``
    says in the error what needed it (also for ``intervene.sweep``'s heatmap)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"{what} needs matplotlib, which cannot be imported ({exc}); {_INSTALL}.") from exc
    return Figure, FigureCanvasAgg


def _draw(records: Sequence[dict[str, Any]], *, stats: Sequence[str], heatmap: bool | None,
          title: str = "") -> Figure:
    """The figure ``plot_run`` saves: one panel (axes) per statistic of ``stats``, sharing the step axis.

    A panel with at most ``MAX_LINES`` names (and ``heatmap`` not True) has one line per name, labelled with it;
    otherwise it is one image, rows = names, columns = steps, its array the recorded values (masked where not
    finite or not recorded). Non-finite values are marked with an ``x`` (gid ``"nonfinite"``), alerts with a
    vertical line in every panel (gid ``"alert"``).
    """
    import numpy as np

    Figure, FigureCanvasAgg = matplotlib_figure()
    resolved = [_resolve_stat(records, stat) for stat in stats]
    series = [_series(records, kind, stat) for kind, stat in resolved]
    fig = Figure(figsize=(11, 0.8 + 2.9 * len(series)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    groups = _Groups(records)
    alert_steps = sorted({a["step"] for r in records for a in (r.get("alerts") or [])
                          if isinstance(a, dict) and isinstance(a.get("step"), int)})
    for ax, s in zip(axes, series, strict=True):
        who = "layer" if s.kind == "layers" else "parameter"
        ax.set_title(f"{s.stat} per {who}", loc="left", fontsize=10)
        if not s.names:
            ax.text(0.5, 0.5, f"no {who} recorded {s.stat}", transform=ax.transAxes, ha="center", va="center",
                    color="gray")
        data = np.array([[np.nan if v is None else v for v in row] for row in s.values], dtype=float)
        data = data.reshape(len(s.names), len(s.steps))
        recorded = np.array([[v is not None for v in row] for row in s.values], dtype=bool).reshape(data.shape)
        bad = recorded & ~np.isfinite(data)
        finite = np.where(np.isfinite(data), data, np.nan)
        if bool(s.names) and (heatmap is True or (heatmap is None and len(s.names) > MAX_LINES)):
            _draw_image(fig, ax, s, finite, bad)
        else:
            _draw_lines(ax, s, finite, bad, groups)
        for step in alert_steps:
            ax.axvline(step, color="red", alpha=0.5, linestyle=":", linewidth=1, gid="alert")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _log_scale(s: _Series, finite: Any) -> Any:
    """The positive values of a panel if it is drawn on a log scale (a norm or ratio with some), else None."""
    positive = finite[finite > 0] if finite.size else finite
    return positive if s.stat in _LOG_SCALE and positive.size > 0 else None


def _draw_image(fig: Figure, ax: Any, s: _Series, finite: Any, bad: Any) -> None:
    """A panel as one image: rows = names, columns = steps; not recorded or not finite is blank, non-finite an x."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    positive = _log_scale(s, finite)
    log = positive is not None
    masked = np.ma.masked_invalid(np.where(finite <= 0, np.nan, finite) if log else finite)
    norm: Any = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if log else Normalize()
    step = (s.steps[1] - s.steps[0]) if len(s.steps) > 1 else 1
    extent = (s.steps[0] - step / 2, s.steps[-1] + step / 2, len(s.names) - 0.5, -0.5)
    image = ax.imshow(masked, aspect="auto", interpolation="nearest", norm=norm, extent=extent,
                      cmap=colormaps["viridis"].with_extremes(bad="white"))  # not recorded: blank
    fig.colorbar(image, ax=ax, label=s.stat + (" (log)" if log else ""), pad=0.01)
    every = max(1, math.ceil(len(s.names) / 40))
    ticks = list(range(0, len(s.names), every))
    ax.set_yticks(ticks, [s.names[i] for i in ticks], fontsize=6)
    rows, cols = np.nonzero(bad)
    if rows.size:
        ax.plot([s.steps[c] for c in cols], rows, "x", color="red", markersize=6, gid="nonfinite", label="non-finite")


class _Groups:
    """One colour per layer, the same in every panel of a figure: a layer's line (its output statistics) and the
    lines of its parameters (``layer.weight``, ``layer.bias``) share it. Parameters of a layer differ by line style:
    ``weight`` solid, ``bias`` dashed, any other (``in_proj_weight``, ``gamma``) dotted, then dash-dotted. A
    parameter belongs to the longest recorded layer whose name is a dotted prefix of its own, else to the name
    before its last dot."""

    _STYLES = {"weight": "-", "bias": "--"}
    _OTHER = (":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        from matplotlib import colormaps

        self.layers = _names(records, "layers")
        order = dict.fromkeys(self.layers)
        for param in _names(records, "params"):
            order.setdefault(self.of(param))
        self.order = {name: i for i, name in enumerate(order)}
        palette = colormaps["tab10" if len(order) <= 10 else "tab20"]
        self.colours = {name: palette(i % palette.N) for name, i in self.order.items()}

    def of(self, param: str) -> str:
        """The layer that parameter ``param`` belongs to."""
        owner = _owner(param, self.layers)
        return owner if owner is not None else param.rpartition(".")[0]

    def style(self, kind: str, name: str, siblings: Sequence[str]) -> tuple[Any, Any, str]:
        """``(colour, linestyle, group)`` of the line of ``name`` (a layer, or a parameter among ``siblings``,
        the names of its panel)."""
        if kind == "layers":
            return self.colours.get(name), "-", name
        group = self.of(name)
        leaf = name[len(group):].lstrip(".") if group else name
        style: Any = self._STYLES.get(leaf)
        if style is None:
            others = [p for p in siblings if self.of(p) == group and p[len(group):].lstrip(".") not in self._STYLES]
            style = self._OTHER[others.index(name) % len(self._OTHER)]
        return self.colours.get(group), style, group


def _draw_lines(ax: Any, s: _Series, finite: Any, bad: Any, groups: _Groups) -> None:
    """A panel as one line per name, labelled with it; a non-finite value is an x at the top of the panel. A layer's
    parameters share its colour (``_Groups``) and sit together in the legend, in the order of the layers."""
    import numpy as np

    log = _log_scale(s, finite) is not None
    keyed = []
    for i, name in enumerate(s.names):
        colour, style, group = groups.style(s.kind, name, s.names)
        (line,) = ax.plot(s.steps, finite[i], marker="." if len(s.steps) <= 60 else None, label=name, linewidth=1.2,
                          color=colour, linestyle=style)
        keyed.append(((groups.order.get(group, len(groups.order)), i), line))
        cols = np.nonzero(bad[i])[0]
        if cols.size:  # at the top of the panel: a non-finite value has no place on the y axis
            ax.plot([s.steps[c] for c in cols], [0.97] * cols.size, "x", color=line.get_color(),
                    transform=ax.get_xaxis_transform(), gid="nonfinite", markersize=7)
    if log:
        ax.set_yscale("log", nonpositive="mask")
    if s.names:
        handles = [line for _, line in sorted(keyed, key=lambda kl: kl[0])]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  handlelength=3)
    ax.grid(True, alpha=0.3, which="both" if log else "major")


def plot_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
             stats: Sequence[str] = ("grad_norm", "update_ratio", "zero_frac"), heatmap: bool | None = None) -> Path:
    """Draw a monitor run's statistics against the step and save them as a PNG; returns its path.

    Examples:
        >>> hookkit.plot_run("runs/exp1")  # doctest: +SKIP
        PosixPath('runs/exp1/monitor.png')

    One panel per statistic of ``stats``. A layer statistic (``act_mean``, ``act_std``, ``act_absmax``,
    ``zero_frac``, ``nan``, ``inf``) has a line per layer; ``update_ratio``, ``weight_norm`` and ``grad_norm`` are the
    parameters' (``grad_norm`` is the layers' output gradient when no parameter gradient was recorded; write
    ``"layer:grad_norm"`` or ``"param:grad_norm"`` to choose). With more than 12 names a panel is a heatmap, name by
    step. Norms and ratios have a log scale. Non-finite values are red / coloured ``x`` marks; alerts are dotted
    vertical lines in every panel. A layer keeps one colour in every panel, and its parameters take it: ``weight``
    a solid line, ``bias`` a dashed one (others dotted), listed together in the legend, layer by layer.

    Args:
        run: the folder given to ``hookkit.monitor(log=...)``, or its ``.jsonl`` file.
        out: the PNG to write (its folder is created); default ``<run folder>/monitor.png``.
        stats: the statistics to draw, one panel each, in order (names in ``hookkit.monitoring.plot.STATS``).
        heatmap: True draws every panel as a heatmap, False every panel as lines; None (default) chooses by the
            number of names.

    Raises:
        PlotError: the run cannot be read (see ``read_run``), or a statistic is unknown (with the closest names).
        ImportError: matplotlib is not installed (``pip install 'hookkit[plot]'``).
    """
    _check.path("hookkit.plot_run", "run", run)
    _check.path("hookkit.plot_run", "out", out, none=True)
    _check.instance("hookkit.plot_run", "stats", stats, (str, list, tuple), "a statistic name or a list of them")
    _check.instance("hookkit.plot_run", "heatmap", heatmap, (bool, type(None)), "True, False or None (automatic)")
    stats = check_stats(stats)
    check_png(out)
    return save_png(read_run(run), run, out, stats=stats, heatmap=heatmap)


def save_png(records: Sequence[dict[str, Any]], run: str | os.PathLike[str], out: str | os.PathLike[str] | None,
             *, stats: Sequence[str], heatmap: bool | None) -> Path:
    """``plot_run`` on records already read from ``run`` (by ``read_run``; ``stats`` checked by ``check_stats``):
    the command prints its table and draws its PNG from one reading of a run that may still be growing."""
    log = _log_path(run)
    fig = _draw(records, stats=stats, heatmap=heatmap, title=_title(log, records))
    png = Path(out) if out is not None else log.parent / _PNG_FILE
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def check_png(out: str | os.PathLike[str] | None, option: str = "out=") -> None:
    """Refuse an ``out`` that is a folder or does not end in ``.png`` (``option``: how the message names it)."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise ArgumentError(f"{option}{str(out)!r} is a folder; pass the PNG file to write, e.g. "
                            f"{str(path / _PNG_FILE)!r}.")
    if path.suffix.lower() != ".png":
        raise ArgumentError(f"{option}{str(out)!r} does not end in .png; a monitor plot is a PNG: pass a name "
                            "ending in .png.")


def check_stats(stats: Iterable[str]) -> list[str]:
    stats = [stats] if isinstance(stats, str) else list(stats)
    if not stats:
        raise PlotError(f"stats is empty: nothing to draw. Name one or more of {', '.join(STATS)}.")
    for stat in stats:
        _resolve_stat((), stat)  # unknown names fail here, before the run is read
    return stats


def _title(log: Path, records: Sequence[dict[str, Any]]) -> str:
    name = log.parent.name if log.name == JSONL_NAME else log.name
    alerts = sum(len(r.get("alerts") or []) for r in records)
    return (f"{name}: {len(records)} recorded steps ({records[0]['step']}-{records[-1]['step']})"
            + (f", {alerts} alert{'s' * (alerts != 1)}" if alerts else ""))


# -- the table -----------------------------------------------------------------------------------------------------
_TABLE_STATS = (("act_std", "act std"), ("act_absmax", "act |max|"), ("zero_frac", "zero frac"),
                ("grad_norm", "grad norm"))


def _fmt(value: float | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    if not math.isfinite(value):
        return Text(str(value), style="bold red")
    return Text(f"{value:.3g}")


def _last_min_max(values: Sequence[float | None]) -> Text:
    """The last recorded value and, on a second line, the smallest and largest finite one (when they differ)."""
    recorded = [v for v in values if v is not None]
    if not recorded:
        return Text("-", style="dim")
    text = _fmt(recorded[-1])
    finite = [v for v in recorded if math.isfinite(v)]
    low, high = (f"{min(finite):.2g}", f"{max(finite):.2g}") if finite else ("", "")
    if low != high:
        text.append(f"\n{low} - {high}", style="dim")
    return text


def _owner(param: str, layers: Sequence[str]) -> str | None:
    """The recorded layer that holds parameter ``param`` (the longest name that is a dotted prefix of it)."""
    owners = [layer for layer in layers if param.startswith(layer + ".") or layer == ""]
    return max(owners, key=len) if owners else None


def summary_table(records: Sequence[dict[str, Any]]) -> Table:
    """A rich table of a monitor run, one row per layer: the last value and, dimmed, the smallest and largest
    finite value over the run of its activation std, |max|, fraction of zeros, gradient norm and its parameters'
    largest update ratio (a step's change of the weights over their norm; ~1e-3 is healthy); and the first step
    with a non-finite value (or an alert naming the layer).

    Rendering only: pass it to a console (``Console().print(summary_table(read_run("runs/exp1")))``).

    Examples:
        >>> records = [{"step": 0, "layers": {"fc": {"act_std": 1.0, "nan": 0, "inf": 0}}, "alerts": []},
        ...            {"step": 5, "layers": {"fc": {"act_std": "nan", "nan": 3, "inf": 0}}, "alerts": []}]
        >>> table = summary_table(records)  # its fc row: act std nan, first non-finite "step 5 (nan, act_std)"
        >>> table.title, table.row_count
        ('hookkit monitor: 2 recorded steps (0-5)', 1)
    """
    table = Table(title_justify="left")
    if not records:
        table.add_column("hookkit monitor")
        table.add_row(Text("no recorded steps", style="yellow"))
        return table
    steps = [r["step"] for r in records]
    alerts = [a for r in records for a in (r.get("alerts") or []) if isinstance(a, dict)]
    table.title = (f"hookkit monitor: {len(records)} recorded steps ({steps[0]}-{steps[-1]})"
                   + (f", {len(alerts)} alert{'s' * (len(alerts) != 1)}" if alerts else ""))
    layers = _names(records, "layers")
    table.add_column("Layer", style="cyan", no_wrap=True, min_width=min(24, max(map(len, layers), default=5)))
    for _, header in _TABLE_STATS:
        table.add_column(header, no_wrap=True)
    table.add_column("update ratio", no_wrap=True)
    table.add_column("non-finite")
    params = _names(records, "params")
    owned = {layer: [p for p in params if _owner(p, layers) == layer] for layer in layers}
    for layer in layers:
        cells = [_last_min_max(_series_of(records, "layers", layer, stat)) for stat, _ in _TABLE_STATS]
        ratios = [_max_finite(_series_of(records, "params", p, "update_ratio")[j] for p in owned[layer])
                  for j in range(len(records))]
        cells.append(_last_min_max(ratios))
        cells.append(_first_nonfinite(records, layer))
        table.add_row(layer, *cells)
    orphans = [p for p in params if _owner(p, layers) is None]
    if orphans:
        table.caption = (f"{len(orphans)} parameter{'s' * (len(orphans) != 1)} outside the recorded layers "
                         f"(e.g. {orphans[0]}); `hookkit plot RUN --stats update_ratio` draws every parameter.")
    return table


def _series_of(records: Sequence[dict[str, Any]], kind: str, name: str, stat: str) -> list[float | None]:
    return [_number(((r.get(kind) or {}).get(name) or {}).get(stat)) for r in records]


def _max_finite(values: Iterable[float | None]) -> float | None:
    recorded = [v for v in values if v is not None]
    if not recorded:
        return None
    finite = [v for v in recorded if math.isfinite(v)]
    return max(finite) if len(finite) == len(recorded) else next(v for v in recorded if not math.isfinite(v))


def _first_nonfinite(records: Sequence[dict[str, Any]], layer: str) -> Text:
    for record in records:
        stats = (record.get("layers") or {}).get(layer) or {}
        what = [k for k in ("nan", "inf") if (_number(stats.get(k)) or 0) > 0]
        what += [k for k, v in stats.items() if k not in ("nan", "inf") and (n := _number(v)) is not None
                 and not math.isfinite(n)]
        what += [str(a.get("what") or a.get("kind") or "alert") for a in (record.get("alerts") or [])
                 if isinstance(a, dict) and a.get("where") == layer]
        if what:
            return Text(f"step {record['step']} ({', '.join(dict.fromkeys(what))})", style="bold red")
    return Text("-", style="dim")
