"""``hookkit layers MODEL``: every layer name hookkit accepts for a model, as a tree (or ``--table``) with class and
parameter counts. The command to run first: the names it prints are what the other commands take.

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds; ``_parser`` hands the parsed
arguments back to ``_cmd_layers`` through ``hookkit.cli.run``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .._select import resolve
from ._inputs import MODEL_HELP, build_model, positive_int, weights_note

__all__: list[str] = []  # run through `hookkit layers`


def register(sub: Any) -> None:
    """Add ``hookkit layers`` to the subparsers ``sub``."""
    layers = sub.add_parser(
        "layers",
        help="list every layer name hookkit accepts for a model, with class and parameter counts",
        description="List every name that hookkit.capture() and hookkit.hooks() accept for MODEL (the names of "
        "named_modules(remove_duplicate=False) except the root), with its class and parameter counts, as a tree "
        "nested by dotted name.",
    )
    layers.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    layers.add_argument("--weights", metavar="PATH", help="a local state_dict file to load into the model")
    layers.add_argument("--depth", type=positive_int, metavar="N",
                        help="show names with at most N dotted parts (1 = the model's direct children)")
    layers.add_argument("--filter", metavar="GLOB",
                        help="show only names that this name or glob selects, as capture() would: '*' stays "
                        "inside one dotted part, '**' crosses parts (e.g. 'layer1.**', '**conv*')")
    layers.add_argument("--table", action="store_true", help="a flat table with own and total parameters")
    layers.set_defaults(command=_cmd_layers)


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
    model = build_model(args)
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
        f" ({args.model}, {weights_note(args.model, args.weights)})",
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
