"""The ``hookkit`` command: ``hookkit layers MODEL`` to discover names, ``hookkit demo`` to capture and show them.

    $ hookkit layers torchvision:resnet18 --depth 2
    $ hookkit demo --layers conv1 layer1 layer4 avgpool
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from . import __version__, _tree
from ._errors import HookkitError, CommandLineError
from ._images import IMAGENET_MEAN, IMAGENET_STD
from ._models import load_model
from ._stats import fmt_bytes, fmt_num, tensor_stats
from ._select import Layers, resolve
from ._capture import capture

__all__ = ["main", "run", "run_demo", "hook_census", "demo_image"]

DEMO_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "avgpool")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_USER_ERRORS = (HookkitError, LookupError, ValueError, TypeError)


# -- entry points --------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hookkit`` command and return its exit code (0 ok, 2 bad input); ``argv`` defaults to ``sys.argv``.

    Example:
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


def run(argv: Sequence[str] | None = None, *, console: Console | None = None) -> int:
    """``main`` with the rich ``console`` to render to (errors still go to ``sys.stderr`` as one line).

    Example:
        >>> import io; from rich.console import Console; from hookkit.cli import run
        >>> out = Console(file=io.StringIO(), width=120)
        >>> run(["layers", "torchvision:resnet18", "--filter", "layer1.0.*"], console=out)
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if console is None:
        # Piped or redirected output has no width to fit: use 120 columns rather than rich's default of 80.
        piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(width=120) if piped else Console()
    try:
        return args.command(args, console)
    except _USER_ERRORS as exc:
        print(f"hookkit: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return " ".join(str(message).split()) or type(exc).__name__


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
_positive_int = _whole_number(1, sys.maxsize, f"from 1 to {sys.maxsize}", below=">= 1")
_count = _whole_number(0, sys.maxsize, f"from 0 to {sys.maxsize}")
_seed = _whole_number(-(2**63), 2**64 - 1, "from -2**63 to 2**64-1 (what torch.manual_seed accepts)")


_MODEL_HELP = (
    "'torchvision:NAME' (e.g. torchvision:resnet18; random weights, nothing is downloaded) or "
    "'package.module:factory' for your own model (a callable taking no arguments that returns an nn.Module, "
    "or an nn.Module object)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookkit",
        description="Safe, pleasant PyTorch module hooks: discover layer names, capture what they produce.",
    )
    parser.add_argument("--version", action="version", version=f"hookkit {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    layers = sub.add_parser(
        "layers",
        help="list every layer name hookkit accepts for a model, with class and parameter counts",
        description="List every name that hookkit.capture() and hookkit.hooks() accept for MODEL (the names of "
        "named_modules(remove_duplicate=False) except the root), with its class and parameter counts, as a tree "
        "nested by dotted name.",
    )
    layers.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    layers.add_argument("--weights", metavar="PATH", help="a local state_dict file to load into the model")
    layers.add_argument("--depth", type=_positive_int, metavar="N",
                        help="show names with at most N dotted parts (1 = the model's direct children)")
    layers.add_argument("--filter", metavar="GLOB",
                        help="show only names that this name or glob selects, as capture() would: '*' stays "
                        "inside one dotted part, '**' crosses parts (e.g. 'layer1.**', '**conv*')")
    layers.add_argument("--table", action="store_true", help="a flat table with own and total parameters")
    layers.set_defaults(command=_cmd_layers)

    demo = sub.add_parser(
        "demo",
        help="capture a torchvision model's activations on a generated image and show their statistics",
        description="Build a model (random weights: nothing is downloaded), feed it a deterministic generated "
        "224x224 RGB image normalised with ImageNet mean/std, capture the chosen layers with hookkit.capture(), "
        "show a statistics table, check that every hook was removed, and print the top-5 logits.",
    )
    demo.add_argument("--model", default="torchvision:resnet18", metavar="MODEL",
                      help=f"{_MODEL_HELP}; default: %(default)s")
    demo.add_argument("--weights", metavar="PATH", help="a local state_dict file to load into the model")
    demo.add_argument("--layers", nargs="+", default=list(DEMO_LAYERS), metavar="LAYER",
                      help="layer names or globs to capture (see `hookkit layers MODEL`); default: %(default)s")
    demo.add_argument("--seed", type=_seed, default=0,
                      help="seed of the random weights and of the generated image; default: %(default)s")
    demo.set_defaults(command=_cmd_demo)

    trace_cmd = sub.add_parser(
        "trace",
        help="print every hook event of one forward (and backward) pass on a random input",
        description="Run MODEL once on a random input of --input-shape inside hookkit.trace(): one line per "
        "module input, output and (with --backward) gradient, with shapes and statistics.",
    )
    _model_and_input_args(trace_cmd)
    trace_cmd.add_argument("--layers", nargs="+", metavar="LAYER",
                           help="names or globs to trace (default: every module; see `hookkit layers MODEL`)")
    trace_cmd.add_argument("--backward", action="store_true",
                           help="also run backward() on the sum of the output and show the gradients")
    trace_cmd.add_argument("--no-stats", action="store_true", help="types and shapes only (fastest)")
    trace_cmd.set_defaults(command=_cmd_trace)

    summary_cmd = sub.add_parser(
        "summary",
        help="a table of every module call of one forward pass: shapes, parameters, statistics, time",
        description="Run MODEL once on a random input of --input-shape under no_grad and show hookkit.summary(): "
        "every module call with its output shape, parameter count, output statistics and time.",
    )
    _model_and_input_args(summary_cmd)
    summary_cmd.add_argument("--depth", type=_positive_int, metavar="N",
                             help="show modules with at most N dotted parts (the data keeps every row)")
    summary_cmd.add_argument("--layers", nargs="+", metavar="LAYER", help="names or globs (default: every module)")
    summary_cmd.add_argument("--no-timing", action="store_true", help="leave out the Time column")
    summary_cmd.set_defaults(command=_cmd_summary)

    extract_cmd = sub.add_parser(
        "extract",
        help="features of every image in a folder, streamed to DIR/<layer>.npy (resumable)",
        description="Run MODEL over every image under --data (sorted by relative path, so row i is always the same "
        "image; standard ImageNet preprocessing) and write DIR/<layer>.npy, DIR/manifest.json and DIR/files.txt "
        "(the image of each row). Run the same command again to resume an interrupted extraction.",
    )
    extract_cmd.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    extract_cmd.add_argument("--layers", nargs="+", required=True, metavar="LAYER",
                             help="layer names or globs (see `hookkit layers MODEL`)")
    extract_cmd.add_argument("--data", required=True, metavar="IMAGE_FOLDER",
                             help="a folder of images (ImageFolder-style class subfolders or flat)")
    extract_cmd.add_argument("--out", required=True, metavar="DIR", help="where the .npy files go")
    extract_cmd.add_argument("--pool", choices=["avg", "max", "flatten", "cls"],
                             help="per image: global average / max over space or tokens, flatten, or first token")
    extract_cmd.add_argument("--batch-size", type=_positive_int, default=64, metavar="N")
    extract_cmd.add_argument("--image-size", type=_positive_int, default=224, metavar="PX",
                             help="side of the square crop; default: %(default)s (a batch over half of the memory "
                             "is refused)")
    extract_cmd.add_argument("--dtype", choices=["float32", "float16"], default=None,
                             help="storage dtype (default: the layer's own)")
    extract_cmd.add_argument("--workers", type=_count, default=0, metavar="N", help="DataLoader worker processes")
    extract_cmd.add_argument("--weights", metavar="PATH", help="a local state_dict file to load into the model")
    extract_cmd.add_argument("--seed", type=_seed, default=0, help="seed of random weights; default: %(default)s")
    extract_cmd.set_defaults(command=_cmd_extract)
    return parser


def _model_and_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--input-shape", required=True, type=_shape, metavar="N,C,H,W",
                   help="shape of the random float input, comma-separated, e.g. 1,3,224,224 (refused when "
                   "it would take over half of the memory)")
    p.add_argument("--weights", metavar="PATH", help="a local state_dict file to load into the model")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the weights and the input; default: %(default)s")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write positive sizes separated by commas, "
                                         "e.g. 1,3,224,224")
    return shape


# The most one input (or one batch of images) may take: half of the memory, as the forward needs at least the input
# and its first activation beside it. Refused before allocating, rather than waiting for the out-of-memory killer.
_INPUT_SHARE_OF_MEMORY = 2  # the limit is memory // this
_MEMORY_IF_UNKNOWN = 16 * 2**30  # where neither sysconf nor a cgroup says (Windows)


def _physical_memory_bytes() -> int:
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


def _check_fits(what: str, numel: int, fix: str) -> None:
    """Refuse a float32 tensor of ``numel`` elements over the input limit, before it is allocated."""
    nbytes = numel * 4
    memory = _physical_memory_bytes()
    limit = memory // _INPUT_SHARE_OF_MEMORY
    if nbytes > limit:
        raise CommandLineError(
            f"{what} ({numel:,} float32 numbers, {fmt_bytes(nbytes)}): more than half of this machine's "
            f"{fmt_bytes(memory)} of memory ({fmt_bytes(limit)}), the most hookkit allocates for one input; {fix}."
        )


def _model_and_input(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    shape = args.input_shape
    _check_fits(f"--input-shape {','.join(map(str, shape))} makes an input", math.prod(shape),
                "pass a smaller shape")
    torch.manual_seed(args.seed)
    model = load_model(args.model, weights=args.weights)
    return model, torch.randn(args.input_shape)


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    try:
        return model(x)
    except Exception as exc:
        raise ValueError(f"{type(model).__name__} rejected a random input of shape {tuple(x.shape)}: "
                         f"{_one_line(exc)} (pass the shape it expects with --input-shape)") from exc


def _cmd_extract(args: argparse.Namespace, console: Console) -> int:
    from torch.utils.data import DataLoader

    from ._images import ImageFiles, write_file_list
    from ._extract import extract

    out = _writable_folder(args.out)  # these fail before the model is built or anything is written
    images = ImageFiles(args.data, image_size=args.image_size)
    batch, side = min(args.batch_size, len(images)), args.image_size
    _check_fits(f"--image-size {side} with --batch-size {args.batch_size} makes a batch of {batch} "
                f"image{'s' if batch > 1 else ''} of 3×{side}×{side}", batch * 3 * side * side,
                "pass a smaller --image-size or --batch-size")
    torch.manual_seed(args.seed)
    model = load_model(args.model, weights=args.weights)
    listing = out / "files.txt"
    if listing.exists() and listing.read_text().splitlines() != images.files:
        raise ValueError(f"{listing} lists other images than {args.data} holds now, so resuming would mix rows. "
                         "Use another --out, or delete it to start over.")
    resolve(model, args.layers)  # a bad layer name fails before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_file_list(images.files, listing)  # first, so that a resumed run can tell if the folder changed
    except OSError as exc:  # the checks above passed, but the file system still said no (quota, a race, ...)
        raise CommandLineError(f"cannot write to --out {args.out!r} ({exc.strerror or exc}); choose a writable "
                          "folder.") from exc
    loader = DataLoader(images, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    feats = extract(model, args.layers, loader, out=out, pool=args.pool, dtype=args.dtype, progress=True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("layer", "file", "shape", "dtype"):
        table.add_column(column)
    for name, array in feats.items():
        table.add_row(name, str(feats.path(name)), " × ".join(map(str, array.shape)), str(array.dtype))
    console.print(table)
    console.print(Text(f"{len(images)} images; row i is the image on line i of {listing}.", style="dim"))
    return 0


def _writable_folder(text: str) -> Path:
    """``--out``: a folder that exists or can be created, on a writable file system; checked without writing."""
    out = Path(text)
    nearest = out  # the folder itself, or the nearest ancestor that exists: where mkdir would start
    while not nearest.is_dir():
        if os.path.lexists(nearest):
            what = ("a file" if nearest.is_file() else "a broken symbolic link" if nearest.is_symlink()
                    else "a special file")
            if nearest == out:
                raise CommandLineError(f"--out {text!r} is {what}, not a folder; pass a folder (it is created if "
                                  "missing), e.g. a new name next to it.")
            raise CommandLineError(f"--out {text!r} lies below {str(nearest)!r}, which is {what} and so cannot hold "
                              "the folder; pass a path outside it.")
        if nearest.parent == nearest:
            break
        nearest = nearest.parent
    where = "" if nearest == out else f" ({str(nearest)!r}, where it would be created, cannot be written)"
    if hasattr(os, "statvfs") and os.statvfs(nearest).f_flag & os.ST_RDONLY:
        raise CommandLineError(f"--out {text!r} is on a read-only file system{where}; choose a writable folder.")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise CommandLineError(f"--out {text!r} is not writable: no permission to create files in {str(nearest)!r}; "
                          "choose a writable folder.")
    return out


def _cmd_summary(args: argparse.Namespace, console: Console) -> int:
    from ._summary import summary

    model, x = _model_and_input(args)
    _forward(model, x)  # a clear one-line error for an input the model rejects, before the table
    console.print(summary(model, x, layers=args.layers, depth=args.depth, timing=not args.no_timing))
    if next(iter(model.children()), None) is None:
        shape = ",".join(map(str, args.input_shape))
        console.print(Text(f"{type(model).__name__} has no submodules, so the table has no rows (the line above is "
                           f"the whole model); `hookkit trace {args.model} --input-shape {shape}` shows its input "
                           "and output.", style="yellow"))
    return 0


def _cmd_trace(args: argparse.Namespace, console: Console) -> int:
    from ._trace import trace

    model, x = _model_and_input(args)
    with trace(model, args.layers, console=console, backward=args.backward, stats=not args.no_stats) as t:
        out = _forward(model, x)
        if args.backward:
            tensors = [o for o in _tree.leaves(out) if o.requires_grad]
            if not tensors:
                raise ValueError("--backward: the model's output does not require grad")
            tensors[0].float().sum().backward()
    console.print(Text(f"{len(t.events)} events; every hook removed.", style="dim"))
    return 0


def _weights_note(spec: str, weights: str | None) -> str:
    if weights is not None:
        return f"weights from {weights}"
    if spec.startswith("torchvision:"):
        return "random weights"
    return "weights as the factory made them"


# -- hookkit layers ------------------------------------------------------------------------------------------------
@dataclass
class _Row:
    name: str
    cls: str
    own: int
    total: int
    alias_of: str | None  # first name of a module registered under several names


def _layer_rows(model: nn.Module) -> list[_Row]:
    first_name: dict[int, str] = {}
    rows = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        alias_of = first_name.setdefault(id(module), name)
        rows.append(_Row(
            name=name,
            cls=type(module).__name__,
            own=sum(p.numel() for p in module.parameters(recurse=False)),
            total=sum(p.numel() for p in module.parameters()),
            alias_of=alias_of if alias_of != name else None,
        ))
    return rows


def _cmd_layers(args: argparse.Namespace, console: Console) -> int:
    model = load_model(args.model, weights=args.weights)
    rows = _layer_rows(model)
    shown = [r.name for r in rows]
    matched: set[str] = set(shown)
    if args.filter is not None:
        matched = {n for names in resolve(model, args.filter).values() for n in names}
        # Keep the ancestors of every match, so the tree still nests; they are drawn dim.
        keep = set(matched)
        for n in matched:
            parts = n.split(".")
            keep.update(".".join(parts[:i]) for i in range(1, len(parts)))
        shown = [n for n in shown if n in keep]
    if args.depth is not None:
        shown = [n for n in shown if n.count(".") < args.depth]
    by_name = {r.name: r for r in rows}
    visible = [by_name[n] for n in shown]

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    header = Text.assemble(
        (type(model).__name__, "bold magenta"),
        f" ({args.model}, {_weights_note(args.model, args.weights)})",
        f" · {total:,} params",
        f" ({trainable:,} trainable)" if trainable != total else "",
        f" · {len(rows)} names",
    )
    if args.filter is not None:
        header.append(f" · {len(matched)} match {args.filter!r}")
    if args.table:
        body: Any = _layers_table(visible, matched)
        console.print(header)
    else:
        body = _layers_tree(header, visible, matched)
    console.print(body)
    if args.depth is not None and len(shown) < len(rows) and args.filter is None:
        console.print(Text(f"{len(rows) - len(shown)} deeper names hidden by --depth {args.depth}.", style="dim"))
    if not rows:
        console.print(Text(f"{type(model).__name__} has no submodules: there is no layer name to capture.",
                           style="yellow"))
        return 0
    if not args.table and any(r.own and r.own != r.total for r in visible):
        console.print(Text("Counts include children; (own N): parameters a parent holds itself.", style="dim"))
    console.print(Text("Pass a name, or a glob like 'layer*.0.conv1', to hookkit.capture(model, ...).", style="dim"))
    return 0


def _row_label(row: _Row, *, dim: bool) -> Text:
    label = Text.assemble(
        (row.name, "dim" if dim else "bold"), "  ", (row.cls, "dim cyan" if dim else "cyan"), "  ",
        (f"{row.total:,}", "dim" if dim or row.total == 0 else "green"),
    )
    if row.own and row.own != row.total:
        label.append(f" (own {row.own:,})", style="dim green")
    if row.alias_of is not None:
        label.append(f"  same module as {row.alias_of}", style="yellow")
    return label


def _layers_tree(header: Text, rows: list[_Row], matched: set[str]) -> Tree:
    root = Tree(header, guide_style="dim")
    nodes: dict[str, Tree] = {}
    for row in rows:
        parent_name = row.name.rpartition(".")[0]
        parent = nodes.get(parent_name, root)
        nodes[row.name] = parent.add(_row_label(row, dim=row.name not in matched))
    return root


def _layers_table(rows: list[_Row], matched: set[str]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("layer", no_wrap=True, overflow="fold")
    table.add_column("class", style="cyan", overflow="fold")
    table.add_column("own params", justify="right", style="green")
    table.add_column("total params", justify="right", style="green")
    for row in rows:
        name = Text("  " * row.name.count(".") + row.name, style="" if row.name in matched else "dim")
        cls = row.cls + (f" (= {row.alias_of})" if row.alias_of else "")
        table.add_row(name, cls, f"{row.own:,}", f"{row.total:,}")
    return table


# -- hookkit demo --------------------------------------------------------------------------------------------------
def hook_census(model: nn.Module) -> int:
    """How many hooks the forward, forward-pre, backward and backward-pre hook dicts of ``model``'s modules hold.

    Example:
        >>> import torch.nn as nn; from hookkit.cli import hook_census
        >>> hook_census(nn.Sequential(nn.Linear(2, 2)))
        0
    """
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in _HOOK_DICTS)


def demo_image(size: int = 224, *, seed: int = 0) -> torch.Tensor:
    """A deterministic procedural RGB image, ``(3, size, size)`` in ``[0, 1]``: smooth gradients, shapes, light noise.

    Example:
        >>> from hookkit.cli import demo_image
        >>> demo_image(64).shape
        torch.Size([3, 64, 64])
    """
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([
        0.5 + 0.4 * torch.sin(2 * math.pi * (1.5 * xs + 0.5 * ys)),  # diagonal waves in red
        0.2 + 0.6 * ys,  # vertical gradient in green
        0.9 - 0.7 * xs,  # horizontal gradient in blue
    ])
    shapes = [
        ((xs - 0.33) ** 2 + (ys - 0.38) ** 2 < 0.17 ** 2, (0.95, 0.80, 0.10)),  # a yellow disc
        (((xs - 0.70).abs() < 0.13) & ((ys - 0.66).abs() < 0.13), (0.10, 0.20, 0.80)),  # a blue square
        (ys > 1.55 - xs, (0.20, 0.70, 0.30)),  # a green corner
        (((xs - 0.75) ** 2 + (ys - 0.25) ** 2 - 0.12 ** 2).abs() < 0.012, (1.0, 1.0, 1.0)),  # a white ring
    ]
    for mask, colour in shapes:
        img = torch.where(mask, torch.tensor(colour).view(3, 1, 1), img)
    img = img + 0.03 * torch.randn(3, size, size, generator=gen)
    return img.clamp(0, 1)


def _normalise(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0)


def _stats(value: Any) -> dict[str, Any]:
    """The demo's numbers for a captured value: its first tensor's statistics, plus the fraction of zeros."""
    leaves = _tree.leaves(value)
    if not leaves:
        return {"shape": None, "dtype": None, "leaves": 0}
    t = leaves[0]
    s = tensor_stats(t)
    out: dict[str, Any] = {"shape": s.shape, "dtype": str(t.dtype).removeprefix("torch."), "leaves": len(leaves)}
    if s.mean is not None:
        with torch.no_grad():
            zeros = (t == 0).float().mean().item()
        out.update(mean=s.mean, std=s.std if s.std is not None else 0.0, min=s.min, max=s.max, zeros=zeros)
    return out


def run_demo(
    model: nn.Module,
    layers: Layers = DEMO_LAYERS,
    *,
    console: Console | None = None,
    x: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Capture ``layers`` of ``model`` on one input, print their statistics, and check that every hook came off.

    Example:
        >>> import torchvision; from hookkit.cli import run_demo
        >>> result = run_demo(torchvision.models.resnet18().eval(), ["layer1", "fc"])  # doctest: +SKIP
        >>> result["hooks_before"] == result["hooks_after"]  # doctest: +SKIP
        True

    Args:
        model: the model to run (the caller puts it in eval mode).
        layers: anything ``hookkit.capture`` accepts; default ResNet's stages.
        console: where to print; default a new ``rich.console.Console()``.
        x: the input batch; default ``demo_image()`` normalised with ImageNet mean/std, ``(1, 3, 224, 224)``.

    Returns:
        ``{"layers": {name: {"class", "calls", "shape", "dtype", "mean", "std", "min", "max", "zeros"}},
        "hooks_before", "hooks_during", "hooks_after", "top5", "output_shape"}``; a layer that never ran has
        ``calls == 0``. ``top5`` is ``[(index, logit), ...]``, or ``[]`` where the output is not ``(1, classes)``.

    Raises:
        LayerNotFoundError: a layer spec matched nothing (no hook was registered).
        ValueError: the model failed on the input (e.g. not an image classifier).
    """
    console = console if console is not None else Console()
    if x is None:
        x = _normalise(demo_image())
    selected = resolve(model, layers)
    classes = {n: type(m).__name__ for m, names in selected.items() for n in names}
    before = hook_census(model)
    with torch.no_grad():
        # clone=True: later in-place ops (ResNet's ReLU(inplace=True)) must not change what we show.
        with capture(model, layers, clone=True) as cap:
            during = hook_census(model)
            try:
                output = model(x)
            except Exception as exc:
                raise ValueError(
                    f"{type(model).__name__} failed on the demo input, a tensor of shape {tuple(x.shape)}: "
                    f"{type(exc).__name__}: {exc} (the demo needs an image model that takes a (N, 3, H, W) batch)"
                ) from exc
    after = hook_census(model)

    stats: dict[str, dict[str, Any]] = {}
    for name in list(cap) + [n for n in classes if n not in cap]:
        calls = len(cap.calls(name)) if name in cap else 0
        stats[name] = {"class": classes[name], "calls": calls, **(_stats(cap[name]) if calls else {})}

    table = Table(title=f"hookkit.capture({type(model).__name__}, {len(stats)} layers)", header_style="bold",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    # On a narrow terminal the class and dtype columns give way first (they fold); names and numbers do not wrap.
    table.add_column("layer", style="bold", no_wrap=True)
    table.add_column("class", style="cyan", overflow="fold")
    table.add_column("output shape", no_wrap=True)
    table.add_column("dtype", overflow="fold")
    for col in ("mean", "std", "min", "max"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("zeros", justify="right", no_wrap=True)
    table.add_column("calls", justify="right", no_wrap=True)
    for name, s in stats.items():
        if not s["calls"]:
            table.add_row(name, s["class"], Text("did not run", style="yellow"), "", "", "", "", "", "", "0")
            continue
        shape = "—" if s["shape"] is None else "×".join(str(d) for d in s["shape"]) or "scalar"
        if s["leaves"] > 1:
            shape += f" (+{s['leaves'] - 1} more)"
        zeros = s.get("zeros")
        table.add_row(
            name, s["class"], shape, s["dtype"] or "—",
            *(fmt_num(s.get(k)) for k in ("mean", "std", "min", "max")),
            "—" if zeros is None else f"{zeros:.1%}", str(s["calls"]),
        )
    console.print(table)

    added = during - before
    if after == before:
        console.print(Text.assemble(
            ("✓ every hook was removed", "bold green"),
            f": {before} before capture, {added} added while open, {after} after "
            "(forward, forward-pre, backward and backward-pre hooks of every module).",
        ))
    else:
        console.print(Text(
            f"✗ hooks left behind: {before} before the capture, {after} after it closed.", style="bold red"
        ))

    top5: list[tuple[int, float]] = []
    leaves = _tree.leaves(output)
    logits = leaves[0] if leaves else None
    if logits is not None and logits.dim() == 2 and logits.shape[0] == 1 and logits.shape[1] >= 5:
        values, indices = logits[0].float().topk(5)
        top5 = [(int(i), float(v)) for i, v in zip(indices, values)]
        console.print(Text.assemble(
            ("top-5 logit indices: ", "bold"),
            ", ".join(f"{i} ({v:.3f})" for i, v in top5),
        ))
    else:
        shape = None if logits is None else tuple(logits.shape)
        console.print(Text(f"the output (shape {shape}) is not (1, classes) logits: no top-5.", style="dim"))
    return {
        "layers": stats,
        "hooks_before": before,
        "hooks_during": during,
        "hooks_after": after,
        "top5": top5,
        "output_shape": None if logits is None else tuple(logits.shape),
    }


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    torch.manual_seed(args.seed)  # random weights, but the same ones every run: the output is reproducible
    model = load_model(args.model, weights=args.weights)
    resolve(model, args.layers)  # a bad layer name fails here, before anything is printed
    note = _weights_note(args.model, args.weights)
    console.print(Text.assemble(
        ("model: ", "bold"), f"{type(model).__name__} from {args.model}, ", (note, "yellow"),
        " (nothing downloaded: the numbers show what hooks capture, not a trained model's view)"
        if note == "random weights" else "",
    ))
    console.print(Text.assemble(
        ("input: ", "bold"), f"a generated 224×224 RGB image (gradients and shapes; seed {args.seed}), "
        "normalised with ImageNet mean/std",
    ))
    result = run_demo(model, args.layers, console=console, x=_normalise(demo_image(seed=args.seed)))
    return 0 if result["hooks_after"] == result["hooks_before"] else 1
