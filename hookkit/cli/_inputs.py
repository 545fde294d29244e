"""Command-line values -> checked objects, shared by the commands: whole-number and shape parsers, the memory limit
for one input, MODEL specs to models, and the forward pass on a user's model.

Every command module (``layers``, ``demo``, ``trace``, ``summary``, ``extract``) imports from here; nothing here
imports a command. What a user typed wrong is raised as ``CommandLineError`` (or the ``HookkitError`` of the
library call that found it), so that ``hookkit.cli.run`` shows it as one line with exit code 2; any other
exception is a bug and reaches ``run`` unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import CommandLineError, HookkitError
from hookkit.cli.models import load_model
from hookkit.core.stats import fmt_bytes

__all__ = [
    "MODEL_HELP",
    "positive_int",
    "count",
    "seed",
    "shape",
    "add_model_and_input_args",
    "model_and_input",
    "build_model",
    "weights_note",
    "forward",
    "raised_by_hookkit",
    "check_fits",
    "physical_memory_bytes",
    "one_line",
    "Interrupted",
]

MODEL_HELP = (
    "'torchvision:NAME' (e.g. torchvision:resnet18; random weights, nothing is downloaded) or "
    "'package.module:factory' for your own model (a callable taking no arguments that returns an nn.Module, "
    "or an nn.Module object)"
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command that can tell what it kept and how to go on (``hookkit extract``): ``run`` prints
    ``hookkit: interrupted: <message>`` and returns 130. Still a ``KeyboardInterrupt``, so no ``except Exception``
    on the way swallows it."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a ``KeyError``'s without the quotes ``str()`` adds)."""
    message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return " ".join(str(message).split()) or type(exc).__name__


# -- numbers -------------------------------------------------------------------------------------------------------
def _whole_number(low: int, high: int, bounds: str, *, below: str | None = None) -> Any:
    """An argparse ``type=`` for whole numbers in ``[low, high]``: out-of-range values (also ones too large for
    torch or Python's indices) are usage errors at parse time, not a C++ overflow later. ``below``: the shorter
    wording for a value under ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {below or bounds}, got {text!r}") from None
        if not low <= value <= high:
            wording = below if below and value < low else bounds
            raise argparse.ArgumentTypeError(f"expected a whole number {wording}, got {value}")
        return value

    return parse


# Python's own indices and DataLoader batch sizes stop at sys.maxsize; torch.manual_seed takes 64-bit seeds.
positive_int = _whole_number(1, sys.maxsize, f"from 1 to {sys.maxsize}", below=">= 1")
count = _whole_number(0, sys.maxsize, f"from 0 to {sys.maxsize}")
seed = _whole_number(-(2**63), 2**64 - 1, "from -2**63 to 2**64-1 (what torch.manual_seed accepts)")


def shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: ``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``, every size >= 1."""
    try:
        sizes = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write positive sizes separated by commas, "
                                         "e.g. 1,3,224,224")
    return sizes


# -- models and inputs ---------------------------------------------------------------------------------------------
def add_model_and_input_args(p: argparse.ArgumentParser, *, input_required: bool = True,
                             input_help: str = "shape of the random float input") -> None:
    """MODEL, --input-shape, --weights and --seed: the arguments of the commands that run a random input.
    ``input_required=False`` (``layers``): without --input-shape the command runs nothing; ``input_help`` then says
    what the input is for."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--input-shape", required=input_required, type=shape, metavar="N,C,H,W",
                   help=f"{input_help}, comma-separated, e.g. 1,3,224,224 (refused when it would take over half "
                   "of the memory)" + ("" if input_required else "; default: none, the model is not run"))
    p.add_argument("--weights", metavar="PATH",
                   help="a local state_dict file to load into the model; default: none, random weights (--seed)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the weights and the input; default: %(default)s")


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``args.model`` with ``args.weights``, in eval mode; ``torch.manual_seed(args.seed)`` first where
    the command has ``--seed``, so random weights are the same every run. The one place a command builds its
    model (the tests replace ``load_model`` here to check that bad input is refused before it)."""
    if getattr(args, "seed", None) is not None:
        torch.manual_seed(args.seed)
    return load_model(args.model, weights=args.weights)


def model_and_input(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """The model and a random input of ``--input-shape`` (checked to fit in memory before either is made)."""
    sizes = args.input_shape
    check_fits(f"--input-shape {','.join(map(str, sizes))} makes an input", math.prod(sizes),
               "pass a smaller shape")
    model = build_model(args)
    return model, torch.randn(sizes)


def weights_note(spec: str, weights: str | None) -> str:
    if weights is not None:
        return f"weights from {weights}"
    if spec.startswith("torchvision:"):
        return "random weights"
    if os.sep in spec or "/" in spec or os.path.isdir(spec):
        return "the folder's weights"
    return "weights as the factory made them"


def forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)``, where a failure of the model is the user's input problem: the shape they passed is not one it
    takes. Errors that hookkit raised (its own, or a bug in a hook it registered) pass through unchanged."""
    try:
        return model(x)
    except Exception as exc:
        if raised_by_hookkit(exc):
            raise
        raise CommandLineError(f"{type(model).__name__} rejected a random input of shape {tuple(x.shape)}: "
                               f"{one_line(exc)} (pass the shape it expects with --input-shape)") from exc


_PACKAGE = Path(__file__).resolve().parent.parent  # hookkit/
_CLI = Path(__file__).resolve().parent  # hookkit/cli/
# The CLI's loaders are hookkit's code too: a failure inside them is a bug, not the user's model or input.
_CLI_LOADERS = {_CLI / "images.py", _CLI / "texts.py", _CLI / "models.py"}


def raised_by_hookkit(exc: BaseException) -> bool:
    """Whether ``exc`` is hookkit's own: a ``HookkitError``, or raised in hookkit's code outside the CLI (a hook it
    registered, say) and so a bug, not something wrong with the user's model or input."""
    if isinstance(exc, HookkitError):
        return True
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        path = Path(frame.f_code.co_filename).resolve()
        if path.is_relative_to(_PACKAGE) and (not path.is_relative_to(_CLI) or path in _CLI_LOADERS):
            return True
    return False


# -- memory --------------------------------------------------------------------------------------------------------
# The most one input (or one batch of images) may take: half of the memory, as the forward needs at least the input
# and its first activation beside it. Refused before allocating, rather than waiting for the out-of-memory killer.
_INPUT_SHARE_OF_MEMORY = 2  # the limit is memory // this
_MEMORY_IF_UNKNOWN = 16 * 2**30  # where neither sysconf nor a cgroup says (Windows)


def physical_memory_bytes() -> int:
    """The machine's memory, or the container's limit (cgroup v2 or v1) where that is lower."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        memory = -1
    memory = memory if memory > 0 else _MEMORY_IF_UNKNOWN
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = int(f.read().strip())  # "max" (no limit) fails here
        except (OSError, ValueError):
            continue
        if 0 < limit < memory:
            memory = limit
    return memory


def check_fits(what: str, numel: int, fix: str) -> None:
    """Refuse a float32 tensor of ``numel`` elements over the input limit, before it is allocated."""
    nbytes = numel * 4
    memory = physical_memory_bytes()
    limit = memory // _INPUT_SHARE_OF_MEMORY
    if nbytes > limit:
        raise CommandLineError(
            f"{what} ({numel:,} float32 numbers, {fmt_bytes(nbytes)}): more than half of this machine's "
            f"{fmt_bytes(memory)} of memory ({fmt_bytes(limit)}), the most hookkit allocates for one input; {fix}."
        )
