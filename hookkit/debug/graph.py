"""``graph()``: the autograd graph behind a tensor, as data and as a rich tree.

The walk follows ``grad_fn`` and ``next_functions`` with an explicit stack (no recursion, so a 2000-layer chain is
fine) and never touches saved tensors, so it also works after ``backward()`` has freed them. The result holds names,
shapes and ids only: no tensors, no autograd nodes, no model.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text
from rich.tree import Tree

from hookkit._errors import ArgumentTypeError
from hookkit.core import check as _check
from hookkit.core.stats import dtype_short, shape_str

__all__ = ["graph", "AutogradGraph", "GraphNode"]

Params = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

# Rendering: a tree indents 4 columns a level; keep this many columns for the labels themselves. Subtrees that would
# start deeper than the width allows are printed as separate blocks below (rich would silently drop them otherwise).
_GUIDE_WIDTH = 4
_LABEL_ROOM = 40

# Layout states of a node while rendering.
_UNSEEN, _SHOWN, _HIDDEN, _PENDING = range(4)


@dataclasses.dataclass(frozen=True)
class GraphNode:
    """One autograd node.

    ``id`` is its index in ``AutogradGraph.nodes`` (0 is the tensor's ``grad_fn``; ids follow a depth-first walk);
    ``name`` is ``type(node).__name__`` (``MulBackward0``, ``AccumulateGrad``...); ``children`` are the ids of its
    ``next_functions`` in order, with inputs that need no gradient (``None``) left out and repeats kept
    (``x * x`` has two edges to one ``AccumulateGrad``); ``parents`` are the ids of the nodes with an edge to it;
    ``depth`` is its distance from the root along the walk. ``AccumulateGrad`` leaves also carry the variable's
    ``shape``, ``dtype`` and ``device``, and ``param``: its name in the ``params`` given to ``graph()``.
    """

    id: int
    name: str
    children: tuple[int, ...]
    parents: tuple[int, ...]
    depth: int
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    device: str | None = None
    param: str | None = None

    @property
    def is_leaf(self) -> bool:
        """True for ``AccumulateGrad``: the node that adds the gradient into a leaf tensor's ``.grad``."""
        return self.shape is not None

    @property
    def shared(self) -> bool:
        """True when more than one edge leads here (the node is shown once, then referred to by ``#id``)."""
        return len(self.parents) > 1


class AutogradGraph:
    """What ``graph()`` returns: ``nodes`` (a list of ``GraphNode``, empty when the tensor has no ``grad_fn``) and
    ``label``, one line about the tensor. Renders as a ``rich.tree.Tree`` through ``console.print(graph)``; it never
    prints by itself.
    """

    def __init__(self, label: str, nodes: list[GraphNode], *, max_depth: int | None) -> None:
        self.label = label
        self.nodes = nodes
        self.max_depth = max_depth

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"<hookkit.AutogradGraph {self.label}, {_plural(len(self.nodes), 'node')}>"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.nodes:
            yield Text(self.label)
            return
        max_level = max(1, (options.max_width - _LABEL_ROOM) // _GUIDE_WIDTH)
        for i, rows in enumerate(_layout(self.nodes, max_depth=self.max_depth, max_level=max_level)):
            if i:
                yield Text("")
            yield self._tree(rows, first_block=i == 0)

    def _tree(self, rows: list[tuple[int, str, int]], *, first_block: bool) -> Tree:
        tree = Tree(self._root_label() if first_block else self._node_label(self.nodes[rows[0][2]], continued=True))
        open_trees = [tree]  # open_trees[level] is the last tree added at that level
        for level, kind, value in rows[1:]:
            child = open_trees[level - 1].add(self._row_label(kind, value))
            del open_trees[level:]
            open_trees.append(child)
        return tree

    def _root_label(self) -> Text:
        return Text.assemble(self.label, (f" ({_plural(len(self.nodes), 'node')})", "dim"))

    def _row_label(self, kind: str, value: int) -> Text:
        if kind == "node":
            return self._node_label(self.nodes[value])
        if kind == "more":
            return Text(f"… {_plural(value, 'more node')}", style="dim")
        name = self.nodes[value].name
        where = {"ref": "shown above", "hidden": "beyond max_depth", "pending": "continued below"}[kind]
        arrow = "↓" if kind == "pending" else "↑"
        return Text(f"{arrow} #{value} ({name}, {where})", style="dim")

    def _node_label(self, node: GraphNode, *, continued: bool = False) -> Text:
        text = Text(node.name, style="bold")
        if node.shared or continued:
            text.append(f" #{node.id}", style="cyan")
        if node.is_leaf:
            text.append(" → ")
            if node.param is not None:
                text.append(node.param, style="green")
                text.append(" ")
            text.append(_head(node.shape, node.dtype, node.device), style="dim")
        if continued:
            text.append(" (continued)", style="dim")
        return text


def graph(tensor: torch.Tensor, *, params: Params | None = None, max_depth: int | None = None) -> AutogradGraph:
    """The autograd graph behind ``tensor``: every node its ``grad_fn`` reaches, as data and as a rich tree.

    Examples:
        >>> import torch
        >>> from rich.console import Console
        >>> from hookkit import graph
        >>> x = torch.randn(2, requires_grad=True)
        >>> y = x * 3
        >>> w = x + y
        >>> g = graph(w, params={"x": x})
        >>> [node.name for node in g.nodes]
        ['AddBackward0', 'AccumulateGrad', 'MulBackward0']
        >>> Console(width=80, color_system=None).print(g)
        tensor f32[2] grad_fn=AddBackward0 (3 nodes)
        ├── AccumulateGrad #1 → x f32[2]
        └── MulBackward0
            └── ↑ #1 (AccumulateGrad, shown above)

    A node reached by several paths (here ``x``'s ``AccumulateGrad``) is shown once with its ``#id``; later edges to
    it are references. Subtrees too deep for the console's width continue as separate blocks below, so nothing is
    dropped. Works after ``backward()``: only node types and edges are read, never saved tensors.

    Args:
        tensor: the tensor whose history to walk (usually a loss or a model output).
        params: names for leaf tensors, matched by identity with each ``AccumulateGrad``'s variable: a mapping
            ``name -> tensor`` such as ``dict(model.named_parameters())``, or an iterable of ``(name, tensor)``
            pairs. Default ``None``: leaves are shown by shape and dtype only.
        max_depth: show nodes at most this many edges below the tensor's ``grad_fn`` (0: the ``grad_fn`` alone);
            deeper ones are counted as ``… N more nodes``. Default ``None``: everything. Only rendering is cut:
            ``nodes`` always holds the whole graph.

    Returns:
        An ``AutogradGraph``: ``nodes`` (``GraphNode`` records: ``id``, ``name``, ``children``, ``parents``,
        ``depth``; ``shape``, ``dtype``, ``param`` for leaves) and ``label``; print it with a rich ``Console``.

    Raises:
        ArgumentTypeError: ``tensor`` is not a tensor, ``params`` is not a mapping / pairs of names and tensors,
            or ``max_depth`` is not an int or None.
        ArgumentError: ``max_depth`` is negative.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentTypeError(f"hookkit.graph: tensor= takes a torch.Tensor (e.g. a loss or a model output), got "
                                f"{type(tensor).__name__}.")
    _check.whole("hookkit.graph", "max_depth", max_depth, minimum=0, none=True,
                 meaning=" (0 shows only the tensor's grad_fn)")
    names = _names_by_identity(params)
    head = _tensor_head(tensor)
    if tensor.grad_fn is None:
        name = names.get(id(tensor))
        what = f"{name} {head}" if name else head
        if tensor.requires_grad:
            label = f"leaf tensor {what} (requires_grad=True): no grad_fn, its gradient accumulates in .grad"
        else:
            label = f"constant tensor {what} (requires_grad=False): no grad_fn, no autograd graph"
        return AutogradGraph(label, [], max_depth=max_depth)
    nodes = _walk(tensor.grad_fn, names)
    return AutogradGraph(f"tensor {head} grad_fn={nodes[0].name}", nodes, max_depth=max_depth)


def _walk(root: Any, names: dict[int, str]) -> list[GraphNode]:
    """Depth-first, children in ``next_functions`` order, with an explicit stack of edges."""
    ids: dict[Any, int] = {}  # autograd node -> id; holding the nodes keeps their Python wrappers (and ids) unique
    found: list[tuple[Any, int]] = []  # (autograd node, depth)
    children: list[list[int]] = []
    parents: list[list[int]] = []
    stack: list[tuple[Any, int, int]] = [(root, -1, 0)]  # (node, parent id or -1, depth)
    while stack:
        fn, parent, depth = stack.pop()
        nid = ids.get(fn)
        if nid is None:
            nid = ids[fn] = len(found)
            found.append((fn, depth))
            children.append([])
            parents.append([])
            for child, _ in reversed(fn.next_functions):
                if child is not None:
                    stack.append((child, nid, depth + 1))
        if parent >= 0:
            children[parent].append(nid)
            parents[nid].append(parent)
    nodes = []
    for nid, (fn, depth) in enumerate(found):
        leaf: dict[str, Any] = {}
        variable = getattr(fn, "variable", None)  # AccumulateGrad only; not a saved tensor, the leaf itself
        if isinstance(variable, torch.Tensor):
            leaf = dict(shape=tuple(variable.shape), dtype=_dtype(variable), device=str(variable.device),
                        param=names.get(id(variable)))
        nodes.append(GraphNode(id=nid, name=type(fn).__name__, children=tuple(children[nid]),
                               parents=tuple(parents[nid]), depth=depth, **leaf))
    return nodes


def _layout(nodes: list[GraphNode], *, max_depth: int | None, max_level: int) -> list[list[tuple[int, str, int]]]:
    """Rows ``(level, kind, value)`` of each block to print, in print order, so every ``↑`` reference points at a
    node printed above it. ``kind``: ``node``, ``ref``, ``hidden`` (a reference into a cut subtree), ``pending``
    (a subtree continued as a block below), ``more`` (value: how many nodes a ``max_depth`` cut hides)."""
    state = [_UNSEEN] * len(nodes)
    state[0] = _PENDING
    blocks = []
    queue = collections.deque([(0, 0)])  # (node id, depth) of each block's root
    while queue:
        start, start_depth = queue.popleft()
        state[start] = _SHOWN
        rows: list[tuple[int, str, int]] = []
        stack: list[tuple[int, int, int]] = []  # (node id, level, depth) of edges still to print

        def show(nid: int, level: int, depth: int, rows: list = rows, stack: list = stack) -> None:
            rows.append((level, "node", nid))
            if max_depth is not None and depth >= max_depth:
                hidden = _hide_below(nodes, nid, state)
                if hidden:
                    rows.append((level + 1, "more", hidden))
            else:
                stack.extend((child, level + 1, depth + 1) for child in reversed(nodes[nid].children))

        show(start, 0, start_depth)
        while stack:
            nid, level, depth = stack.pop()
            if state[nid] != _UNSEEN:
                rows.append((level, {_SHOWN: "ref", _HIDDEN: "hidden", _PENDING: "pending"}[state[nid]], nid))
            elif level >= max_level and nodes[nid].children:
                state[nid] = _PENDING
                rows.append((level, "pending", nid))
                queue.append((nid, depth))
            else:
                state[nid] = _SHOWN
                show(nid, level, depth)
        blocks.append(rows)
    return blocks


def _hide_below(nodes: list[GraphNode], nid: int, state: list[int]) -> int:
    """Mark every not yet shown node below ``nid`` hidden; return how many."""
    count = 0
    stack = list(nodes[nid].children)
    while stack:
        child = stack.pop()
        if state[child] == _UNSEEN:
            state[child] = _HIDDEN
            count += 1
            stack.extend(nodes[child].children)
    return count


def _names_by_identity(params: Params | None) -> dict[int, str]:
    if params is None:
        return {}
    if isinstance(params, (nn.Module, torch.Tensor, str)):
        raise ArgumentTypeError(f"params takes names and tensors, e.g. dict(model.named_parameters()), "
                                f"got {type(params).__name__}.")
    items = params.items() if isinstance(params, Mapping) else params
    try:
        pairs = [(name, tensor) for name, tensor in items]
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"params takes a mapping name -> tensor or (name, tensor) pairs, e.g. "
                                f"dict(model.named_parameters()); got {type(params).__name__}.") from None
    names: dict[int, str] = {}
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor):
            raise ArgumentTypeError(f"params[{name!r}] is a {type(tensor).__name__}, expected a tensor; pass e.g. "
                                    f"dict(model.named_parameters()).")
        names.setdefault(id(tensor), str(name))  # a tensor under several names keeps the first
    return names


def _dtype(t: torch.Tensor) -> str:
    return dtype_short(t.dtype)


def _tensor_head(t: torch.Tensor) -> str:
    return _head(tuple(t.shape), _dtype(t), str(t.device))


def _head(shape: tuple[int, ...] | None, dtype: str | None, device: str | None) -> str:
    """``f32[8, 4]``, with the device when it is not the CPU; reads no values."""
    text = f"{dtype}{shape_str(shape or ())}"
    return text if device in (None, "cpu") else f"{text} {device}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
