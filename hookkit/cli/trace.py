"""``hookkit trace MODEL --input-shape N,C,H,W``: every hook event of one forward (and ``--backward``) pass on a
random input, one line each, through ``hookkit.trace``.

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds; the model and input come from
``hookkit.cli._inputs``.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.text import Text

from hookkit._errors import CommandLineError
from hookkit.cli._inputs import add_model_and_input_args, forward, model_and_input
from hookkit.core import tree as _tree

__all__: list[str] = []  # run through `hookkit trace`


def register(sub: Any) -> None:
    """Add ``hookkit trace`` to the subparsers ``sub``."""
    trace_cmd = sub.add_parser(
        "trace",
        help="print every hook event of one forward (and backward) pass on a random input",
        description="Run MODEL once on a random input of --input-shape inside hookkit.trace(): one line per "
        "module input, output and (with --backward) gradient, with shapes and statistics.",
    )
    add_model_and_input_args(trace_cmd)
    trace_cmd.add_argument("--layers", nargs="+", metavar="LAYER",
                           help="names, globs or op nodes to trace (default: every submodule; see "
                           "`hookkit layers MODEL`)")
    trace_cmd.add_argument("--backward", action="store_true",
                           help="also run backward() on the sum of the output and show the gradients (default: the "
                           "forward only)")
    trace_cmd.add_argument("--no-stats", action="store_true",
                           help="types and shapes only, the fastest (default: with statistics)")
    trace_cmd.set_defaults(command=_cmd_trace)


def _cmd_trace(args: argparse.Namespace, console: Console) -> int:
    from hookkit.debug.trace import trace

    model, x = model_and_input(args)
    with trace(model, args.layers, console=console, backward=args.backward, stats=not args.no_stats) as t:
        out = forward(model, x)
        if args.backward:
            tensors = [o for o in _tree.leaves(out) if o.requires_grad]
            if not tensors:
                raise CommandLineError("--backward: the model's output does not require grad")
            tensors[0].float().sum().backward()
    console.print(Text(f"{len(t.events)} events; every hook removed.", style="dim"))
    return 0
