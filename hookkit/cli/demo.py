"""``hookkit demo``: capture a model's layers on a generated image, show their statistics, and check with
``hookkit.hook_census`` that every hook came off. Also a small Python API (``run_demo``, ``demo_image``,
``DEMO_LAYERS``), re-exported by ``hookkit.cli``.

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds; the model comes from
``hookkit.cli._inputs``. The default model, ``torchvision:resnet18``, needs torchvision (imported when it is built).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn as nn
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hookkit._errors import CommandLineError
from hookkit.cli._inputs import MODEL_HELP, build_model, raised_by_hookkit, seed, weights_note
from hookkit.cli.images import IMAGENET_MEAN, IMAGENET_STD
from hookkit.core import tree as _tree
from hookkit.core.census import hook_census
from hookkit.core.select import Layers, select
from hookkit.core.stats import fmt_num, tensor_stats
from hookkit.record.capture import capture

__all__ = ["run_demo", "demo_image", "DEMO_LAYERS"]

DEMO_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "avgpool")
_NO_NODES = "the demo shows module outputs with their classes"
# The hook dicts the demo counts in hookkit.hook_census's entries: a module's forward, forward-pre, backward and
# backward-pre hooks (the census also holds flags and kwargs dicts keyed by the same hook ids, not counted again).
_COUNTED_HOOK_DICTS = ("._forward_hooks", "._forward_pre_hooks", "._backward_hooks", "._backward_pre_hooks")


def register(sub: Any) -> None:
    """Add ``hookkit demo`` to the subparsers ``sub``."""
    demo = sub.add_parser(
        "demo",
        help="capture a torchvision model's activations on a generated image and show their statistics",
        description="Build a model (random weights: nothing is downloaded), feed it a deterministic generated "
        "224x224 RGB image normalised with ImageNet mean/std, capture the chosen layers with hookkit.capture(), "
        "show a statistics table, check that every hook was removed, and print the top-5 logits.",
    )
    demo.add_argument("--model", default="torchvision:resnet18", metavar="MODEL",
                      help=f"{MODEL_HELP}; default: %(default)s")
    demo.add_argument("--weights", metavar="PATH",
                      help="a local state_dict file to load into the model; default: none, random weights (--seed)")
    demo.add_argument("--layers", nargs="+", default=list(DEMO_LAYERS), metavar="LAYER",
                      help="layer names or globs to capture (see `hookkit layers MODEL`); default: "
                      + " ".join(DEMO_LAYERS))
    demo.add_argument("--seed", type=seed, default=0,
                      help="seed of the random weights and of the generated image; default: %(default)s")
    demo.set_defaults(command=_cmd_demo)


def demo_image(size: int = 224, *, seed: int = 0) -> torch.Tensor:
    """A deterministic procedural RGB image, ``(3, size, size)`` in ``[0, 1]``: smooth gradients, shapes, light noise.

    Examples:
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


def _hook_count(census: dict[str, Any]) -> int:
    """How many forward, forward-pre, backward and backward-pre module hooks a ``hookkit.hook_census`` holds."""
    return sum(len(value) for key, value in census.items()
               if key.endswith(_COUNTED_HOOK_DICTS) and not key.startswith(("param ", "buffer ")))


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

    Examples:
        >>> import torchvision; from hookkit.cli import run_demo
        >>> result = run_demo(torchvision.models.resnet18().eval(), ["layer1", "fc"])  # doctest: +SKIP
        >>> result["hooks_unchanged"]  # doctest: +SKIP
        True

    Args:
        model: the model to run (the caller puts it in eval mode).
        layers: anything ``hookkit.capture`` accepts; default ResNet's stages.
        console: where to print; default a new ``rich.console.Console()``.
        x: the input batch; default ``demo_image()`` normalised with ImageNet mean/std, ``(1, 3, 224, 224)``.

    Returns:
        ``{"layers": {name: {"class", "calls", "shape", "dtype", "mean", "std", "min", "max", "zeros"}},
        "hooks_unchanged", "hooks_before", "hooks_during", "hooks_after", "top5", "output_shape"}``; a layer that
        never ran has ``calls == 0``. ``hooks_unchanged``: whether ``hookkit.hook_census(model)`` after the capture
        equals the one before (every hook, flag and mode); ``hooks_before`` / ``_during`` / ``_after``: how many
        forward, forward-pre, backward and backward-pre module hooks the census held (a module registered under two
        names counts under each). ``top5`` is ``[(index, logit), ...]``, or ``[]`` where the output is not
        ``(1, classes)``.

    Raises:
        LayerNotFoundError: a layer spec matched nothing (no hook was registered).
        CommandLineError: the model failed on the input (e.g. not an image classifier); a ``ValueError``.
    """
    console = console if console is not None else Console()
    if x is None:
        x = _normalise(demo_image())
    selected = select(model, layers, caller="hookkit demo", no_nodes=_NO_NODES).modules
    classes = {n: type(m).__name__ for m, names in selected.items() for n in names}
    census_before = hook_census(model)
    # clone=True: later in-place ops (ResNet's ReLU(inplace=True)) must not change what we show.
    with torch.no_grad(), capture(model, layers, clone=True) as cap:
        during = _hook_count(hook_census(model))
        try:
            output = model(x)
        except Exception as exc:
            if raised_by_hookkit(exc):
                raise
            raise CommandLineError(
                f"{type(model).__name__} failed on the demo input, a tensor of shape {tuple(x.shape)}: "
                f"{type(exc).__name__}: {exc} (the demo needs an image model that takes a (N, 3, H, W) batch)"
            ) from exc
    census_after = hook_census(model)
    unchanged = census_after == census_before
    before, after = _hook_count(census_before), _hook_count(census_after)

    stats: dict[str, dict[str, Any]] = {}
    for name in list(cap) + [n for n in classes if n not in cap]:
        calls = len(cap.calls(name)) if name in cap else 0
        stats[name] = {"class": classes[name], "calls": calls, **(_stats(cap[name]) if calls else {})}
    console.print(_stats_table(type(model).__name__, stats))

    if unchanged:
        console.print(Text.assemble(
            ("✓ every hook was removed", "bold green"),
            f": {before} before capture, {during - before} added while open, {after} after "
            "(forward, forward-pre, backward and backward-pre hooks of every module).",
        ))
    else:
        changed = sorted(k for k in census_before.keys() | census_after.keys()
                         if census_before.get(k) != census_after.get(k))
        console.print(Text(
            f"✗ hooks left behind: {before} before the capture, {after} after it closed; hookkit.hook_census(model) "
            f"changed at {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}.", style="bold red"
        ))

    top5: list[tuple[int, float]] = []
    leaves = _tree.leaves(output)
    logits = leaves[0] if leaves else None
    if logits is not None and logits.dim() == 2 and logits.shape[0] == 1 and logits.shape[1] >= 5:
        values, indices = logits[0].float().topk(5)
        top5 = [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]
        console.print(Text.assemble(
            ("top-5 logit indices: ", "bold"),
            ", ".join(f"{i} ({v:.3f})" for i, v in top5),
        ))
    else:
        shape = None if logits is None else tuple(logits.shape)
        console.print(Text(f"the output (shape {shape}) is not (1, classes) logits: no top-5.", style="dim"))
    return {
        "layers": stats,
        "hooks_unchanged": unchanged,
        "hooks_before": before,
        "hooks_during": during,
        "hooks_after": after,
        "top5": top5,
        "output_shape": None if logits is None else tuple(logits.shape),
    }


def _stats_table(model_name: str, stats: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=f"hookkit.capture({model_name}, {len(stats)} layers)", header_style="bold",
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
    return table


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    model = build_model(args)  # seeded: random weights, but the same ones every run, so the output is reproducible
    select(model, args.layers, caller="hookkit demo", no_nodes=_NO_NODES)  # a bad name fails before any output
    note = weights_note(args.model, args.weights)
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
    return 0 if result["hooks_unchanged"] else 1
