"""One reading of a layer argument, through every public function that takes one: the same spec selects the same
layers everywhere, op and repeated-call nodes (FX's names) work wherever the function can act on them, and
``layers=None`` means one thing (every submodule for the functions that only look, an error for the others)."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

import hookkit

from _optional import needs_torchvision, torchvision


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc(x)) + x  # "block.add"
        return self.relu(h)  # the second call of block.relu: "block.relu_1"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.block(x) * 2))  # "mul", "relu"


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(5, 4)
LINEARS = {"block.fc", "fc"}
NODES = ["block.add", "block.relu_1", "mul", "relu"]
EVERY_SUBMODULE = {"block", "block.fc", "block.relu", "fc"}


def _quiet() -> Console:
    return Console(file=io.StringIO(), color_system=None, width=200)


def _specs(model: Net) -> dict[str, object]:
    """Five ways of naming the two Linear layers."""
    return {
        "class": nn.Linear,
        "module objects": [model.block.fc, model.fc],
        "predicate": lambda name, module: isinstance(module, nn.Linear),
        "glob": "**fc",
        "list of names": ["block.fc", "fc"],
    }


# -- what each public function selected, read through its own output -------------------------------------------------

def _captured(model, layers):
    with hookkit.capture(model, layers) as cap:
        model(X)
    return set(cap)


def _extracted(model, layers):
    return set(hookkit.extract(model, layers, [X], progress=False))


def _traced(model, layers):
    with hookkit.trace(model, layers, console=_quiet(), backward=False) as t:
        model(X)
    return {e.name for e in t.events}


def _monitored(model, layers):
    with hookkit.monitor(model, layers, every=1, summary=False) as mon:
        model(X).sum().backward()
        mon.step()
    return set(mon.records[0]["layers"])


def _summarised(model, layers):
    return {r.layer for r in hookkit.summary(model, X, layers=layers, timing=False).rows}


def _hooked(model, layers):
    names = {id(m): n for n, m in model.named_modules()}
    seen = set()
    with hookkit.hooks(model, forward={layers if not isinstance(layers, list) else tuple(layers):
                                       lambda m, a, o: seen.add(names[id(m)])}):
        model(X)
    return seen


FUNCTIONS = {"capture": _captured, "extract": _extracted, "trace": _traced, "monitor": _monitored,
             "summary": _summarised, "hooks": _hooked}


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("kind", list(_specs(Net())))
def test_a_class_module_objects_a_predicate_a_glob_and_a_list_select_the_same_layers(function, kind):
    model = net()
    assert FUNCTIONS[function](model, _specs(model)[kind]) == LINEARS


# -- op and repeated-call nodes ----------------------------------------------------------------------------------------

def _capture_values(model, batches=(X,)):
    """Each node's value in capture, batch after batch, joined on the batch dim."""
    values = []
    for batch in batches:
        with torch.no_grad(), hookkit.capture(model, NODES) as cap:
            model(batch)
        values.append({n: cap[n] for n in NODES})
    return {n: torch.cat([v[n] for v in values]) for n in NODES}


def test_op_and_repeated_call_nodes_in_extract_equal_captures_values():
    model = net()
    assert hookkit.layer_names(model, X) == ["block", "block.fc", "block.relu", "block.add", "block.relu_1", "mul",
                                             "relu", "fc"]
    batches = [X[:2], X[2:]]
    expected = _capture_values(model, batches)
    feats = hookkit.extract(model, NODES, batches, progress=False)
    assert set(feats) == set(NODES)
    for name in NODES:
        assert torch.equal(torch.from_numpy(feats[name]), expected[name]), name


def test_op_and_repeated_call_nodes_in_monitor_get_captures_statistics_and_no_parameter_statistics():
    model = net()
    expected = _capture_values(model)
    with hookkit.monitor(model, NODES, every=1, summary=False) as mon:
        model(X).sum().backward()
        mon.step()
    record = mon.records[0]
    assert set(record["layers"]) == set(NODES)
    assert record["params"] == {}  # an op owns no parameter
    for name in NODES:
        stats, value = record["layers"][name], expected[name].double()
        assert torch.equal(torch.tensor(stats["act_absmax"]), value.abs().max()), name
        assert stats["act_mean"] == pytest.approx(value.mean().item(), abs=1e-12), name
        assert stats["zero_frac"] == pytest.approx((value == 0).double().mean().item()), name
        assert stats["grad_norm"] is not None and stats["grad_norm"] > 0, name


@needs_torchvision
def test_an_op_that_an_inplace_relu_overwrites_is_extracted_and_monitored_as_it_was_made():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    names = ["layer1.0.add", "layer1.0.relu_1", "flatten"]
    with torch.no_grad(), hookkit.capture(model, names) as cap:
        model(x)
    assert cap["layer1.0.add"].min() < 0  # before the block's ReLU(inplace=True) ran over it
    feats = hookkit.extract(model, names, [x], progress=False)
    with hookkit.monitor(model, names, every=1, summary=False) as mon:
        model(x).sum().backward()
        mon.step()
    for name in names:
        assert torch.equal(torch.from_numpy(feats[name]), cap[name]), name
        assert mon.records[0]["layers"][name]["act_absmax"] == cap[name].double().abs().max().item(), name


def test_a_repeated_call_name_works_in_trace_check_finite_hooks_and_sweep():
    model = net()
    expected = _capture_values(model)
    assert _traced(model, ["block.relu_1"]) == {"block.relu_1"}
    with hookkit.check_finite(model, ["block.relu_1"]):
        model(X)
    got = []
    with torch.no_grad(), hookkit.hooks(model, forward={"block.relu_1": lambda m, a, o: got.append(o)}):
        model(X)
    assert len(got) == 1 and torch.equal(got[0], expected["block.relu_1"])
    sweep = hookkit.patching_sweep(model, X, -X, ["block.relu_1", "block.add"], lambda out: out.sum())
    assert sweep.layers == ["block.relu_1", "block.add"]


def test_the_second_call_of_a_module_is_named_as_fx_names_it_in_trace_and_summary():
    model = net()
    out = _quiet()
    with hookkit.trace(model, ["block.relu"], console=out, backward=False, inputs=False, stats=False):
        model(X)
    text = out.file.getvalue()
    assert "block.relu_1 " in text and "#" not in text and "call 1" not in text
    rows = hookkit.summary(model, X, timing=False).rows
    assert [r.name for r in rows if r.layer == "block.relu"] == ["block.relu", "block.relu_1"]


def test_summary_refuses_op_nodes_saying_why():
    model = net()
    for node in ["block.add", "block.relu_1"]:
        with pytest.raises(hookkit.ArgumentError, match=rf"hookkit.summary: '{node}' is an op or repeated-call "
                                                        "node, and summary's table has one row per module call"):
            hookkit.summary(model, X, layers=[node])


# -- layers=None -------------------------------------------------------------------------------------------------------

def test_layers_none_is_every_submodule_in_the_functions_that_only_look():
    model = net()
    assert _traced(model, None) == EVERY_SUBMODULE
    assert _monitored(model, None) == EVERY_SUBMODULE  # not only the direct children, and no op
    assert _summarised(model, None) == EVERY_SUBMODULE
    with hookkit.check_finite(model, None):
        census = hookkit.hook_census(model)
        model(X)
    hooked = {key.removesuffix("._forward_hooks") for key, hooks in census.items()
              if key.endswith("._forward_hooks") and hooks}
    assert hooked - {"<root>"} == EVERY_SUBMODULE  # (the root's hooks count the model's forwards)


def test_layers_none_sees_through_a_wrapper_and_takes_a_bare_module_itself():
    model = net()
    wrapped = nn.DataParallel(model)  # on CPU it calls the model itself
    assert _monitored(wrapped, None) == EVERY_SUBMODULE
    assert _traced(wrapped, None) == EVERY_SUBMODULE
    bare = nn.Linear(4, 2)
    assert _traced(bare, None) == {""}
    with hookkit.monitor(bare, every=1, summary=False) as mon:
        bare(X).sum().backward()
        mon.step()
    assert set(mon.records[0]["layers"]) == {""} and set(mon.records[0]["params"]) == {"weight", "bias"}


@pytest.mark.parametrize("call", [
    lambda m: hookkit.capture(m, None),
    lambda m: hookkit.extract(m, None, [X], progress=False),
    lambda m: hookkit.hooks(m, forward={None: lambda *a: None}),
    lambda m: hookkit.edits(m, {None: hookkit.ablate()}),
    lambda m: hookkit.patching_sweep(m, X, -X, None, lambda out: out.sum()),
], ids=["capture", "extract", "hooks", "edits", "patching_sweep"])
def test_layers_none_is_an_error_naming_layer_names_where_values_are_kept_or_changed(call):
    model = net()
    before = hookkit.hook_census(model)
    with pytest.raises(hookkit.ArgumentError, match=r"is None, but hookkit\.\w+ keeps or changes values per layer.*"
                                                    r"hookkit\.layer_names\(model\)"):
        call(model)
    assert hookkit.hook_census(model) == before


# -- errors ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_a_spec_that_matches_nothing_is_the_same_error_everywhere(function):
    model = net()
    with pytest.raises(hookkit.LayerNotFoundError, match="no module of class torch.nn.modules.conv.Conv2d in Net"):
        FUNCTIONS[function](model, nn.Conv2d)
    with pytest.raises(hookkit.LayerNotFoundError, match=r"no layer 'blok.fc' in Net\. Did you mean 'block.fc'"):
        FUNCTIONS[function](model, ["blok.fc"])
