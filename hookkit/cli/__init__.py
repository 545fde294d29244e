"""The ``hookkit`` command: ``hookkit layers MODEL`` to discover names, ``hookkit demo`` to capture and show them,
``trace`` / ``summary`` to debug a model on a random input, ``extract`` to write a folder's features to .npy files.

    $ hookkit layers torchvision:resnet18 --depth 2
    $ hookkit demo --layers conv1 layer1 layer4 avgpool

This module is the entry point and the error boundary: ``main`` (the console script and ``python -m hookkit``) and
``run`` parse with ``_parser.build_parser``, whose subcommands each live in their own module (``layers``, ``demo``,
``trace``, ``summary``, ``extract``); ``_inputs`` holds the checks they share. A user's mistake, a ``HookkitError``
(``CommandLineError``, ``ModelSpecError``, ``LayerNotFoundError``, ...) or an argparse usage error, is one
``hookkit: error:`` line and exit code 2. Ctrl-C is one ``hookkit: interrupted`` line (``extract`` adds the rows it
kept and the command that resumes) and exit code 130, the shell's code for SIGINT. Anything else is a bug: ``run``
lets it propagate, ``main`` prints its traceback and a line asking to report it, and returns 1.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

from rich.console import Console

from hookkit._errors import HookkitError
from hookkit.cli._inputs import Interrupted, one_line
from hookkit.cli._parser import build_parser
from hookkit.cli.demo import DEMO_LAYERS, demo_image, run_demo
from hookkit.cli.models import load_model

__all__ = ["main", "run", "run_demo", "demo_image", "DEMO_LAYERS", "load_model"]

_USER_ERRORS = (HookkitError,)  # what a user can fix; every other exception is hookkit's bug
_BUG_LINE = "hookkit: internal error (a bug): please report it with the traceback above"
_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hookkit`` command and return its exit code (0 ok, 2 bad input, 1 a bug in hookkit, shown with
    its traceback); ``argv`` defaults to ``sys.argv``.

    Examples:
        >>> from hookkit.cli import main
        >>> main(["layers", "torchvision:resnet18", "--depth", "1"])  # doctest: +SKIP
        0
    """
    # Like uvicorn or flask, find `module:factory` specs in the working directory (console scripts leave it out).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return run(argv)
    except BrokenPipeError:  # `hookkit layers ... | head`: stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception:  # not the user's mistake (run showed those): hookkit's own, so show where it happened
        traceback.print_exc()
        print(_BUG_LINE, file=sys.stderr)
        return 1


def run(argv: Sequence[str] | None = None, *, console: Console | None = None) -> int:
    """``main`` with the rich ``console`` to render to. No arguments print the help (exit code 0), as ``--help``
    does. A user's mistake is one line on ``sys.stderr`` and exit code 2; Ctrl-C is one line and exit code 130; any
    other exception (a bug) propagates.

    Examples:
        >>> import io; from rich.console import Console; from hookkit.cli import run
        >>> out = Console(file=io.StringIO(), width=120)
        >>> run(["layers", "torchvision:resnet18", "--filter", "layer1.0.*"], console=out)
        0
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # bare `hookkit`: what it can do, as `hookkit --help` shows it
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if console is None:
        # Piped or redirected output has no width to fit: use 120 columns rather than rich's default of 80.
        piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(width=120) if piped else Console()
    args.argv = argv  # the command line as typed, for a command that says how to run it again
    try:
        return args.command(args, console)
    except _USER_ERRORS as exc:
        print(f"hookkit: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        detail = f": {one_line(exc)}" if isinstance(exc, Interrupted) and exc.args else ""
        print(f"hookkit: interrupted{detail}", file=sys.stderr)
        return _INTERRUPTED
