"""`hookkit layers MODEL --input-shape ...` (issue 10): one forward on a random input lists, in execution order, the
modules that ran, the op nodes of their forwards and their repeated calls, named as ``hookkit.layer_names(model, x)``
and torchvision's ``get_graph_node_names`` name them; without --input-shape the command runs nothing."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import hookkit
from hookkit.cli import main, run

from _optional import needs_torchvision, torchvision

# A leaf module called twice, an op that shares its counter with that module's name (FX: module `block.relu`, then
# `F.relu` -> "block.relu_1", then the module's second call -> "block.relu_2"), ops at the root's scope, and a module
# that never runs (and one that runs under its first name only).
NET_MODULE = """
import torch
import torch.nn as nn
import torch.nn.functional as F

FORWARDS = []


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.relu(self.fc(x))
        h = F.relu(h - 1)
        return self.relu(h) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 4)
        self.also_head = self.head  # one module under two names: it runs as "head"

    def forward(self, x):
        FORWARDS.append("forward")
        x = torch.flatten(self.block(x), 1)
        return self.head(x).relu()


def make():
    return Net()
"""

NET_ORDER = ["block", "block.fc", "block.relu", "block.sub", "block.relu_1", "block.relu_2", "block.add", "flatten",
             "head", "relu"]

NET_TREE = """\
Net (netmodels:make, weights as the factory made them) · 50 params · 6 names
One forward on a random 2×4 input, in execution order: 4 modules, 5 op nodes, 1 repeated call
├── block  Block  20
│   ├── block.fc  Linear  20
│   ├── block.relu  ReLU  0
│   ├── block.sub  op
│   ├── block.relu_1  op
│   ├── block.relu_2  2nd call of block.relu
│   └── block.add  op
├── flatten  op
├── head  Linear  10
└── relu  op
1 module name did not run on this input and is not listed: unused.
Pass a name, or a glob like 'layer*.0.conv1', to hookkit.capture(model, ...).
Pass op and repeated-call names to capture() exactly as listed: its globs match module names only.
"""


@pytest.fixture
def netmodels(user_module):
    """`netmodels` importable as a user's model file; its FORWARDS list has one entry per forward."""
    user_module("netmodels", NET_MODULE)
    import netmodels

    return netmodels


def invoke(argv: list[str], width: int = 120) -> tuple[int, str]:
    """Run the command in-process on a recording console; return (exit code, rendered text)."""
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    code = run(argv, console=console)
    return code, console.file.getvalue()


def tree_names(out: str) -> list[str]:
    """The names of a tree, in printed order: the first word of each line drawn with tree guides."""
    return [line.lstrip("│├└─ ").split()[0] for line in out.splitlines()[1:] if line.lstrip(" │")[:1] in ("├", "└")]


def table_rows(out: str) -> dict[str, list[str]]:
    """name -> the cells after it, for the table's body rows."""
    rows = {}
    for line in out.splitlines()[4:]:
        words = line.split()
        if words and not line.startswith("Pass ") and "did not run" not in line:
            rows[words[0]] = words[1:]
    return rows


# -- the listing ---------------------------------------------------------------------------------------------------
def test_input_shape_lists_ops_and_repeated_calls_in_execution_order_as_a_tree(netmodels):
    code, out = invoke(["layers", "netmodels:make", "--input-shape", "2,4"])
    assert code == 0
    assert out == NET_TREE


def test_listed_names_are_layer_names_of_the_same_input_in_the_same_order(netmodels):
    code, out = invoke(["layers", "netmodels:make", "--input-shape", "2,4"])
    assert code == 0
    assert tree_names(out) == hookkit.layer_names(netmodels.make(), torch.randn(2, 4)) == NET_ORDER


def test_an_op_sharing_a_modules_counter_is_an_op_and_the_modules_second_call_a_call(netmodels):
    code, out = invoke(["layers", "netmodels:make", "--input-shape", "2,4", "--table"])
    assert code == 0
    rows = table_rows(out)
    assert list(rows) == NET_ORDER
    assert rows["block.relu_1"] == ["op"]  # F.relu, numbered after the module block.relu
    assert rows["block.relu_2"] == ["2nd", "call", "of", "block.relu"]
    assert rows["block.sub"] == rows["flatten"] == rows["relu"] == ["op"]
    assert rows["block.relu"] == ["ReLU", "0", "0"]
    assert rows["head"] == ["Linear", "10", "10"]
    assert out.splitlines()[2].split() == ["layer", "class", "own", "params", "total", "params"]


def test_the_model_runs_twice_and_its_hooks_and_train_mode_are_left_as_they_were(netmodels, monkeypatch):
    model = netmodels.make().train()
    monkeypatch.setattr("hookkit.cli._inputs.load_model", lambda spec, weights=None: model)
    before = hookkit.hook_census(model)
    code, _ = invoke(["layers", "netmodels:make", "--input-shape", "3,4"])
    assert code == 0
    assert netmodels.FORWARDS == ["forward", "forward"]  # the shape check, then the listing run
    assert hookkit.hook_census(model) == before
    assert model.training and torch.is_grad_enabled()


def test_without_input_shape_nothing_runs_and_no_op_is_listed(netmodels):
    code, out = invoke(["layers", "netmodels:make"])
    assert code == 0
    assert netmodels.FORWARDS == []
    assert tree_names(out) == ["block", "block.fc", "block.relu", "head", "unused", "also_head"]
    assert " op" not in out and " call of " not in out and "did not run" not in out
    assert out.splitlines()[0].endswith("· 50 params · 6 names")


# -- --filter and --depth ------------------------------------------------------------------------------------------
def test_filter_glob_matches_op_and_repeated_call_names_and_keeps_their_scope(netmodels):
    code, out = invoke(["layers", "netmodels:make", "--input-shape", "2,4", "--filter", "block.relu*"])
    assert code == 0
    assert "· 3 match 'block.relu*'" in out.splitlines()[0]
    assert tree_names(out) == ["block", "block.relu", "block.relu_1", "block.relu_2"]


def test_filter_an_exact_op_name(netmodels):
    code, out = invoke(["layers", "netmodels:make", "--input-shape", "2,4", "--filter", "flatten"])
    assert code == 0
    assert tree_names(out) == ["flatten"]
    assert "· 1 match 'flatten'" in out


def test_filter_double_star_reaches_root_ops(netmodels):
    code, out = invoke(["layers", "netmodels:make", "--input-shape", "2,4", "--filter", "**relu*"])
    assert code == 0
    assert tree_names(out) == ["block", "block.relu", "block.relu_1", "block.relu_2", "relu"]


def test_depth_keeps_shallow_ops(netmodels):
    code, out = invoke(["layers", "netmodels:make", "--input-shape", "2,4", "--depth", "1"])
    assert code == 0
    assert tree_names(out) == ["block", "flatten", "head", "relu"]
    assert "6 deeper names hidden by --depth 1." in out


# -- bad input -----------------------------------------------------------------------------------------------------
def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hookkit: error: "), captured.err
    return lines[0]


def test_a_shape_the_model_rejects_is_one_line_and_exit_2(netmodels, capsys):
    line = one_error_line(["layers", "netmodels:make", "--input-shape", "2,5"], capsys)
    assert "Net rejected a random input of shape (2, 5)" in line and "--input-shape" in line


@pytest.mark.parametrize("shape", ["0,4", "2,x", ""])
def test_a_malformed_shape_is_a_usage_error(netmodels, shape, capsys):
    assert main(["layers", "netmodels:make", "--input-shape", shape]) == 2
    err = capsys.readouterr().err
    assert "is not a shape" in err and "Traceback" not in err


def test_filter_that_matches_no_node_that_ran_gives_close_names(netmodels, capsys):
    line = one_error_line(["layers", "netmodels:make", "--input-shape", "2,4", "--filter", "block.ad"], capsys)
    assert "no layer or op node 'block.ad' ran in Net" in line and "Did you mean 'block.add'" in line


def test_filter_naming_a_module_that_did_not_run_says_so(netmodels, capsys):
    line = one_error_line(["layers", "netmodels:make", "--input-shape", "2,4", "--filter", "unused"], capsys)
    assert "'unused' names modules of Net that did not run on this input" in line


def test_filter_naming_a_second_name_of_a_module_that_ran_gives_its_first_name(netmodels, capsys):
    line = one_error_line(["layers", "netmodels:make", "--input-shape", "2,4", "--filter", "also_head"], capsys)
    assert "'also_head' names a module that ran under its first name: head" in line


def test_an_op_name_filter_without_input_shape_asks_for_one(netmodels, capsys):
    line = one_error_line(["layers", "netmodels:make", "--filter", "block.add"], capsys)
    assert "'block.add' is an op or repeated-call node name: pass --input-shape" in line


# -- against torchvision -------------------------------------------------------------------------------------------
def fx_node_kinds(model: torch.nn.Module) -> dict[str, str]:
    """torchvision's FX node names (eval mode, as get_graph_node_names traces) -> "module" for a call_module node,
    "op" for a call_function / call_method node."""
    from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs

    tracer = NodePathTracer(**_set_default_tracer_kwargs(None))
    graph = tracer.trace(model.eval())
    by_node = {node.name: node.op for node in graph.nodes}
    return {name: "module" if by_node[node.name] == "call_module" else "op"
            for node, name in tracer.node_to_qualname.items() if by_node[node.name] != "placeholder"}


COLLIDING_MODULE = """
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = F.relu(x)  # FX: "b.relu", so the module's first call is "b.relu_1"
        return self.relu(self.relu(self.fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = Block()

    def forward(self, x):
        return self.b(x)
"""


@needs_torchvision
@pytest.mark.parametrize("spec", ["netmodels:make", "colliding:Net", "torchvision:resnet18"])
def test_each_node_is_an_op_exactly_where_fx_makes_a_function_or_method_node(spec, netmodels, user_module):
    from hookkit.cli.models import load_model

    user_module("colliding", COLLIDING_MODULE)
    shape = "1,3,32,32" if spec.startswith("torchvision:") else "2,4"
    code, out = invoke(["layers", spec, "--input-shape", shape, "--table"])
    assert code == 0
    kinds = {name: "op" if cells[0] == "op" else "module" for name, cells in table_rows(out).items()}
    fx = fx_node_kinds(load_model(spec))
    assert {n: k for n, k in kinds.items() if n in fx} == fx
    assert set(fx) <= set(kinds)


def test_an_op_named_like_a_module_says_capture_takes_the_module(user_module):
    user_module("colliding", COLLIDING_MODULE)
    code, out = invoke(["layers", "colliding:Net", "--input-shape", "2,4", "--table"])
    assert code == 0
    rows = table_rows(out)
    assert list(rows) == ["b", "b.relu", "b.fc", "b.relu_1", "b.relu_2"]
    assert " ".join(rows["b.relu"]) == "op (capture() takes this name as the module)"
    assert rows["b.relu_1"] == ["1st", "call", "of", "b.relu"] and rows["b.relu_2"] == ["2nd", "call", "of", "b.relu"]


@needs_torchvision
def test_resnet18_nodes_are_torchvisions_graph_node_names_plus_the_container_modules():
    from torchvision.models.feature_extraction import get_graph_node_names

    code, out = invoke(["layers", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--table"])
    assert code == 0
    names = list(table_rows(out))
    model = torchvision.models.resnet18()
    containers = {n for n, m in model.named_modules() if n and next(m.children(), None) is not None}
    _, fx_eval = get_graph_node_names(model)
    assert [n for n in names if n not in containers] == fx_eval[1:]  # FX's first node is the input, "x"
    assert out.splitlines()[1] == ("One forward on a random 1×3×64×64 input, in execution order: 67 modules, "
                                   "9 op nodes, 8 repeated calls")


@needs_torchvision
def test_resnet18_block_filter_shows_its_add_and_second_relu_call():
    code, out = invoke(["layers", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--filter", "layer1.0.*"])
    assert code == 0
    lines = out.splitlines()
    assert "7 match 'layer1.0.*'" in lines[0]
    assert tree_names(out) == ["layer1", "layer1.0", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu",
                               "layer1.0.conv2", "layer1.0.bn2", "layer1.0.add", "layer1.0.relu_1"]
    assert "layer1.0.add  op" in out and "layer1.0.relu_1  2nd call of layer1.0.relu" in out
    assert max(len(line) for line in lines) <= 120


def test_nn_module_on_its_own_has_no_node_names(user_module):
    user_module("leafmodels", "import torch.nn as nn\n\ndef make():\n    return nn.Linear(3, 2)\n")
    code, out = invoke(["layers", "leafmodels:make", "--input-shape", "1,3"])
    assert code == 0
    assert "Linear has no submodules and its forward ran no op node outside torch's own modules" in out
