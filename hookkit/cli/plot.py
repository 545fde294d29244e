"""``hookkit plot RUN [--out PNG] [--stats STAT ...] [--heatmap]``: the summary table of a ``hookkit.monitor`` run,
printed, and its statistics drawn as a PNG (default ``RUN/monitor.png``).

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds. Reading, the table and the figure are
``hookkit.monitoring.plot``'s (``read_run``, ``summary_table``, ``save_png``; the run is read once, so the table and
the PNG agree on a run still being written); this module checks every option and reads the run before anything is
printed or written, and turns each problem into a ``CommandLineError`` (one ``hookkit: error:`` line, exit code 2)
that says what to do. The table needs only rich: without matplotlib it is printed, followed by a line saying that
the PNG needs ``pip install 'hookkit[plot]'`` (exit code 0, or 2 when ``--out`` asked for the PNG by name).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from hookkit._errors import CommandLineError, PlotError
from hookkit.monitoring.plot import STATS, check_png, check_stats, matplotlib_figure, read_run, save_png, summary_table

__all__: list[str] = []  # run through `hookkit plot`

_DEFAULT_STATS = ("grad_norm", "update_ratio", "zero_frac")


def register(sub: Any) -> None:
    """Add ``hookkit plot`` to the subparsers ``sub``."""
    plot_cmd = sub.add_parser(
        "plot",
        help="a hookkit.monitor run: its summary table, and its statistics per step drawn as a PNG",
        description="Read RUN (the folder given to hookkit.monitor(log=...), or its monitor.jsonl), print one row "
        "per layer (last value and range of its statistics, first non-finite step) and draw one panel per "
        "statistic against the step: lines for up to 12 layers or parameters, a heatmap for more. The PNG needs "
        "matplotlib (pip install 'hookkit[plot]'); without it the table is printed and no PNG is written (exit code "
        "0; an error, exit code 2, when --out names the PNG).",
    )
    plot_cmd.add_argument("run", metavar="RUN", help="a monitor run folder, or its .jsonl file")
    plot_cmd.add_argument("--out", metavar="PNG", help="the PNG to write (default: RUN/monitor.png)")
    plot_cmd.add_argument("--stats", nargs="+", metavar="STAT", default=list(_DEFAULT_STATS),
                          help=f"statistics to draw, one panel each (default: {' '.join(_DEFAULT_STATS)}); any of "
                          f"{', '.join(STATS)}")
    plot_cmd.add_argument("--heatmap", action="store_true",
                          help="draw every panel as a heatmap (name x step), however few the names (default: lines "
                          "for up to 12 names, a heatmap for more)")
    plot_cmd.set_defaults(command=_cmd_plot)


def _cmd_plot(args: argparse.Namespace, console: Console) -> int:
    try:
        stats = check_stats(args.stats)
    except PlotError as exc:
        raise CommandLineError(f"--stats: {exc}") from None
    check_png(args.out, "--out ")  # plot_run's own check, named as the option
    out = Path(args.out) if args.out is not None else None
    try:
        records = read_run(args.run)
    except PlotError as exc:
        raise CommandLineError(str(exc)) from None
    console.print(summary_table(records))
    try:
        matplotlib_figure()
    except ImportError as exc:
        if args.out is not None:  # the PNG was asked for by name: not writing it is an error, after the table
            raise CommandLineError(f"--out {args.out}: {exc}") from None
        console.print(Text(f"no PNG written: {exc}", style="yellow"))
        return 0
    try:
        png = save_png(records, args.run, out, stats=stats, heatmap=True if args.heatmap else None)
    except OSError as exc:
        raise CommandLineError(f"cannot write the PNG ({exc}); pass a writable --out.") from None
    console.print(Text(f"wrote {png}", style="green"))
    return 0
