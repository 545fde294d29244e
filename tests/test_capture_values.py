"""Same numbers as torch: every stored value equals what the module returned at that moment."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import hookkit
from hookkit.core.tree import map_leaves

from _optional import needs_torchvision, torchvision
from conftest import NestedOutputs, Out, Pair, SharedReLU, hook_census


def raw_reference(model: nn.Module, names: list[str], run):
    """What a careful user gets by hand: raw forward hooks that clone every tensor at hook time."""
    got: dict[str, list] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: got[n].append(map_leaves(lambda t: t.detach().clone(), o))
        )
        for n in names
    ]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return got, result


def assert_same(a, b):
    """Equal structure (types, keys, None) and bitwise-equal tensors."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    else:
        assert a == b


@needs_torchvision
def test_resnet_layers_equal_raw_hook_clones():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    names = ["conv1", "layer1", "layer2.0.conv1", "layer4", "avgpool", "fc"]
    with hookkit.capture(model, names) as cap:
        ref, out = raw_reference(model, names, lambda: model(x))
    assert list(cap) == names
    for n in names:
        assert_same(cap[n], ref[n][-1])
        assert cap[n].grad_fn is None and not cap[n].requires_grad
    torch.testing.assert_close(cap["fc"], out, rtol=0, atol=0)


def test_reused_module_keeps_every_call_in_order():
    model = SharedReLU()
    x = torch.randn(3, 6)
    with hookkit.capture(model, ["relu", "fc1"]) as cap:
        ref, _ = raw_reference(model, ["relu"], lambda: model(x))
    assert len(cap.calls("relu")) == 3
    for mine, theirs in zip(cap.calls("relu"), ref["relu"], strict=True):
        assert_same(mine, theirs)
    assert_same(cap["relu"], ref["relu"][0])  # [] is the call FX names "relu": the first in the (last) forward
    assert list(cap) == ["fc1", "relu"]  # order of first call: fc1 runs before the first relu


def test_calls_accumulate_over_several_forwards():
    model = nn.Sequential(nn.Linear(3, 3))
    xs = [torch.randn(1, 3) for _ in range(4)]
    with hookkit.capture(model, "0") as cap:
        outs = [model(x) for x in xs]
    assert len(cap.calls("0")) == 4
    for mine, out in zip(cap.calls("0"), outs, strict=True):
        torch.testing.assert_close(mine, out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("layer", ["tup", "named", "dict", "dc"])
def test_nested_outputs_keep_their_structure(layer):
    model = NestedOutputs()
    x = torch.randn(2, 4)
    with hookkit.capture(model, [layer]) as cap:
        ref, _ = raw_reference(model, [layer], lambda: model(x))
    assert_same(cap[layer], ref[layer][0])


def test_nested_outputs_get_every_option_all_the_way_down():
    model = NestedOutputs()
    x = torch.randn(2, 4, requires_grad=True)
    with hookkit.capture(model, ["tup", "named", "dict", "dc"], to=torch.float16, clone=True) as cap:
        model(x)
    assert cap["tup"][1] is None
    assert isinstance(cap["named"], Pair)
    assert cap["dict"]["name"] == "static"
    assert isinstance(cap["dc"], Out)
    tensors = [cap["tup"][0], cap["named"].second, cap["dict"]["nested"][1][0], cap["dc"].extra["z"]]
    for t in tensors:
        assert t.dtype == torch.float16
        assert not t.requires_grad and t.grad_fn is None


def test_detach_false_keeps_the_graph_only_when_asked():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    x = torch.randn(2, 3)
    with hookkit.capture(model, ["0"], detach=False) as keep, hookkit.capture(model, ["0"]) as drop:
        y = model(x)
    assert keep["0"].grad_fn is not None
    assert drop["0"].grad_fn is None
    (g,) = torch.autograd.grad(y.sum(), keep["0"])
    assert g.shape == (2, 3)


def test_to_casts_floats_only_and_moves():
    class Mixed(nn.Module):
        def forward(self, x):
            return x * 2, x.argmax(-1)

    model = nn.Sequential(Mixed())
    with hookkit.capture(model, "0", to=("cpu", torch.bfloat16)) as cap:
        model(torch.randn(2, 5))
    floats, ints = cap["0"]
    assert floats.dtype == torch.bfloat16
    assert ints.dtype == torch.int64


def test_bad_to_is_refused_before_hooking():
    model = nn.Sequential(nn.Linear(2, 2))
    before = hook_census(model)
    with pytest.raises(TypeError, match="to="):
        hookkit.capture(model, "0", to=3)
    with pytest.raises(ValueError, match="not a device"):
        hookkit.capture(model, "0", to="gpu-please")
    assert hook_census(model) == before


# -- in-place ops after the hooked module ------------------------------------------------------------------------

@needs_torchvision
def test_inplace_relu_after_capture_keeps_the_value_by_copy_on_write():
    """ResNet's bn1 is followed by ReLU(inplace=True): without copy-on-write the stored tensor would hold
    relu(bn1). The default capture copies it just before the ReLU writes, and only then."""
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with hookkit.capture(model, ["bn1"]) as cap:
        ref, _ = raw_reference(model, ["bn1"], lambda: model(x))
    assert ref["bn1"][0].min() < 0  # the true value has negatives that the in-place ReLU erased
    assert_same(cap["bn1"], ref["bn1"][0])
    assert_same(cap.calls("bn1")[0], ref["bn1"][0])
    assert cap.copies == 1
    with hookkit.capture(model, ["conv1"]) as untouched:  # conv1's output is never written in place
        model(x)
    assert untouched.copies == 0


@needs_torchvision
def test_inplace_relu_after_capture_with_clone_keeps_the_snapshot():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with hookkit.capture(model, ["bn1", "layer1.0.bn2"], clone=True) as cap:
        ref, _ = raw_reference(model, ["bn1", "layer1.0.bn2"], lambda: model(x))
    assert_same(cap["bn1"], ref["bn1"][0])
    assert_same(cap["layer1.0.bn2"], ref["layer1.0.bn2"][0])  # followed by `out += identity`


@needs_torchvision
def test_vgg11_features_3_is_the_conv_output_unlike_the_fx_extractor():
    """torchvision's create_feature_extractor returns features.3 after the in-place ReLU features.4."""
    model = torchvision.models.vgg11().eval()
    x = torch.randn(1, 3, 64, 64)
    with hookkit.capture(model, ["features.3"], clone=True) as cap:
        ref, _ = raw_reference(model, ["features.3"], lambda: model(x))
    truth = ref["features.3"][0]
    assert truth.min() < 0, "the test needs negative conv outputs for the in-place ReLU to matter"
    assert_same(cap["features.3"], truth)
    with hookkit.capture(model, ["features.3"]) as lazy:  # the default: copied before features.4 writes
        model(x)
    assert_same(lazy["features.3"], truth)
    assert lazy.copies == 1
    # Asked for features.3 and the logits, the FX extractor hands back features.3 after the in-place ReLU
    # features.4 ran over it (min 0); hookkit has the value the conv produced.
    with hookkit.capture(model, ["features.3", "classifier.6"], clone=True) as both:
        model(x)
    assert_same(both["features.3"], truth)
    from torchvision.models.feature_extraction import create_feature_extractor

    fx = create_feature_extractor(model, ["features.3", "classifier.6"])(x)["features.3"]
    assert fx.min() == 0 and not torch.equal(fx, truth)


def test_inference_mode_tensors_are_copied_since_they_keep_no_version():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    x = torch.randn(3, 4)
    with torch.inference_mode(), hookkit.capture(model, "0") as cap:
        ref, _ = raw_reference(model, ["0"], lambda: model(x))
    assert_same(cap["0"], ref["0"][0])
    assert ref["0"][0].min() < 0


def test_inputs_and_kwargs_are_recorded_before_the_module_runs():
    class Takes(nn.Module):
        def forward(self, a, b, *, scale=1.0, mask=None):
            return (a + b) * scale * mask

    model = nn.Sequential()
    model.add_module("inner", Takes())
    a, b, mask = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Takes()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, a, b, mask):
            return self.relu(self.inner(a, b, scale=2.0, mask=mask))

    w = Wrap()
    with hookkit.capture(w, ["inner", "relu"], inputs=True) as cap:
        w(a, b, mask)
    ins = cap.inputs["inner"]
    assert isinstance(ins, tuple) and len(ins) == 2
    assert_same(ins[0], a)
    assert cap.kwargs["inner"]["scale"] == 2.0
    assert_same(cap.kwargs["inner"]["mask"], mask)
    # relu modifies its input in place: the stored input was copied just before, so it is what relu received.
    assert_same(cap.inputs["relu"], (a + b) * 2.0 * mask)
    assert cap.copies >= 1
    with hookkit.capture(w, ["relu"], inputs=True, clone=True) as cap2:
        w(a, b, mask)
    assert_same(cap2.inputs["relu"], (a + b) * 2.0 * mask)
    assert cap2.kwargs["relu"] == {}


def test_shared_module_answers_under_each_name():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert hookkit.layer_names(model) == ["0", "1", "2"]
    x = torch.randn(1, 3)
    with hookkit.capture(model, ["0", "2"]) as cap:
        model(x)
    assert len(cap.calls("0")) == 2 and len(cap.calls("2")) == 2
    assert_same(cap["0"], cap["2"])


@needs_torchvision
def test_selection_by_glob_class_module_and_predicate():
    model = torchvision.models.resnet18()
    names = hookkit.layer_names(model)
    by_glob = hookkit.capture(model, "layer*.0.conv1")
    assert by_glob.selected == [f"layer{i}.0.conv1" for i in range(1, 5)]
    by_double = hookkit.capture(model, "layer1.**.conv1")
    assert by_double.selected == ["layer1.0.conv1", "layer1.1.conv1"]
    by_class = hookkit.capture(model, nn.BatchNorm2d)
    expected = [n for n in names if isinstance(model.get_submodule(n), nn.BatchNorm2d)]
    assert by_class.selected == expected
    by_module = hookkit.capture(model, model.layer2)
    assert by_module.selected == ["layer2"]
    by_pred = hookkit.capture(model, lambda name, m: name.endswith("downsample.0"))
    assert by_pred.selected == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]


@needs_torchvision
def test_stop_ends_the_forward_after_the_last_selected_layer():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    ran = []
    h = model.layer3.register_forward_hook(lambda *a: ran.append("layer3"))
    try:
        before = hook_census(model)
        after_call = []
        with hookkit.capture(model, ["conv1", "layer2"], stop=True) as cap:
            model(x)
            after_call.append("not reached")
        assert hook_census(model) == before
    finally:
        h.remove()
    assert ran == [] and after_call == []
    full, _ = raw_reference(model, ["layer2"], lambda: model(x))
    assert_same(cap["layer2"], full["layer2"][0])


def test_other_exceptions_are_not_swallowed_by_stop():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ZeroDivisionError), hookkit.capture(model, "0", stop=True):
        1 / 0  # noqa: B018  (the exception is the point)


def test_nested_stop_belongs_to_the_capture_that_raised_it():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    x = torch.randn(1, 2)
    reached = []
    with hookkit.capture(model, "2") as outer:
        with hookkit.capture(model, "0", stop=True) as inner:
            model(x)
        reached.append("after inner")
        model(x)
    assert reached == ["after inner"]
    assert len(inner.calls("0")) == 1
    assert len(outer.calls("2")) == 1  # the first forward was cut short before layer 2


def test_stores_outlive_the_block_and_hold_no_model():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(3, 3))
    refs = [weakref.ref(model), weakref.ref(model[0])]
    with hookkit.capture(model, "0", inputs=True, grads=True) as cap:
        model(torch.randn(1, 3))
    del model
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert cap["0"].shape == (1, 3)


def test_a_module_run_several_times_per_forward_reads_its_first_call_in_the_last_forward():
    """``relu`` runs three times per forward: ``cap["relu"]`` is its first call in the last forward (the node
    ``get_graph_node_names`` calls ``"relu"``), ``"relu_1"`` and ``"relu_2"`` the others, whatever ran before."""
    model = SharedReLU()
    x1, x2 = torch.randn(3, 6), torch.randn(3, 6)
    assert {"relu", "relu_1", "relu_2"} <= set(hookkit.layer_names(model, x2))
    before, stack = hook_census(model), torch._C._len_torch_function_stack()
    with hookkit.capture(model, ["relu", "relu_1", "relu_2"], inputs=True) as cap:
        ref, _ = raw_reference(model, ["relu"], lambda: (model(x1), model(x2)))
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == stack
    calls = ref["relu"]  # six raw calls: three per forward
    assert len(cap.calls("relu")) == 6 and len(cap.calls("relu_1")) == 2
    for k, name in enumerate(["relu", "relu_1", "relu_2"]):
        assert_same(cap[name], calls[3 + k])
        assert_same(cap.inputs[name], cap.inputs.calls("relu")[3 + k])  # the same call as the output
    assert_same(cap["relu_1"], cap.calls("relu_1")[-1])


def test_a_module_called_directly_outside_the_models_forward_is_a_forward_of_its_own():
    """The forwards are the model's (the one given to capture): a submodule called on its own, after, is the last."""
    model = SharedReLU()
    x, z = torch.randn(3, 6), torch.randn(2, 6)
    before = hook_census(model)
    with hookkit.capture(model, ["relu"]) as cap:
        model(x)
        direct = model.relu(z)
    assert hook_census(model) == before
    assert len(cap.calls("relu")) == 4
    assert_same(cap["relu"], direct)


def test_a_model_that_calls_itself_is_one_forward():
    """A forward is the outermost call of the model: an inner call of the model by itself belongs to it."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x, again=True):
            y = self.relu(x)
            return self(-y - 1, again=False) if again else y

    model = Twice()
    x = torch.randn(3, 4)
    before = hook_census(model)
    with hookkit.capture(model, ["relu"]) as cap:
        model(x)
    assert hook_census(model) == before
    assert len(cap.calls("relu")) == 2
    assert_same(cap["relu"], torch.relu(x))  # the first call of the one forward, not the inner call's
