"""The ``hookkit`` argument parser: the top-level options, and one subcommand per command module.

``hookkit.cli.run`` calls ``build_parser``; each command module (``layers``, ``demo``, ``trace``, ``summary``,
``extract``) adds its own subparser in its ``register`` and sets ``command=`` to its handler, which ``run`` calls
with the parsed arguments and the console. A new command is a new module here plus one line in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse

from hookkit._version import __version__
from hookkit.cli import demo, extract, layers, plot, summary, trace

__all__ = ["build_parser"]

_COMMANDS = (layers, demo, trace, summary, extract, plot)  # in the order `hookkit --help` lists them


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``hookkit COMMAND ...``; the parsed namespace's ``command(args, console)`` runs it."""
    parser = argparse.ArgumentParser(
        prog="hookkit",
        description="Safe, pleasant PyTorch module hooks: discover layer names, capture what they produce.",
    )
    parser.add_argument("--version", action="version", version=f"hookkit {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.register(sub)
    return parser
