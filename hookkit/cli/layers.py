"""``hookkit layers MODEL``: every layer name hookkit accepts for a model, as a tree (or ``--table``) with class and
parameter counts. The command to run first: the names it prints are what the other commands take. With
``--input-shape`` it runs the model once on a random input (``hookkit.layer_names(model, x)``) and lists, in
execution order, the modules that ran, their repeated calls and the op nodes of their forwards, each op under the
module whose forward ran it.

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds; ``_parser`` hands the parsed
arguments back to ``_cmd_layers`` through ``hookkit.cli.run``.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from hookkit._errors import CommandLineError, LayerNotFoundError
from hookkit.cli._inputs import (
    add_model_and_input_args,
    build_model,
    forward,
    model_and_input,
    positive_int,
    weights_note,
)
from hookkit.core.select import _GLOB_CHARS, _glob_regex, resolve_nodes

__all__: list[str] = []  # run through `hookkit layers`


def register(sub: Any) -> None:
    """Add ``hookkit layers`` to the subparsers ``sub``."""
    layers = sub.add_parser(
        "layers",
        help="list every layer name hookkit accepts for a model, with class and parameter counts",
        description="List every name that hookkit.capture() and hookkit.hooks() accept for MODEL (the names of "
        "named_modules(remove_duplicate=False) except the root), with its class and parameter counts, as a tree "
        "nested by dotted name. With --input-shape, run MODEL once on a random input and list, in execution order, "
        "the modules that ran, the op nodes of their forwards (named as torchvision's get_graph_node_names names "
        "them: 'layer1.0.add', 'flatten') and the repeated calls of a module ('layer1.0.relu_1').",
    )
    add_model_and_input_args(layers, input_required=False,
                             input_help="also list op nodes and repeated calls: run MODEL once (under no_grad) on "
                             "a random float input of this shape")
    layers.add_argument("--depth", type=positive_int, metavar="N",
                        help="show names with at most N dotted parts (1 = the model's direct children); default: every "
                        "depth")
    layers.add_argument("--filter", metavar="GLOB",
                        help="show only names that this name or glob selects, as capture() would: '*' stays "
                        "inside one dotted part, '**' crosses parts (e.g. 'layer1.**', '**conv*'); with "
                        "--input-shape, op and repeated-call names match too; default: every name")
    layers.add_argument("--table", action="store_true",
                        help="a flat table with own and total parameters (default: a tree nested by dotted name)")
    layers.set_defaults(command=_cmd_layers)


@dataclass
class _Row:
    name: str
    cls: str  # the module's class; for a node that is not a module's first call, what it is (see ``kind``)
    own: int
    total: int
    alias_of: str | None  # first name of a module registered under several names
    kind: str = "module"  # "module"; with --input-shape also "op" (an op node) or "call" (a module's repeated call)


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


def _run_rows(model: nn.Module, x: torch.Tensor, module_rows: list[_Row]) -> list[_Row]:
    """The nodes of one forward on ``x``, in execution order: each module's row at its first call, then an op row
    (``cls``: "op") or a repeated-call row ("2nd call of layer1.0.relu": which call of the module it is, an ordinal,
    since FX's name counts ops too) for every other name."""
    by_name = {r.name: r for r in module_rows}
    rows = []
    for name, call_of, call in _discover(model, x):
        if call_of is None and name in by_name and call == 1:
            rows.append(by_name[name])
        elif call_of is None:
            # An op that FX names like a module (F.relu before the first call of module S.relu is "S.relu"):
            # capture() takes that name as the module.
            rows.append(_Row(name, "op (capture() takes this name as the module)" if name in by_name else "op",
                             0, 0, None, kind="op"))
        else:
            rows.append(_Row(name, f"{_ordinal(call)} call of {call_of}", 0, 0, None, kind="call"))
    return rows


def _ordinal(k: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th": a module's k-th call, in words that no layer name looks like."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _discover(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str | None, int]]:
    """``hookkit.layer_names(model, x)``'s names, each with what it is: ``(name, None, 1)`` for a module's first
    call, ``(name, path, k)`` for the k-th call of the leaf module ``path``, ``(name, None, 0)`` for an op node.
    (The name alone cannot tell: an op shares a leaf module's counter, so FX names ``F.relu`` after a call of module
    ``S.relu`` in ``S``'s forward ``"S.relu_1"``, as it would the module's second call.)"""
    from hookkit.core.ops import discover_nodes  # the op machinery loads only when a forward is asked for

    kinds = {"module": lambda n: (None, 1), "call": lambda n: (n.path, n.call), "op": lambda n: (None, 0)}
    return [(name, *kinds[node.kind](node)) for name, node in discover_nodes(model, (x,), {})]


def _select_names(model: nn.Module, spec: str, rows: list[_Row], module_rows: list[_Row], ran: bool) -> set[str]:
    """The names of ``rows`` that ``--filter spec`` selects: a glob as capture() matches it, or one exact name.
    Without a run, exactly what capture() would select; with one, the op and repeated-call names too."""
    if _GLOB_CHARS.search(spec):
        _glob_regex(spec, "--filter")  # capture()'s own check of a pattern, its error naming the option
    if not ran:
        selected, nodes = resolve_nodes(model, spec)
        if nodes:
            raise CommandLineError(f"{spec!r} is an op or repeated-call node name: pass --input-shape (e.g. "
                                   "1,3,224,224) to run the model once and list its op nodes.")
        return {n for names in selected.values() for n in names}
    names = [r.name for r in rows]
    if _GLOB_CHARS.search(spec):
        rx = _glob_regex(spec)
        matched = {n for n in names if rx.match(n)}
    else:
        matched = {spec} & set(names)
    if matched:
        return matched
    try:
        known = {n for names in resolve_nodes(model, spec)[0].values() for n in names}  # modules only
    except LayerNotFoundError:
        known = set()
    model_name = type(model).__name__
    first_names = {r.name: r.alias_of for r in module_rows if r.alias_of in set(names)}
    if known and known <= set(first_names):
        raise LayerNotFoundError(f"{spec!r} names a module that ran under its first name: "
                                 f"{', '.join(sorted({first_names[n] or n for n in known}))} (a module registered "
                                 "under several names is listed once when the model runs).")
    if known:
        raise LayerNotFoundError(f"{spec!r} names modules of {model_name} that did not run on this input "
                                 f"({', '.join(sorted(known)[:5])}{', ...' if len(known) > 5 else ''}); "
                                 "leave out --input-shape to list every module.")
    close = difflib.get_close_matches(_GLOB_CHARS.sub("", spec), names, n=5, cutoff=0.5)
    did_you_mean = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    kind = "pattern" if _GLOB_CHARS.search(spec) else "layer or op node"
    raise LayerNotFoundError(f"no {kind} {spec!r} ran in {model_name} on this input.{did_you_mean} Leave out "
                             "--filter to see every name.")


def _cmd_layers(args: argparse.Namespace, console: Console) -> int:
    model, rows, module_rows, ran = _collect(args)
    shown = [r.name for r in rows]
    matched: set[str] = set(shown)
    if args.filter is not None:
        matched = _select_names(model, args.filter, rows, module_rows, ran)
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
    header = _header(args, model, rows, module_rows, matched, ran)
    if args.table:
        body: Any = _layers_table(visible, matched)
        console.print(header)
    else:
        body = _layers_tree(header, visible, matched)
    console.print(body)
    _print_notes(args, console, model, rows, module_rows, shown, visible, ran)
    return 0


def _collect(args: argparse.Namespace) -> tuple[nn.Module, list[_Row], list[_Row], bool]:
    """The model, the rows to list (with --input-shape: what ran, in execution order), every module's row, and
    whether the model ran."""
    ran = args.input_shape is not None
    if ran:
        model, x = model_and_input(args)
        with torch.no_grad():
            forward(model, x)  # a shape the model rejects: one line naming it, before hookkit runs the model
        module_rows = _layer_rows(model)
        return model, _run_rows(model, x, module_rows), module_rows, True
    model = build_model(args)
    module_rows = _layer_rows(model)
    return model, module_rows, module_rows, False


def _header(args: argparse.Namespace, model: nn.Module, rows: list[_Row], module_rows: list[_Row],
            matched: set[str], ran: bool) -> Text:
    """The model's line: class, spec, weights, parameter counts, names (and matches); what ran, when it ran."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    header = Text.assemble(
        (type(model).__name__, "bold magenta"),
        f" ({args.model}, {weights_note(args.model, args.weights)})",
        f" · {total:,} params",
        f" ({trainable:,} trainable)" if trainable != total else "",
        f" · {len(module_rows)} names",
    )
    if args.filter is not None:
        header.append(f" · {len(matched)} match {args.filter!r}")
    if ran:
        kinds = [r.kind for r in rows]
        header.append(f"\nOne forward on a random {'×'.join(map(str, args.input_shape))} input, in execution order: "
                      f"{_plural(kinds.count('module'), 'module')}, {_plural(kinds.count('op'), 'op node')}, "
                      f"{_plural(kinds.count('call'), 'repeated call')}", style="dim")
    return header


def _print_notes(args: argparse.Namespace, console: Console, model: nn.Module, rows: list[_Row],
                 module_rows: list[_Row], shown: list[str], visible: list[_Row], ran: bool) -> None:
    """The dim lines under the listing: what --depth hid, modules that did not run, how to use the names."""
    if args.depth is not None and len(shown) < len(rows) and args.filter is None:
        console.print(Text(f"{len(rows) - len(shown)} deeper names hidden by --depth {args.depth}.", style="dim"))
    if not rows:
        ops = " and its forward ran no op node outside torch's own modules" if ran else ""
        console.print(Text(f"{type(model).__name__} has no submodules{ops}: there is no layer name to capture.",
                           style="yellow"))
        return
    if ran:
        listed = {r.name for r in rows}
        idle = [r.name for r in module_rows if r.name not in listed and r.alias_of not in listed]
        if idle:
            console.print(Text(f"{_plural(len(idle), 'module name')} did not run on this input and "
                               f"{'is' if len(idle) == 1 else 'are'} not listed: {_first(idle)}.", style="dim"))
    if not args.table and any(r.own and r.own != r.total for r in visible):
        console.print(Text("Counts include children; (own N): parameters a parent holds itself.", style="dim"))
    console.print(Text("Pass a name, or a glob like 'layer*.0.conv1', to hookkit.capture(model, ...).", style="dim"))
    if ran and any(r.kind != "module" for r in rows):
        console.print(Text("Pass op and repeated-call names to capture() exactly as listed: its globs match module "
                           "names only.", style="dim"))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _row_label(row: _Row, *, dim: bool) -> Text:
    if row.kind != "module":
        return Text.assemble((row.name, "dim" if dim else "bold"), "  ",
                             (row.cls, "dim" if dim else "magenta" if row.kind == "op" else "yellow"))
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
    """Each name under the nearest shown name its dotted name extends: a module under its parent, an op node under
    the module whose forward ran it (its scope), a repeated call beside the module's first call."""
    root = Tree(header, guide_style="dim")
    nodes: dict[str, Tree] = {}
    for row in rows:
        parent_name = row.name.rpartition(".")[0]
        while parent_name and parent_name not in nodes:
            parent_name = parent_name.rpartition(".")[0]
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
        if row.kind != "module":
            table.add_row(name, Text(row.cls, style="magenta" if row.kind == "op" else "yellow"), "", "")
            continue
        cls = row.cls + (f" (= {row.alias_of})" if row.alias_of else "")
        table.add_row(name, cls, f"{row.own:,}", f"{row.total:,}")
    return table
