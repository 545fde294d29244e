"""hookkit's op nodes against torchvision's FX feature extractor: the spirit of torchvision's own
``test/test_backbone_utils.py`` (node naming conventions, random train / eval nodes of every classifier, train / eval
control flow with Dropout), ported to hookkit.

The reference is torchvision itself: the names come from its ``NodePathTracer`` (what ``get_graph_node_names`` and
``create_feature_extractor`` use, with their default tracer arguments), the values from the traced graph run with a
``torch.clone`` node inserted right after each returned node. That clone corrects FX's by-reference bug: its
extractor returns the node's tensor itself, which a later in-place op in the graph (``ReLU(inplace=True)``) overwrites.
Gradients are compared with ``torch.autograd.grad`` on an out-of-place copy of the model.
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.utils import _pytree as pytree

import hookkit

from _optional import importorskip_torchvision
from conftest import hook_census

torchvision = importorskip_torchvision()  # the whole file compares with torchvision's FX extractor
fe = pytest.importorskip("torchvision.models.feature_extraction")

MODELS = torchvision.models.list_models(module=torchvision.models)


# -- the FX side ---------------------------------------------------------------------------------------------------
# How each FX node shows at run time, where hookkit looks (a torch function mode inside the model's modules):
VISIBLE = "visible"  # a leaf module call, or a torch function / Tensor method / operator applied to a tensor
SILENT = "silent"  # no tensor op at run time: int / torch.Size arithmetic, indexing a tuple, getattr of a
#                    non-tensor, a torch function given no tensor (vit's torch._assert(x.dim() == 3, ...))
OPAQUE = "opaque"  # a function FX keeps whole (torch.fx.wrap, e.g. swin's shifted_window_attention): at run time an
#                    unknown number of ops
# Besides, FX runs while tracing what does not depend on the input (torchvision's tracer does not proxy buffers:
# maxvit's `self.relative_position_index.view(-1)`; `torch._assert(<a Python bool>)`): no node, and a tensor result
# sits in the graph as a constant (`_tensor_constant0`, used by a `uses_constant` node). hookkit names such an op on
# a buffer (a documented difference: at run time it cannot tell it from one FX records), not one without tensors.


@dataclass
class FxNode:
    name: str  # torchvision's node name
    kind: str  # VISIBLE, SILENT or OPAQUE
    tensor: bool  # whether its run-time value is a torch.Tensor
    node: fx.Node

    @property
    def uses_constant(self) -> bool:
        return any(a.op == "get_attr" and str(a.target).startswith("_tensor_constant")
                   for a in self.node.all_input_nodes)

    @property
    def prefix(self) -> str:
        return _prefix(self.name)

    @property
    def base(self) -> str:
        return _base(self.name)


def _prefix(name: str) -> str:
    """``"layer1.0.add_1"`` -> ``"layer1.0"``: the scope of an op, the parent of a module."""
    return name.rpartition(".")[0]


def _base(name: str) -> str:
    """``"layer1.0.add_1"`` -> ``"add"``: the last part without the repeat suffix (torchvision strips it the same
    way before counting, in NodePathTracer._get_node_qualname)."""
    return re.sub(r"_[0-9]+$", "", name.rpartition(".")[2])


def _is_torch_api(target) -> bool:
    return (getattr(target, "__module__", None) or "").split(".")[0] == "torch"  # not torchvision's functions


def _run_time_kind(node: fx.Node, args, kwargs) -> str:
    if node.op == "call_module":
        return VISIBLE
    if node.op == "call_method":
        return VISIBLE if isinstance(args[0], torch.Tensor) else SILENT
    target = node.target
    if target is getattr or getattr(target, "__module__", None) in ("_operator", "operator"):
        # x + y, x[i], x.shape reach torch only when an operand is a tensor (not for ints, sizes, tuples)
        return VISIBLE if any(isinstance(a, torch.Tensor) for a in args) else SILENT
    if _is_torch_api(target):
        return VISIBLE if any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves((args, kwargs))) else SILENT
    return OPAQUE


@dataclass
class FxGraph:
    module: fx.GraphModule
    nodes: list[FxNode]  # call_module / call_function / call_method nodes, in execution order


def fx_graph(model: nn.Module, *args) -> FxGraph:
    """Trace ``model`` in its current train / eval mode as torchvision's feature extractor does, run the graph once
    on ``args`` to learn what each node is at run time, and return the named nodes."""
    tracer = fe.NodePathTracer(**fe._set_default_tracer_kwargs(None))
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    seen: dict[fx.Node, tuple[str, bool]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            a, kw = self.fetch_args_kwargs_from_env(n)
            out = super().run_node(n)
            if n.op in ("call_module", "call_function", "call_method"):
                seen[n] = (_run_time_kind(n, a, kw), isinstance(out, torch.Tensor))
            return out

    state = torch.random.get_rng_state()
    with torch.no_grad():
        Recorder(gm).run(*args)
    torch.random.set_rng_state(state)
    nodes = [FxNode(q, *seen[n], n) for n, q in tracer.node_to_qualname.items() if n in seen]
    return FxGraph(gm, nodes)


def fx_values(g: FxGraph, names: list[str], *args, detach: bool = True):
    """The feature extractor for ``names`` as create_feature_extractor builds it (the NodePathTracer graph with the
    named nodes as outputs), each node cloned inside the graph right after it ran, so that a later in-place op
    cannot change the returned value; with ``detach=False`` the live node values. Returns (output, {name: value})."""
    graph = copy.deepcopy(g.module.graph)
    old_to_new = dict(zip(g.module.graph.nodes, graph.nodes, strict=True))
    by_name = {n.name: old_to_new[n.node] for n in g.nodes}
    returned = {}
    for name in names:
        node = by_name[name]
        if detach:
            with graph.inserting_after(node):
                returned[name] = graph.call_function(torch.clone, (node,))
        else:
            returned[name] = node  # the live tensor, for autograd.grad on an out-of-place model
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], returned),)
    gm = fx.GraphModule(g.module, graph)
    if detach:
        with torch.no_grad():
            return gm(*args)
    return gm(*args)


def fx_names(model: nn.Module, *args) -> list[str]:
    """The names torchvision lists for the nodes hookkit can see (see VISIBLE)."""
    return [n.name for n in fx_graph(model, *args).nodes if n.kind == VISIBLE]


# -- the hookkit side ----------------------------------------------------------------------------------------------
def modes() -> int:
    return torch._C._len_torch_function_stack()


def fx_leaf_paths(model: nn.Module) -> set[str]:
    """The leaf modules FX can reach: leaves by its is_leaf_module (with torchvision's default leaf modules) that are
    not inside another leaf. A ModuleList / ModuleDict is a torch.nn class but is never called: not a leaf here."""
    tracer = fe.NodePathTracer(**fe._set_default_tracer_kwargs(None))
    leaves: set[str] = set()
    for path, m in model.named_modules():
        if (path and not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and tracer.is_leaf_module(m, path)
                and not any(path.startswith(p + ".") for p in leaves)):
            leaves.add(path)
    return leaves


def hookkit_nodes(model: nn.Module, *args) -> list[str]:
    """``hookkit.layer_names(model, *args)`` without the names FX has no node for: non-leaf modules (FX traces
    through them) and modules inside leaf modules (FX does not enter a leaf). Checks the census on the way."""
    before, stack = hook_census(model), modes()
    names = hookkit.layer_names(model, *args)
    assert hook_census(model) == before and modes() == stack
    modules = {p for p, _ in model.named_modules() if p}
    leaves = fx_leaf_paths(model)
    return [n for n in names if n not in modules or n in leaves]


def hookkit_values(model: nn.Module, names: list[str], *args) -> tuple:
    """Default capture (copy-on-write) of ``names``: (model output, {name: value})."""
    before, stack = hook_census(model), modes()
    with torch.no_grad(), hookkit.capture(model, names) as cap:
        out = model(*args)
    assert hook_census(model) == before and modes() == stack
    return out, {n: cap[n] for n in names}  # a module's path: its first call in the forward, as in FX


# -- FX nodes to hookkit names -------------------------------------------------------------------------------------
@dataclass
class Alignment:
    mapping: dict[str, str]  # FX node name -> hookkit node name
    missing: list[str]  # FX VISIBLE nodes with no hookkit node
    extra: list[str]  # hookkit nodes no FX node maps to
    clean: set[str]  # prefixes where FX has only VISIBLE nodes


def align(fx_nodes: list[FxNode], hk: list[str]) -> Alignment:
    """Map FX's node names to hookkit's.

    The rule: per prefix (an op's scope, a module's parent), FX's VISIBLE nodes run in the same order as hookkit's
    nodes of that prefix, so they are matched in order by base name (an ``add`` to the next ``add``). The suffixes can
    differ only where FX counts a node hookkit cannot see: a SILENT one (``getitem`` of a torch.Size moves FX's
    ``getitem`` counter, not hookkit's) or an OPAQUE one (a wrapped function's inner ops are hookkit's nodes, not
    FX's); or where hookkit has ops FX ran while tracing (before a ``uses_constant`` node). A prefix with none of
    these is *clean*: there, FX's names are hookkit's (the SPEC's promise).

    hookkit's extra ops come only at an OPAQUE or ``uses_constant`` node, so the nodes before the first such node
    of a prefix are matched from the front, the others from the back."""
    fx_by: dict[str, list[tuple[str, bool]]] = {}  # prefix -> [(VISIBLE node name, from the back)]
    hk_by: dict[str, list[str]] = {}
    dirty, unsure = set(), set()
    for n in fx_nodes:
        fx_by.setdefault(n.prefix, [])
        if n.kind == OPAQUE or n.uses_constant:
            unsure.add(n.prefix)
        if n.kind == VISIBLE:
            fx_by[n.prefix].append((n.name, n.prefix in unsure))
        if n.kind != VISIBLE or n.uses_constant:
            dirty.add(n.prefix)
    for name in hk:
        hk_by.setdefault(_prefix(name), []).append(name)
    mapping, missing = {}, []
    for prefix, nodes in fx_by.items():
        theirs, lo, hi = hk_by.get(prefix, []), 0, len(hk_by.get(prefix, []))
        for name, _ in (n for n in nodes if not n[1]):
            j = next((j for j in range(lo, hi) if _base(theirs[j]) == _base(name)), None)
            if j is None:
                missing.append(name)
            else:
                mapping[name], lo = theirs[j], j + 1
        for name, _ in reversed([n for n in nodes if n[1]]):
            j = next((j for j in range(hi - 1, lo - 1, -1) if _base(theirs[j]) == _base(name)), None)
            if j is None:
                missing.append(name)
            else:
                mapping[name], hi = theirs[j], j
    matched = set(mapping.values())
    return Alignment(mapping, missing, [n for n in hk if n not in matched], set(fx_by) - dirty)


def module_call_names(fx_nodes: list[FxNode]) -> dict[str, str]:
    """FX name -> the name of that leaf module call by its path: the k-th call (from 0) of module ``p`` is ``p``,
    then ``p_k``. That is FX's name, except for a module whose own name ends in _<digits> (ViT's ``ln_1``, ``ln_2``):
    torchvision strips that suffix before counting ("ln", "ln_1"), hookkit keeps the path (documented in the README)."""
    calls: dict[str, int] = {}
    out = {}
    for n in fx_nodes:
        if n.node.op == "call_module":
            k = calls[n.node.target] = calls.get(n.node.target, -1) + 1
            out[n.name] = n.node.target if k == 0 else f"{n.node.target}_{k}"
    return out


def check_names(fx_nodes: list[FxNode], hk: list[str]) -> Alignment:
    """Every node FX has and hookkit can see is a hookkit node: an op under FX's name in clean prefixes, a leaf module
    call under its path-based name everywhere (no int node or wrapped function is named like a child module)."""
    al = align(fx_nodes, hk)
    assert not al.missing, f"FX nodes with no hookkit node: {al.missing}"
    modules = module_call_names(fx_nodes)
    expected = {n: modules.get(n, n) for n in al.mapping if n in modules or _prefix(n) in al.clean}
    renamed = {n: (e, al.mapping[n]) for n, e in expected.items() if al.mapping[n] != e}
    assert not renamed, f"FX name -> (expected, hookkit's name): {renamed}"
    return al


def check_extras(fx_nodes: list[FxNode], al: Alignment) -> None:
    """hookkit lists no node FX lacks, except where the difference is documented (SPEC, README): a ``x.shape`` read
    FX never uses ("getattr"), the inner ops of a call FX keeps whole (in a prefix with an OPAQUE node), and ops on
    parameters and buffers alone that FX runs while tracing (in a prefix with a ``uses_constant`` node)."""
    opaque = {n.prefix for n in fx_nodes if n.kind == OPAQUE or n.uses_constant}
    unexplained = [n for n in al.extra if _base(n) != "getattr" and _prefix(n) not in opaque]
    assert not unexplained, f"hookkit nodes FX has no node for: {unexplained}"


# -- 1. naming conventions on small models ------------------------------------------------------------------------
class TestSubModule(nn.Module):  # torchvision's own naming-convention model (test_backbone_utils.py)
    __test__ = False

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        x = x + 1
        x = x + 1
        x = self.relu(x)
        x = self.relu(x)
        return x


class TestModule(nn.Module):
    __test__ = False

    def __init__(self):
        super().__init__()
        self.submodule = TestSubModule()
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.submodule(x)
        x = x + 1
        x = x + 1
        x = self.relu(x)
        x = self.relu(x)
        return x


def test_torchvision_naming_convention_model_gets_torchvisions_names():
    """torchvision's test_node_name_conventions: repeats of an op or a leaf module get _1 per scope."""
    expected = ["submodule.add", "submodule.add_1", "submodule.relu", "submodule.relu_1",
                "add", "add_1", "relu", "relu_1"]
    model, x = TestModule(), torch.rand(1, 3, 8, 8)
    assert fe.get_graph_node_names(model)[0] == ["x", *expected]
    assert hookkit.layer_names(model, x) == ["submodule", *expected]  # "submodule": the non-leaf module itself


class Counters(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.relu(self.fc(x))
        h = F.relu(h - 1)
        h = self.relu(h + 1)
        h = torch.relu(h * 2)
        return self.fc(h)


def test_a_leaf_child_and_functional_relu_share_one_counter_and_repeated_leaf_calls_get_suffixes():
    expected = ["fc", "relu", "sub", "relu_1", "add", "relu_2", "mul", "relu_3", "fc_1"]
    model, x = Counters(), torch.randn(3, 4)
    assert fx_names(model, x) == expected
    assert hookkit_nodes(model, x) == expected


class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.layer = nn.Sequential(Block(4, 6), Block(6, 6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.layer(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


RESLIKE_NODES = ["stem"] + [
    f"layer.{i}.{n}" for i in (0, 1)
    for n in ("downsample.0", "downsample.1", "conv1", "bn1", "relu", "conv2", "bn2", "add", "relu_1")
] + ["adaptive_avg_pool2d", "flatten", "fc"]


def test_residual_blocks_in_place_add_is_add_and_nested_sequential_leaves_keep_their_paths():
    model, x = ResLike(), torch.randn(2, 3, 10, 10)
    for train in (True, False):
        model.train(train)
        assert fx_names(model, x) == RESLIKE_NODES
        assert hookkit_nodes(model, x) == RESLIKE_NODES
        assert model.training == train  # layer_names restores the mode


class Operators(nn.Module):
    def forward(self, x):
        a = x / 2
        b = a % 1.5
        c = b[0]
        d = 1 - c
        e = -d
        f = (e == e).float()
        h = a.clone()
        h.add_(f)
        i = torch.flatten(h)
        j = h.flatten()
        k = h.view(h.size(0), -1)
        return torch.cat([i, j, k.sum(0)])


OPERATOR_NODES = ["truediv", "mod", "getitem", "sub", "neg", "eq", "float", "clone", "add_", "flatten", "flatten_1",
                  "size", "view", "sum", "cat"]


def test_python_operators_and_methods_are_named_as_fx_names_them():
    """/ -> truediv, % -> mod, x[i] -> getitem, 1 - x -> sub, -x -> neg, == -> eq, x.add_ -> add_, torch.flatten and
    x.flatten share "flatten"; x.size(0) is a node too (int-valued), as in FX."""
    model, x = Operators(), torch.randn(2, 6)
    assert fx_names(model, x) == OPERATOR_NODES
    assert hookkit_nodes(model, x) == OPERATOR_NODES
    _, theirs = fx_values(fx_graph(model, x), OPERATOR_NODES[:9], x)
    _, ours = hookkit_values(model, OPERATOR_NODES[:9], x)
    for n in OPERATOR_NODES[:9]:
        assert torch.equal(ours[n], theirs[n]), n


class ShapeArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        n = x.shape[0]  # FX: getattr (a tensor read), getitem (of a torch.Size: no torch call at run time)
        h = self.fc(x)[: n // 2]  # FX: floordiv (ints), getitem_1 (a tensor: hookkit's first getitem)
        return h[0] * 2  # FX: getitem_2, mul


def test_int_arithmetic_on_shapes_moves_fxs_counters_only_and_alignment_maps_the_rest():
    """The documented difference: FX makes nodes for int arithmetic; hookkit sees only tensor ops, so its counters
    stay behind FX's. The alignment maps FX's tensor nodes to hookkit's names by order and base name."""
    model, x = ShapeArithmetic(), torch.randn(4, 6)
    g = fx_graph(model, x)
    assert [(n.name, n.kind) for n in g.nodes] == [
        ("getattr", VISIBLE), ("getitem", SILENT), ("fc", VISIBLE), ("floordiv", SILENT), ("getitem_1", VISIBLE),
        ("getitem_2", VISIBLE), ("mul", VISIBLE)]
    hk = hookkit_nodes(model, x)
    assert hk == ["getattr", "fc", "getitem", "getitem_1", "mul"]
    al = align(g.nodes, hk)
    mapping = al.mapping
    assert mapping == {"getattr": "getattr", "fc": "fc", "getitem_1": "getitem", "getitem_2": "getitem_1",
                       "mul": "mul"}
    assert al.clean == set() and al.missing == al.extra == []  # root has SILENT nodes: no exact-name claim there
    names = ["getitem_1", "getitem_2", "mul"]
    _, theirs = fx_values(g, names, x)
    _, ours = hookkit_values(model, [mapping[n] for n in names], x)
    for n in names:
        assert torch.equal(ours[mapping[n]], theirs[n]), n


class Leaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.se = torchvision.ops.SqueezeExcitation(8, 2)  # torchvision.ops: a leaf by torchvision's default
        self.cna = torchvision.ops.Conv2dNormActivation(8, 8)

    def forward(self, x):
        x = self.cna(self.se(self.conv(x)))
        return x.flatten(2).mean(2)


def test_ops_inside_leaf_modules_are_not_nodes():
    expected = ["conv", "se", "cna", "flatten", "mean"]
    model, x = Leaves().eval(), torch.randn(2, 3, 8, 8)
    assert fx_names(model, x) == expected
    before, stack = hook_census(model), modes()
    names = hookkit.layer_names(model, x)
    assert hook_census(model) == before and modes() == stack
    assert hookkit_nodes(model, x) == expected
    modules = {p for p, _ in model.named_modules()}
    assert [n for n in names if n not in modules] == ["flatten", "mean"]  # no "se.mul", "cna.*"


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)  # a leaf with F ops inside

    def forward(self, x):
        return self.enc(self.fc(x).relu()).mean(1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_transformer_encoder_layer_is_one_node_and_leaves_the_function_mode_stack_as_it_was(train):
    expected = ["fc", "relu", "enc", "mean"]
    model, x = Encoder().train(train), torch.randn(2, 3, 8)
    assert fx_names(model, x) == expected
    depth = modes()
    try:
        assert hookkit_nodes(model, x) == expected  # checks the census and the mode stack too
        g = fx_graph(model, x)
        _, theirs = fx_values(g, ["relu", "mean"], x)
        _, ours = hookkit_values(model, ["relu", "mean"], x)
        assert torch.equal(ours["relu"], theirs["relu"]) and torch.equal(ours["mean"], theirs["mean"])
    finally:
        while modes() > depth:  # a mode left behind would count every later test's ops twice
            torch._C._pop_torch_function_stack()


class Affine(nn.Module):
    """Not a torch.nn class: FX traces through it, so its ops are nodes, unless it sits inside a leaf module."""

    def forward(self, x):
        return x * 2 - 1


class LeafAroundNonLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = Affine()
        self.cna = torchvision.ops.Conv2dNormActivation(3, 4, norm_layer=lambda c: Affine())  # a leaf around Affine

    def forward(self, x):
        return self.cna(self.norm(x)).mean()


def test_ops_of_a_non_leaf_module_inside_a_leaf_module_are_not_nodes():
    """As convnext's LayerNorm2d inside features.0, a Conv2dNormActivation: FX does not enter the leaf at all."""
    expected = ["norm.mul", "norm.sub", "cna", "mean"]
    model, x = LeafAroundNonLeaf(), torch.randn(2, 3, 6, 6)
    assert fx_names(model, x) == expected
    assert hookkit_nodes(model, x) == expected


class TraceTimeOps(nn.Module):
    """Calls that do not depend on the input: FX runs them while tracing (its tracer does not proxy buffers), so
    they are no nodes (a tensor result is a constant in the graph)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("order", torch.tensor([[3, 2, 1, 0]]))

    def forward(self, x):
        torch._assert(self.fc.in_features == 4, "four features")  # as maxvit's PartitionAttentionLayer does
        order = self.order.view(-1)  # as maxvit's get_relative_positional_bias does with its index buffer
        return self.fc(x)[:, order].view(-1)


def test_calls_fx_runs_while_tracing_are_no_nodes_but_an_op_on_a_buffer_is_hookkits_documented_extra():
    """torch._assert of a Python bool has no tensor argument: no node in either. The buffer's view is an FX
    constant but a hookkit node (documented in the README), so the scope's later "view" is hookkit's "view_1";
    the alignment matches FX's nodes after the constant from the back."""
    model, x = TraceTimeOps(), torch.randn(2, 4)
    g = fx_graph(model, x)
    assert [n.name for n in g.nodes] == ["fc", "getitem", "view"]
    assert [n.name for n in g.nodes if n.uses_constant] == ["getitem"]
    hk = hookkit_nodes(model, x)
    assert hk == ["view", "fc", "getitem", "view_1"]
    al = align(g.nodes, hk)
    assert al.mapping == {"fc": "fc", "getitem": "getitem", "view": "view_1"}
    assert al.extra == ["view"] and al.clean == set()
    check_extras(g.nodes, al)
    _, theirs = fx_values(g, ["getitem", "view"], x)
    _, ours = hookkit_values(model, ["getitem", "view_1"], x)
    assert torch.equal(ours["getitem"], theirs["getitem"]) and torch.equal(ours["view_1"], theirs["view"])


class SuffixedChildren(nn.Module):
    """Children whose own names end in _<digits>, as ViT's EncoderBlock.ln_1 / ln_2."""

    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(4)
        self.ln_2 = nn.LayerNorm(4)

    def forward(self, x):
        return self.ln_2(self.ln_1(x) + 1)


def test_children_named_with_a_digit_suffix_keep_their_paths_where_fx_strips_the_suffix():
    """The documented difference: torchvision strips a trailing _<digits> before counting, so FX's "ln_1" is module
    ln_2; hookkit's names of module calls are their paths, so "ln_1" stays module ln_1."""
    model, x = SuffixedChildren(), torch.randn(2, 4)
    g = fx_graph(model, x)
    assert [n.name for n in g.nodes] == ["ln", "add", "ln_1"]  # torchvision's names
    assert module_call_names(g.nodes) == {"ln": "ln_1", "ln_1": "ln_2"}
    hk = hookkit_nodes(model, x)
    assert hk == ["ln_1", "add", "ln_2"]
    assert check_names(g.nodes, hk).mapping == {"ln": "ln_1", "add": "add", "ln_1": "ln_2"}
    _, theirs = fx_values(g, ["ln", "ln_1"], x)
    _, ours = hookkit_values(model, ["ln_1", "ln_2"], x)
    assert torch.equal(ours["ln_1"], theirs["ln"]) and torch.equal(ours["ln_2"], theirs["ln_1"])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        y = self.ln(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        return y + x


def test_default_capture_leaves_multihead_attentions_fast_path_values_unchanged():
    """In eval, nn.MultiheadAttention takes its fast path only when no torch function mode is active; a capture must
    not change what it computes (it did, by about 1e-7, on every ViT, before the mode was taken off around it)."""
    model, x = Attention().eval(), torch.randn(2, 5, 16)
    _, theirs = fx_values(fx_graph(model, x), ["add"], x)
    _, ours = hookkit_values(model, ["add"], x)
    assert torch.equal(ours["add"], theirs["add"])


class DataDependent(nn.Module):
    """FX cannot trace this (a tensor's value decides the branch); hookkit names what runs, by the same rule."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.zero_()

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = self.act(h) * 2
            h = self.act(h - 1)
        else:
            h = F.relu(-h)
        return h + 1


def test_data_dependent_control_flow_fx_cannot_trace_is_named_by_the_same_rule_at_run_time():
    model = DataDependent()
    with pytest.raises(fx.proxy.TraceError):
        fe.get_graph_node_names(model)
    pos, neg = torch.rand(2, 4) + 0.1, -torch.rand(2, 4) - 0.1
    # Written by hand with FX's rule: h.sum() -> sum, `> 0` -> gt; the leaf `act` twice -> act, act_1. The `if`
    # calls Tensor.__bool__, where FX stops with the TraceError: hookkit names it like any method ("bool").
    assert hookkit_nodes(model, pos) == ["fc", "sum", "gt", "bool", "act", "mul", "sub", "act_1", "add"]
    assert hookkit_nodes(model, neg) == ["fc", "sum", "gt", "bool", "neg", "relu", "add"]
    _, ours = hookkit_values(model, ["act", "mul", "sub", "act_1", "add"], pos)
    expected = {"act": pos, "mul": 2 * pos, "sub": 2 * pos - 1, "act_1": (2 * pos - 1).relu(),
                "add": (2 * pos - 1).relu() + 1}
    for n, v in expected.items():
        torch.testing.assert_close(ours[n], v, msg=n)
    _, ours = hookkit_values(model, ["neg", "relu", "add"], neg)
    for n, v in {"neg": -neg, "relu": -neg, "add": 1 - neg}.items():
        torch.testing.assert_close(ours[n], v, msg=n)


class TrainEval(nn.Module):
    """torchvision's test_train_eval model, with `x -= 1` so that `sub` differs from `add`."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(p=1.0)

    def forward(self, x):
        x = x.mean()
        x = self.dropout(x)
        if self.training:
            x += 100
        else:
            x *= 0
        x -= 1
        return x


def test_train_and_eval_control_flow_and_dropout_give_the_modes_nodes_and_values():
    model, x = TrainEval(), torch.ones(10, 10)
    nodes = {True: ["mean", "dropout", "add", "sub"], False: ["mean", "dropout", "mul", "sub"]}
    # Each value written by hand: in train mode dropout(p=1) zeroes, in eval it is the identity. `x += 100` and
    # `x -= 1` write in place into the tensors that dropout and add returned: each node keeps its own value.
    values = {True: {"dropout": 0.0, "add": 100.0, "sub": 99.0}, False: {"dropout": 1.0, "mul": 0.0, "sub": -1.0}}
    fx_train, fx_eval = fe.get_graph_node_names(model, suppress_diff_warning=True)
    assert (fx_train, fx_eval) == (["x", *nodes[True]], ["x", *nodes[False]])
    for start in (True, False):  # starting from either mode, as torchvision's test does
        model.train(start)
        for train in (start, not start):
            model.train(train)
            assert hookkit_nodes(model, x) == nodes[train]
            assert model.training == train
            names = list(values[train])
            _, theirs = fx_values(fx_graph(model, x), names, x)
            _, ours = hookkit_values(model, names, x)
            for n, v in values[train].items():
                assert ours[n].item() == theirs[n].item() == v, (train, n)
            other = "mul" if train else "add"  # the other mode's op: a name that never ran in this mode
            before, stack = hook_census(model), modes()
            with hookkit.capture(model, [other]) as cap:
                model(x)
            assert hook_census(model) == before and modes() == stack
            assert other not in cap
            with pytest.raises(hookkit.NotRecordedError):
                cap[other]


# -- 2. random train / eval nodes of every torchvision classifier -------------------------------------------------
# Small inputs (32x32 where the model takes it), batch 2 so that BatchNorm trains; inception_v3's auxiliary head
# (train mode only) needs its full 299 input. About 1.5 minutes for the whole file on 2 quiet cores.
_SIZE = {"alexnet": 64, "inception_v3": 96, "maxvit_t": 224, "vit_h_14": 28}
NODES_PER_MODE = 4


class _QuickInit:
    """While a classifier is built, ``Tensor.uniform_`` / ``normal_`` (what every torch.nn.init function draws with)
    copy a precomputed random block, scaled and shifted as asked, instead of drawing afresh. Each tensor keeps its
    init's range and scale; only the generator differs. Drawing was most of the build time on 2 cores (5.5 s of
    regnet_y_128gf's, 1.5 s with this), and any finite weights serve a comparison of two readings of one model."""

    _n = 1_000_003
    _gen = torch.Generator().manual_seed(0)
    _uniform = torch.rand(2 * _n, generator=_gen)
    _normal = torch.randn(2 * _n, generator=_gen)

    def __init__(self) -> None:
        self.at = 0
        self.saved = (torch.Tensor.uniform_, torch.Tensor.normal_)

    def _fill(self, t: torch.Tensor, block: torch.Tensor) -> None:
        flat, done = t.view(-1), 0
        while done < flat.numel():
            start, k = self.at % self._n, min(flat.numel() - done, self._n)
            flat[done:done + k].copy_(block[start:start + k])
            done, self.at = done + k, self.at + k

    def __enter__(self):
        uniform, normal = self.saved
        quick = self

        def uniform_(t, a=0.0, b=1.0, *, generator=None):
            if not t.is_contiguous() or not t.is_floating_point():
                return uniform(t, a, b, generator=generator)
            with torch.no_grad():
                quick._fill(t, quick._uniform)
                return t.mul_(b - a).add_(a)

        def normal_(t, mean=0.0, std=1.0, *, generator=None):
            if not t.is_contiguous() or not t.is_floating_point():
                return normal(t, mean, std, generator=generator)
            with torch.no_grad():
                quick._fill(t, quick._normal)
                return t.mul_(std).add_(mean)

        torch.Tensor.uniform_, torch.Tensor.normal_ = uniform_, normal_
        return self

    def __exit__(self, *exc) -> None:
        torch.Tensor.uniform_, torch.Tensor.normal_ = self.saved


def _build(name):
    size = _SIZE.get(name, 32)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    with _QuickInit():
        return torchvision.models.get_model(name, weights=None, **kwargs).eval(), size


def _input(name, size, train):
    if name == "inception_v3" and train:
        size = 299
    return torch.randn(2, 3, size, size)


def _candidates(g: FxGraph, model: nn.Module) -> list[FxNode]:
    """Tensor-valued nodes hookkit can see, whose hookkit name the alignment finds for sure: not at or after an
    OPAQUE or ``uses_constant`` node of their scope (there hookkit has ops FX has no node for, which may share their
    base name), and not an op whose name is also a module's (hookkit's name then means the module)."""
    modules = {p for p, _ in model.named_modules() if p}
    unsure, out = set(), []
    for n in g.nodes:
        if n.kind == OPAQUE or n.uses_constant:
            unsure.add(n.prefix)
        elif (n.kind == VISIBLE and n.tensor and n.prefix not in unsure
              and (n.node.op == "call_module" or n.name not in modules)):
            out.append(n)
    return out


@dataclass
class Case:
    model: nn.Module
    inputs: dict[bool, torch.Tensor]  # by train mode
    graphs: dict[bool, FxGraph]
    hk: dict[bool, list[str]]


_case: dict[str, Case] = {}


def classifier(name: str) -> Case:
    """Build, trace and list one classifier in both modes, once for the three checks below (which run one model
    after the other: only the latest model is kept)."""
    if name not in _case:
        _case.clear()
        model, size = _build(name)
        case = Case(model, {}, {}, {})
        for train in (True, False):
            model.train(train)
            x = case.inputs[train] = _input(name, size, train)
            case.graphs[train] = fx_graph(model, x)
            case.hk[train] = hookkit_nodes(model, x)
            assert model.training == train
        _case[name] = case
    return _case[name]


CHECKS = ["names", "extras", "values"]
KNOWN: dict[tuple[str, str], str] = {}  # (model, check) -> why it is expected to fail


def _params():
    for name in MODELS:
        for check in CHECKS:
            reason = KNOWN.get((name, check))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, check, marks=marks, id=f"{name}-{check}")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "check"), list(_params()))
def test_every_classifier_in_train_and_eval_matches_fx(name, check):
    """names: every node FX has (and hookkit can see) is a hookkit node, under FX's name in clean scopes and for
    every leaf module call.
    extras: hookkit has no node FX lacks, except the documented ones.
    values: random tensor-valued nodes (seeded by model and mode) hold FX's values, dropout draws included."""
    case = classifier(name)
    for train in (True, False):
        mode = "train" if train else "eval"
        g, hk, x = case.graphs[train], case.hk[train], case.inputs[train]
        if check == "names":
            check_names(g.nodes, hk)
        elif check == "extras":
            check_extras(g.nodes, align(g.nodes, hk))
        else:
            model = case.model.train(train)
            mapping = align(g.nodes, hk).mapping
            pool = [n for n in _candidates(g, model) if n.name in mapping]
            chosen = [n.name for n in random.Random(f"{name}/{mode}").sample(pool, min(NODES_PER_MODE, len(pool)))]
            torch.manual_seed(1)  # the same dropout / stochastic-depth draws in both runs
            fx_out, theirs = fx_values(g, chosen, x)
            torch.manual_seed(1)
            out, ours = hookkit_values(model, [mapping[n] for n in chosen], x)
            assert model.training == train
            assert _equal(out, fx_out), f"{name} ({mode}): the model's output differs from the FX graph's"
            for n in chosen:
                assert torch.equal(ours[mapping[n]], theirs[n]), f"{name} ({mode}): FX {n!r} vs hookkit {mapping[n]!r}"


def _equal(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(p, q) for p, q in zip(la, lb, strict=True))


# -- 3. gradients --------------------------------------------------------------------------------------------------
def out_of_place(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return ref


GRAD_CASES = [
    # `out += identity` (an in-place op node) and the blocks' bn2 are overwritten in place right after
    pytest.param("resnet18", "train", ["relu", "layer1.0.relu", "layer1.0.bn2", "layer1.0.add", "layer1.0.relu_1",
                                       "layer3.1.bn1", "layer3.1.add", "flatten"], id="resnet18-train"),
    pytest.param("shufflenet_v2_x0_5", "eval", ["stage2.0.cat", "stage2.0.transpose", "stage2.0.view_1",
                                                "stage3.2.cat", "stage3.2.view_1", "conv5.2", "mean"],
                 id="shufflenet_v2_x0_5-eval"),
]


@pytest.mark.parametrize(("name", "mode", "names"), GRAD_CASES)
def test_grads_of_op_and_module_nodes_equal_autograd_grad_on_an_out_of_place_copy(name, mode, names):
    model = torchvision.models.get_model(name, weights=None).train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    ref = out_of_place(model)
    g = fx_graph(ref, x)
    mapping = check_names(g.nodes, hookkit_nodes(model, x)).mapping
    fx_out, live = fx_values(g, names, x, detach=False)
    w = torch.randn_like(fx_out)
    expected = torch.autograd.grad((fx_out * w).sum(), [live[n] for n in names])

    before, stack = hook_census(model), modes()
    with hookkit.capture(model, [mapping[n] for n in names], grads=True) as cap:
        (model(x) * w).sum().backward()
    assert hook_census(model) == before and modes() == stack
    for n, e in zip(names, expected, strict=True):
        torch.testing.assert_close(cap.grads[mapping[n]], e,
                                   msg=f"{name}: FX {n!r} / hookkit {mapping[n]!r}")


# -- 4. a module run several times in one forward: each name holds FX's value, in the last forward --------------
TWICE = [
    # BasicBlock's ReLU runs twice: after bn1 ("relu"), after `out += identity` ("relu_1")
    pytest.param("resnet18", ["relu", "layer1.0.relu", "layer1.0.relu_1", "layer3.1.relu", "layer3.1.relu_1"],
                 id="resnet18"),
    # a Swin block's StochasticDepth runs twice: on the attention's output, then on the MLP's
    pytest.param("swin_t", ["features.1.0.stochastic_depth", "features.1.0.stochastic_depth_1",
                            "features.5.3.stochastic_depth", "features.5.3.stochastic_depth_1"], id="swin_t"),
]


@pytest.mark.parametrize(("name", "nodes"), TWICE)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_module_run_twice_per_forward_holds_fxs_value_under_each_name_in_the_last_forward(name, nodes, train):
    """``get_graph_node_names``'s ``"layer3.1.relu"`` is the module's first call, ``"layer3.1.relu_1"`` its second:
    ``cap[name]`` is that node's value in the block's last forward of the model, whatever ran before it."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).train(train)
    x, earlier = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    g = fx_graph(model, x)
    assert set(nodes) <= {n.name for n in g.nodes} and set(nodes) <= set(hookkit.layer_names(model, x))
    torch.manual_seed(1)  # the same stochastic-depth draws in both runs
    _, theirs = fx_values(g, nodes, x)
    before, stack = hook_census(model), modes()
    with torch.no_grad(), hookkit.capture(model, nodes) as cap:
        model(earlier)  # another forward first, in the same block
        torch.manual_seed(1)
        model(x)
    assert hook_census(model) == before and modes() == stack
    for n in nodes:
        assert torch.equal(cap[n], theirs[n]), f"{name}: hookkit {n!r} is not FX's"
    module = nodes[-2]  # a module run twice per forward, over two forwards: four calls in call order
    assert len(cap.calls(module)) == 4 and torch.equal(cap.calls(module)[2], cap[module])
    assert not torch.equal(cap[module], cap[module + "_1"])


def test_inputs_and_grads_of_a_module_run_twice_read_the_same_call_as_its_output():
    """``cap.inputs[name]``, ``cap.grads[name]`` and ``cap.grad_inputs[name]`` read the call ``cap[name]`` reads:
    in BasicBlock, ``relu``'s input is ``bn1``'s output and ``relu_1``'s is the ``add``'s, as in FX's graph."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = out_of_place(model)
    g = fx_graph(ref, x)
    names = ["layer3.1.bn1", "layer3.1.relu", "layer3.1.add", "layer3.1.relu_1"]
    fx_out, live = fx_values(g, names, x, detach=False)
    w = torch.randn_like(fx_out)
    g_bn1, g_relu, g_add, g_relu_1 = torch.autograd.grad((fx_out * w).sum(), [live[n] for n in names])
    before, stack = hook_census(ref), modes()
    with hookkit.capture(ref, ["layer3.1.relu", "layer3.1.relu_1"], inputs=True, grads=True) as cap:
        ref(torch.randn(2, 3, 64, 64))  # an earlier forward, never backpropagated
        (ref(x) * w).sum().backward()
    assert hook_census(ref) == before and modes() == stack
    torch.testing.assert_close(cap["layer3.1.relu"], live["layer3.1.relu"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(cap.inputs["layer3.1.relu"], live["layer3.1.bn1"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(cap.inputs["layer3.1.relu_1"], live["layer3.1.add"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(cap.grads["layer3.1.relu"], g_relu)
    torch.testing.assert_close(cap.grads["layer3.1.relu_1"], g_relu_1)
    torch.testing.assert_close(cap.grad_inputs["layer3.1.relu"], g_bn1)
    torch.testing.assert_close(cap.grad_inputs["layer3.1.relu_1"], g_add)


def test_a_model_in_data_parallel_counts_the_wrapped_models_forwards():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    names = ["layer3.1.relu", "layer3.1.relu_1"]
    _, theirs = fx_values(fx_graph(model, x), names, x)
    wrapped = nn.DataParallel(model)  # with no GPU, it calls the model itself
    with torch.no_grad(), hookkit.capture(wrapped, ["module.layer3.1.relu", "layer3.1.relu_1"]) as cap:
        wrapped(torch.randn(2, 3, 64, 64))
        wrapped(x)
    assert torch.equal(cap["module.layer3.1.relu"], theirs["layer3.1.relu"])
    assert torch.equal(cap["layer3.1.relu"], theirs["layer3.1.relu"])
    assert torch.equal(cap["layer3.1.relu_1"], theirs["layer3.1.relu_1"])


def test_fx_extractor_without_the_clone_returns_overwritten_values_so_the_reference_needs_it():
    """The reason for the clone: torchvision's extractor returns `layer1.0.bn1`'s tensor itself, which the
    ReLU(inplace=True) after it overwrites (when the ReLU is needed, here for a second returned node); hookkit's
    default capture keeps the value bn1 produced."""
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        by_reference = fe.create_feature_extractor(model, ["layer1.0.bn1", "layer1.0.relu"])(x)["layer1.0.bn1"]
        _, cloned = fx_values(fx_graph(model, x), ["layer1.0.bn1"], x)
        block = model.layer1[0]
        bn1 = block.bn1(block.conv1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    assert (by_reference >= 0).all() and not torch.equal(by_reference, cloned["layer1.0.bn1"])
    torch.testing.assert_close(cloned["layer1.0.bn1"], bn1)
    _, ours = hookkit_values(model, ["layer1.0.bn1"], x)
    assert torch.equal(ours["layer1.0.bn1"], cloned["layer1.0.bn1"])


@pytest.fixture(autouse=True, scope="module")
def _drop_the_last_classifier():
    yield
    _case.clear()
