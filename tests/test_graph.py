"""graph(): the autograd graph behind a tensor, checked against torch's own grad_fn / next_functions."""

from __future__ import annotations

import collections
import gc
import io
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from rich.console import Console

from hookkit import AutogradGraph, GraphNode, graph

from _optional import needs_torchvision, torchvision

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "autograd_graph.py"


def render(obj: object, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(obj)
    return console.file.getvalue()


def lecture_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's grad_fn example; returns (x, w)."""
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    z = x / 2  # noqa: F841 - in the lecture, not in w's history
    w = x + y
    return x, w


def tiny_mlp_loss() -> tuple[nn.Module, torch.Tensor]:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    loss = nn.functional.cross_entropy(mlp(torch.randn(5, 4)), torch.tensor([0, 2, 1, 1, 0]))
    return mlp, loss


def torch_nodes(tensor: torch.Tensor) -> list:
    """Brute force: every autograd node reachable from tensor.grad_fn, each once (a set, no recursion)."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(child for child, _ in fn.next_functions)
    return list(seen)


def node_line(text: str, label: str) -> int:
    """Index of the one line whose tree label starts with ``label``."""
    hits = [i for i, line in enumerate(text.splitlines()) if line.lstrip("│├└─ ").startswith(label)]
    assert len(hits) == 1, (label, hits, text)
    return hits[0]


def indent(text: str, i: int) -> int:
    line = text.splitlines()[i]
    return len(line) - len(line.lstrip("│├└─ "))


# -- the lecture's example ----------------------------------------------------------------------------------------

def test_lecture_example_follows_add_to_mul_to_the_shared_accumulate_grad():
    x, w = lecture_tensors()
    g = graph(w)
    add, acc, mul = g.nodes
    assert (add.name, acc.name, mul.name) == ("AddBackward0", "AccumulateGrad", "MulBackward0")
    assert add.children == (acc.id, mul.id)  # w = x + y: next_functions are (x, y)
    assert mul.children == (acc.id,)  # y = x * 3: the constant 3 has no edge
    assert acc.parents == (add.id, mul.id) and acc.shared
    assert acc.shape == (2,) and acc.dtype == "f32"
    # The same structure in torch itself: add's edges go to x's AccumulateGrad and to mul, whose one edge goes to
    # that very AccumulateGrad object (the node hookkit shows once, as shared).
    (acc_fn, _), (mul_fn, _) = w.grad_fn.next_functions
    assert (type(w.grad_fn).__name__, type(acc_fn).__name__, type(mul_fn).__name__) == (add.name, acc.name, mul.name)
    assert acc_fn.variable is x
    assert [fn for fn, _ in mul_fn.next_functions] == [acc_fn, None]  # the constant 3: no node


def test_lecture_example_shows_the_shared_leaf_once_then_a_reference_under_mul():
    _, w = lecture_tensors()
    text = render(graph(w))
    assert text.count("AccumulateGrad #1 →") == 1
    assert text.count("↑ #1 (AccumulateGrad, shown above)") == 1
    root, mul, ref = (node_line(text, s) for s in ("tensor f32[2] grad_fn=AddBackward0", "MulBackward0",
                                                   "↑ #1 (AccumulateGrad"))
    assert root < mul < ref and indent(text, root) < indent(text, mul) < indent(text, ref)
    assert node_line(text, "AccumulateGrad #1") < ref


def test_lecture_example_golden(golden):
    x, w = lecture_tensors()
    golden("graph_lecture.txt", render(graph(w, params={"x": x})))


def test_an_input_used_twice_has_two_edges_to_one_node():
    x = torch.randn(3, requires_grad=True)
    g = graph(x * x)
    assert [n.name for n in g.nodes] == ["MulBackward0", "AccumulateGrad"]
    assert g.nodes[0].children == (1, 1) and g.nodes[1].parents == (0, 0)
    assert render(g).count("↑ #1 (AccumulateGrad, shown above)") == 1


def test_inputs_that_need_no_grad_have_no_edge():
    x = torch.randn(3, requires_grad=True)
    c = torch.randn(3)
    out = torch.cat([x * c, c])
    assert any(fn is None for fn, _ in out.grad_fn.next_functions)
    g = graph(out)
    assert [n.name for n in g.nodes] == ["CatBackward0", "MulBackward0", "AccumulateGrad"]
    assert g.nodes[0].children == (1,) and g.nodes[1].children == (2,)


# -- agrees with torch ----------------------------------------------------------------------------------------------

def test_names_and_edges_match_torch_nodes():
    x = torch.randn(4, 6, requires_grad=True)
    out = (torch.tanh(x @ x.T).softmax(-1)[:, :2].exp() / 3 + x.sum()).relu().max()
    found = torch_nodes(out)
    g = graph(out)
    assert g.nodes[0].name == type(out.grad_fn).__name__
    assert collections.Counter(n.name for n in g.nodes) == collections.Counter(type(f).__name__ for f in found)
    edges = sum(child is not None for f in found for child, _ in f.next_functions)
    assert sum(len(n.children) for n in g.nodes) == edges == sum(len(n.parents) for n in g.nodes)


@needs_torchvision
def test_node_count_equals_brute_force_on_resnet18():
    model = torchvision.models.resnet18()
    out = model(torch.randn(1, 3, 64, 64))
    found = torch_nodes(out)
    g = graph(out)
    assert len(g) == len(g.nodes) == len(found) > 100
    assert collections.Counter(n.name for n in g.nodes) == collections.Counter(type(f).__name__ for f in found)
    shared = [n for n in g.nodes if n.shared]
    assert any(n.name == "ReluBackward0" for n in shared)  # the residual connections


def test_nodes_are_a_depth_first_walk_with_ids_as_indices():
    _, loss = tiny_mlp_loss()
    g = graph(loss)
    assert [n.id for n in g.nodes] == list(range(len(g)))
    assert g.nodes[0].depth == 0 and not g.nodes[0].parents
    for n in g.nodes[1:]:  # preorder: the edge that found a node comes from a node found before it
        first = g.nodes[n.parents[0]]
        assert first.id < n.id and n.depth == first.depth + 1


# -- parameter names -------------------------------------------------------------------------------------------------

def test_params_name_every_accumulate_grad_leaf_of_a_sequential():
    mlp, loss = tiny_mlp_loss()
    g = graph(loss, params=dict(mlp.named_parameters()))
    leaves = [n for n in g.nodes if n.name == "AccumulateGrad"]
    assert all(n.is_leaf for n in leaves) and not any(n.is_leaf for n in g.nodes if n.name != "AccumulateGrad")
    assert sorted(n.param for n in leaves) == sorted(name for name, _ in mlp.named_parameters())
    for n in leaves:
        assert n.shape == tuple(mlp.get_parameter(n.param).shape)
    text = render(g)
    assert "AccumulateGrad → 0.weight f32[8, 4]" in text and "AccumulateGrad → 2.bias f32[3]" in text


def test_params_also_take_named_parameters_pairs_and_leave_unknown_leaves_unnamed():
    mlp, _ = tiny_mlp_loss()
    x = torch.randn(2, 4, requires_grad=True)
    g = graph(mlp(x).sum(), params=mlp.named_parameters())
    named = {n.param for n in g.nodes if n.is_leaf}
    assert named == {None} | {name for name, _ in mlp.named_parameters()}
    assert "AccumulateGrad → f32[2, 4]" in render(g)  # x: a leaf with no name


def test_tiny_mlp_golden(golden):
    mlp, loss = tiny_mlp_loss()
    golden("graph_mlp.txt", render(graph(loss, params=dict(mlp.named_parameters()))))


# -- tensors without a graph -----------------------------------------------------------------------------------------

def test_leaf_tensor_renders_one_line_saying_so():
    x = torch.randn(2, 3, requires_grad=True)
    g = graph(x, params={"x": x})
    assert g.nodes == [] and len(g) == 0
    assert render(g) == "leaf tensor x f32[2, 3] (requires_grad=True): no grad_fn, its gradient accumulates in .grad\n"


def test_constant_tensor_renders_one_line_saying_so():
    x = torch.randn(2, requires_grad=True)
    with torch.no_grad():
        c = x * 2
    g = graph(c)
    assert g.nodes == []
    assert render(g) == "constant tensor f32[2] (requires_grad=False): no grad_fn, no autograd graph\n"


# -- size and depth --------------------------------------------------------------------------------------------------

def test_2000_layer_chain_walks_and_renders_without_recursion_error():
    depth = 2000
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(depth)])
    out = model(torch.randn(1, 2)).sum()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # well below the chain's 2000 levels
    try:
        g = graph(out, params=dict(model.named_parameters()))
        text = render(g)
    finally:
        sys.setrecursionlimit(limit)
    assert len(g) == len(torch_nodes(out)) == 4 * depth + 1
    assert max(n.depth for n in g.nodes) > depth
    # Nothing dropped: rich would silently cut a tree nested this deep; graph continues it in blocks instead.
    assert all(f"→ {i}.weight f32[2, 2]" in text for i in range(depth))
    assert text.count("AccumulateGrad →") == 2 * depth
    assert max(len(line) for line in text.splitlines()) <= 100


@needs_torchvision
def test_deep_graph_references_always_point_at_a_node_printed_above():
    model = torchvision.models.resnet18()
    out = model(torch.randn(1, 3, 64, 64))
    g = graph(out, params=dict(model.named_parameters()))
    text = render(g, width=80)
    assert all(f"→ {name} " in " ".join(text.split()) for name, _ in model.named_parameters())
    assert "continued below" in text  # resnet18's graph is deeper than 80 columns of tree allow
    labelled: set[str] = set()
    for line in text.splitlines():
        label = line.lstrip("│├└─ ")
        if label.startswith("↑"):
            assert re.match(r"↑ (#\d+)", label).group(1) in labelled, line
        labelled.update(re.findall(r"^\w+ (#\d+)", label))
    assert {f"#{n.id}" for n in g.nodes if n.shared} <= labelled


def test_max_depth_counts_what_it_hides():
    mlp, loss = tiny_mlp_loss()
    g = graph(loss, params=dict(mlp.named_parameters()), max_depth=2)
    text = render(g)
    hidden = sum(n.depth > 2 for n in g.nodes)
    assert hidden == 8
    assert f"… {hidden} more nodes" in text
    assert "AddmmBackward0" in text and "ReluBackward0" not in text and "0.weight" not in text
    assert len(g.nodes) == 11  # the data stays whole
    assert render(graph(loss, max_depth=0)).splitlines()[1].endswith("… 10 more nodes")


def test_max_depth_on_a_deep_chain_shows_the_top_only():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(50)])
    text = render(graph(model(torch.randn(1, 2)).sum(), max_depth=3))
    assert len(text.splitlines()) < 20 and "more nodes" in text


def test_device_is_shown_when_not_cpu_and_no_values_are_read():
    x = torch.randn(2, 3, device="meta", requires_grad=True)  # meta tensors have no values to read
    g = graph((x * 2).sum(), params={"x": x})
    assert g.nodes[-1].device == "meta"
    assert render(g).splitlines() == [
        "tensor f32[] meta grad_fn=SumBackward0 (3 nodes)",
        "└── MulBackward0",
        "    └── AccumulateGrad → x f32[2, 3] meta",
    ]


# -- lifetimes -------------------------------------------------------------------------------------------------------

def test_works_after_backward_freed_the_saved_tensors():
    mlp, loss = tiny_mlp_loss()
    before = graph(loss, params=dict(mlp.named_parameters()))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    after = graph(loss, params=dict(mlp.named_parameters()))
    assert after.nodes == before.nodes
    assert render(after) == render(before)


def test_the_result_keeps_no_tensor_or_model_alive():
    mlp, loss = tiny_mlp_loss()
    weight = weakref.ref(mlp[0].weight)
    g = graph(loss, params=dict(mlp.named_parameters()))
    del mlp, loss
    gc.collect()
    assert weight() is None
    assert "0.weight" in render(g)


# -- errors and reprs ------------------------------------------------------------------------------------------------

def test_bad_arguments_say_what_to_pass():
    x = torch.randn(2, requires_grad=True)
    with pytest.raises(TypeError, match="takes a torch.Tensor"):
        graph([x])
    with pytest.raises(ValueError, match="max_depth must be a whole number >= 0"):
        graph(x * 2, max_depth=-1)
    with pytest.raises(TypeError, match=r"dict\(model.named_parameters\(\)\)"):
        graph(x * 2, params=nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"params\['w'\] is a float"):
        graph(x * 2, params={"w": 1.0})


def test_repr_is_one_line_and_records_are_plain_data():
    _, w = lecture_tensors()
    g = graph(w)
    assert isinstance(g, AutogradGraph) and isinstance(g.nodes[0], GraphNode)
    assert repr(g) == "<hookkit.AutogradGraph tensor f32[2] grad_fn=AddBackward0, 3 nodes>"


# -- the example -----------------------------------------------------------------------------------------------------

def test_example_runs_and_shows_the_lecture_graph():
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "MulBackward0" in result.stdout
    assert "↑ #1 (AccumulateGrad, shown above)" in result.stdout
    assert "0.weight" in result.stdout and "[4.0, 4.0]" in result.stdout
