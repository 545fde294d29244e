"""``hookkit summary MODEL --input-shape N,C,H,W``: ``hookkit.summary``'s table of every module call of one
forward pass on a random input.

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds; the model and input come from
``hookkit.cli._inputs``.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.text import Text

from hookkit.cli._inputs import add_model_and_input_args, forward, model_and_input, positive_int

__all__: list[str] = []  # run through `hookkit summary`


def register(sub: Any) -> None:
    """Add ``hookkit summary`` to the subparsers ``sub``."""
    summary_cmd = sub.add_parser(
        "summary",
        help="a table of every module call of one forward pass: shapes, parameters, statistics, time",
        description="Run MODEL once on a random input of --input-shape under no_grad and show hookkit.summary(): "
        "every module call with its output shape, parameter count, output statistics and time.",
    )
    add_model_and_input_args(summary_cmd)
    summary_cmd.add_argument("--depth", type=positive_int, metavar="N",
                             help="show modules with at most N dotted parts (the data keeps every row); default: "
                             "every depth")
    summary_cmd.add_argument("--layers", nargs="+", metavar="LAYER", help="names or globs (default: every submodule)")
    summary_cmd.add_argument("--no-timing", action="store_true", help="leave out the Time column (default: shown)")
    summary_cmd.set_defaults(command=_cmd_summary)


def _cmd_summary(args: argparse.Namespace, console: Console) -> int:
    from hookkit.debug.summary import summary

    model, x = model_and_input(args)
    forward(model, x)  # a clear one-line error for an input the model rejects, before the table
    console.print(summary(model, x, layers=args.layers, depth=args.depth, timing=not args.no_timing))
    if next(iter(model.children()), None) is None:
        shape = ",".join(map(str, args.input_shape))
        console.print(Text(f"{type(model).__name__} has no submodules, so the table has no rows (the line above is "
                           f"the whole model); `hookkit trace {args.model} --input-shape {shape}` shows its input "
                           "and output.", style="yellow"))
    return 0
