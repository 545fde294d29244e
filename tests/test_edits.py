"""hookkit.patch / add / ablate and hookkit.edits(): each edit against the same edit written as a raw torch hook
(whole-model outputs and gradients through the edited layer), activation patching from a capture, and the errors
(an edit that never applied, a shape that does not fit, bad arguments), with the hook census clean on every path.

GPT-2 and BERT are built from small local configs with random weights (nothing is downloaded) and skip without
transformers; the CNN cases skip without torchvision.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn

import hookkit

from _optional import importorskip_torchvision
from conftest import hook_census

POS = (slice(None), 3)  # token position 3 of a [B, T, D] output


# -- models ---------------------------------------------------------------------------------------------------------
def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return model, {"input_ids": torch.randint(0, 50, (2, 6))}, lambda out: out.logits


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    return model, {"input_ids": torch.randint(0, 100, (2, 7))}, lambda out: out.last_hidden_state


def _resnet():
    model = importorskip_torchvision().models.resnet18(weights=None).eval()
    return model, {"x": torch.randn(2, 3, 32, 32, requires_grad=True)}, lambda out: out


@dataclasses.dataclass
class Site:
    """A layer to edit: the model, its inputs, the tensor to compare, the layer, the index, the shape of an added
    vector, and how to hook the same place with raw torch hooks."""

    build: Callable[[], tuple[nn.Module, dict, Callable[[Any], torch.Tensor]]]
    layer: str
    index: Any
    vector_shape: tuple[int, ...]
    raw: Callable[[nn.Module, Callable[[torch.Tensor], torch.Tensor]], list] | None = None


def raw_forward_hook(layer: str):
    """``edit_tensor`` as a raw torch forward hook on module ``layer``: the tensor output, or a tuple's first."""
    def register(model, edit_tensor):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (edit_tensor(output[0]), *output[1:])
            return edit_tensor(output)
        return [model.get_submodule(layer).register_forward_hook(hook)]
    return register


def raw_add_node(model, edit_tensor):
    """resnet18's ``layer1.0.add`` (``out += identity``) by raw torch hooks: its result is the input of the second
    call of ``layer1.0.relu``, which a forward-pre hook replaces."""
    calls = []

    def pre(module, args):
        calls.append(1)
        if len(calls) == 2:
            return (edit_tensor(args[0]),)
        return None

    return [model.get_submodule("layer1.0.relu").register_forward_pre_hook(pre)]


SITES = {
    "gpt2 block": Site(_gpt2, "transformer.h.1", POS, (16,)),
    "gpt2 attn (tuple)": Site(_gpt2, "transformer.h.1.attn", POS, (16,)),
    "bert layer": Site(_bert, "encoder.layer.0", POS, (32,)),
    "bert attention (tuple)": Site(_bert, "encoder.layer.0.attention", POS, (32,)),
    "resnet layer2 channels": Site(_resnet, "layer2", (slice(None), slice(8, 16)), (8, 1, 1)),
    "resnet op node": Site(_resnet, "layer1.0.add", (slice(None), slice(0, 16)), (16, 1, 1), raw_add_node),
}
for _site in SITES.values():
    _site.raw = _site.raw or raw_forward_hook(_site.layer)


# The same edits, as hookkit edits and as a function of the edited tensor for a raw hook.
def _edits_for(site: Site, region: torch.Tensor):
    index = site.index
    value = torch.randn(region.shape)
    vector = torch.randn(site.vector_shape)
    mean = torch.randn(site.vector_shape)

    def written(fn):
        def edit_tensor(t):
            new = t.clone()
            new[index] = fn(t[index])
            return new
        return edit_tensor

    return {
        "patch": (hookkit.patch(value, index=index), written(lambda r: value)),
        "add": (hookkit.add(vector, scale=3.0, index=index), written(lambda r: r + 3.0 * vector)),
        "zero": (hookkit.ablate(index=index), written(lambda r: torch.zeros_like(r))),
        "mean": (hookkit.ablate("mean", over=0, index=index), written(lambda r: r.mean(0, keepdim=True).expand_as(r))),
        "given mean": (hookkit.ablate("mean", mean=mean, index=index), written(lambda r: mean.expand_as(r))),
    }


def _run(model, inputs, pick, *, grads: bool = True):
    """The compared output, and gradients of a loss on it w.r.t. the image and first conv (CNN) or the token
    embeddings (HF): each reaches them through the edited layer."""
    out = pick(model(**inputs))
    if not grads:
        return out.detach(), []
    wrt = [inputs["x"], model.conv1.weight] if "x" in inputs else [model.get_input_embeddings().weight]
    return out.detach(), list(torch.autograd.grad(out.pow(2).sum(), wrt))


@pytest.fixture(scope="module", params=list(SITES))
def site(request):
    s = SITES[request.param]
    torch.manual_seed(0)
    model, inputs, pick = s.build()
    model.requires_grad_(True)
    return s, model, inputs, pick


@pytest.mark.parametrize("kind", ["patch", "add", "zero", "mean", "given mean"])
def test_each_edit_equals_the_same_edit_as_a_raw_torch_hook(site, kind):
    s, model, inputs, pick = site
    with torch.no_grad(), hookkit.capture(model, [s.layer]) as cap:
        model(**inputs)
    plain = cap[s.layer]
    region = (plain[0] if isinstance(plain, tuple) else plain)[s.index]
    edit, edit_tensor = _edits_for(s, region)[kind]

    base, _ = _run(model, inputs, pick, grads=False)
    before = hook_census(model)
    with hookkit.edits(model, {s.layer: edit}) as ed:
        got, got_grads = _run(model, inputs, pick)
    assert hook_census(model) == before
    assert ed.applied == {s.layer: 1}

    handles = s.raw(model, edit_tensor)
    try:
        expected, expected_grads = _run(model, inputs, pick)
    finally:
        for h in handles:
            h.remove()
    assert hook_census(model) == before
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert not torch.allclose(got, base, atol=1e-5)  # the edit did reach the model's output

    # The same edit object given to hooks() (its other form) edits the same way.
    with hookkit.hooks(model, forward={s.layer: edit}):
        again, _ = _run(model, inputs, pick, grads=False)
    torch.testing.assert_close(again, expected)
    assert hook_census(model) == before


# -- activation patching from a capture -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model, _, _ = _gpt2()
    return model


@pytest.mark.parametrize("layer, out", [("transformer.h.1", 0), ("transformer.h.1.attn", 0)])
def test_patch_from_a_clean_capture_equals_the_raw_hook_patch(gpt2, layer, out):
    clean, corrupt = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))
    with torch.no_grad(), hookkit.capture(gpt2, [layer]) as cap:
        gpt2(input_ids=clean)
    with torch.no_grad():
        base = gpt2(input_ids=corrupt).logits
    before = hook_census(gpt2)
    with torch.no_grad(), hookkit.edits(gpt2, {layer: hookkit.patch(cap, index=POS, out=out)}) as ed:
        got = gpt2(input_ids=corrupt).logits
    assert ed.applied == {layer: 1} and hook_census(gpt2) == before

    stored = cap[layer][0] if isinstance(cap[layer], tuple) else cap[layer]
    (handle,) = raw_forward_hook(layer)(gpt2, lambda t: _written(t, POS, stored[POS]))
    try:
        with torch.no_grad():
            expected = gpt2(input_ids=corrupt).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base, atol=1e-5)
    # positions before 3 are untouched (causal attention): patching position 3 changes only positions 3 and later
    torch.testing.assert_close(got[:, :3], base[:, :3])


def _written(t: torch.Tensor, index: Any, value: torch.Tensor) -> torch.Tensor:
    new = t.clone()
    new[index] = value
    return new


def test_patch_from_a_capture_of_the_same_input_changes_nothing(gpt2):
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad(), hookkit.capture(gpt2, ["transformer.h.1", "transformer.h.0.attn"]) as cap:
        base = gpt2(input_ids=ids).logits
    spec = {"transformer.h.1": hookkit.patch(cap, index=POS), "transformer.h.0.attn": hookkit.patch(cap)}
    with torch.no_grad(), hookkit.edits(gpt2, spec) as ed:
        got = gpt2(input_ids=ids).logits
    assert ed.applied == {"transformer.h.1": 1, "transformer.h.0.attn": 1}
    torch.testing.assert_close(got, base, rtol=0, atol=0)


class Twice(nn.Module):
    """One module called twice per forward (call 0, call 1), as a reused block or a generate() step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_patch_from_a_capture_takes_call_i_from_call_i():
    model = Twice()
    clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad(), hookkit.capture(model, ["lin"]) as cap:
        model(clean)
    first, second = cap.calls("lin")
    with torch.no_grad(), hookkit.edits(model, {"lin": hookkit.patch(cap, index=(slice(None), 1))}) as ed:
        got = model(corrupt)
    assert ed.applied == {"lin": 2}
    calls = []

    def raw(module, args, output):
        calls.append(1)
        return _written(output, (slice(None), 1), (first, second)[len(calls) - 1][:, 1])

    handle = model.lin.register_forward_hook(raw)
    with torch.no_grad():
        expected = model(corrupt)
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # call=1 takes call 1 of the capture, and edits that call only
    with torch.no_grad(), hookkit.edits(model, {"lin": hookkit.patch(cap, call=1)}) as ed:
        torch.testing.assert_close(model(corrupt), second, rtol=0, atol=0)
    assert ed.applied == {"lin": 1}


def test_patch_from_a_capture_without_the_layer_or_the_call_raises():
    model = Twice()
    with torch.no_grad(), hookkit.capture(model, ["unused"]) as other:
        model(torch.randn(1, 4))
    before = hook_census(model)
    with pytest.raises(hookkit.EditError, match=r"'lin'.*hookkit.capture\(model, \['lin'\]\)"):
        with hookkit.edits(model, {"lin": hookkit.patch(other)}):
            model(torch.randn(1, 4))
    assert hook_census(model) == before
    with torch.no_grad(), hookkit.capture(model, ["lin"], stop=True) as one:  # stop: only call 0 recorded
        model(torch.randn(1, 4))
    with pytest.raises(hookkit.EditError, match=r"holds 1 call\(s\) of 'lin', and this is its calls\('lin'\)\[1\]"):
        with hookkit.edits(model, {"lin": hookkit.patch(one)}):
            model(torch.randn(1, 4))
    assert hook_census(model) == before


# -- calls, outputs, autograd ---------------------------------------------------------------------------------------
def test_call_k_edits_only_the_kth_call_and_none_edits_every_call():
    model = Twice()
    x = torch.randn(2, 4)
    seen: list[torch.Tensor] = []
    handle = model.lin.register_forward_hook(lambda m, a, o: seen.append(o))  # before the edit: the layer's own
    # capture registered after the edit: it records the edited outputs
    with torch.no_grad(), hookkit.edits(model, {"lin": hookkit.ablate(call=1)}) as ed, hookkit.capture(
            model, ["lin"]) as after:
        model(x)
    handle.remove()
    assert ed.applied == {"lin": 1}
    first, second = after.calls("lin")
    assert torch.count_nonzero(first) > 0 and torch.count_nonzero(second) == 0
    with torch.no_grad(), hookkit.edits(model, {"lin": hookkit.ablate()}) as ed:
        model(x)
    assert ed.applied == {"lin": 2}
    # never in place: the layer's own output tensors keep their values
    assert all(torch.count_nonzero(t) > 0 for t in seen)


class Structured(nn.Module):
    """Outputs of every structure an edit looks into."""

    Pair = collections.namedtuple("Pair", ["hidden", "attn"])

    @dataclasses.dataclass
    class Out:
        hidden: torch.Tensor
        extra: torch.Tensor

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        y = x * 2
        if self.kind == "tuple":
            return (x, y, None)
        if self.kind == "list":
            return [x, y]
        if self.kind == "namedtuple":
            return self.Pair(x, y)
        if self.kind == "dict":
            return {"hidden": x, "attn": y}
        if self.kind == "ordered":
            return collections.OrderedDict(hidden=x, attn=y)
        return self.Out(x, y)


@pytest.mark.parametrize("kind, out", [("tuple", 1), ("tuple", -2), ("list", 1), ("namedtuple", "attn"),
                                       ("namedtuple", 1), ("dict", "attn"), ("dict", 1), ("ordered", "attn"),
                                       ("dataclass", "extra")])
def test_out_picks_one_tensor_and_keeps_the_structure(kind, out):
    model = nn.Sequential(Structured(kind))
    x = torch.ones(2, 3)
    with hookkit.edits(model, {"0": hookkit.add(torch.tensor([1.0, 2.0, 3.0]), out=out)}):
        got = model(x)
    plain = model(x)
    assert type(got) is type(plain)
    parts = (list(got.values()) if isinstance(got, dict) else list(got) if isinstance(got, (tuple, list))
             else [got.hidden, got.extra])
    assert parts[0] is x  # the other parts are the very objects the layer returned
    torch.testing.assert_close(parts[1], 2 * x + torch.tensor([1.0, 2.0, 3.0]))
    if kind == "tuple":
        assert got[2] is None


def test_out_by_key_on_a_hugging_face_model_output():
    torch.manual_seed(0)
    model, inputs, _ = _bert()
    with torch.no_grad():
        base = model(**inputs)
    with torch.no_grad(), hookkit.edits(model, {"encoder": hookkit.ablate(out="last_hidden_state")}):
        got = model(**inputs)
    assert torch.count_nonzero(got.last_hidden_state) == 0
    assert not torch.allclose(got.pooler_output, base.pooler_output)  # the pooler saw the edited ModelOutput


def test_a_gradient_flows_through_a_patched_region_as_through_the_raw_hook():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh())
    x = torch.randn(3, 4)
    value = torch.randn(4, requires_grad=True)
    with hookkit.edits(model, {"0": hookkit.patch(value, index=1)}):
        gw, gv = torch.autograd.grad(model(x).sum(), [lin.weight, value])
    handle = lin.register_forward_hook(lambda m, a, o: _written(o, 1, value))
    ew, ev = torch.autograd.grad(model(x).sum(), [lin.weight, value])
    handle.remove()
    torch.testing.assert_close(gw, ew)
    torch.testing.assert_close(gv, ev)
    assert torch.count_nonzero(gv) > 0


def test_one_edit_object_goes_to_several_layers_each_counting_its_own_calls():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    edit = hookkit.ablate()
    with hookkit.edits(model, {"*": edit}) as ed:
        model(torch.randn(1, 2))
        model(torch.randn(1, 2))
    assert ed.applied == {"0": 2, "1": 2, "2": 2}
    with hookkit.hooks(model, forward={nn.Linear: edit}, with_kwargs=True):
        assert torch.count_nonzero(model(torch.randn(1, 2))) == 0


def test_an_edit_not_given_to_a_block_asks_to_be_bound():
    model = nn.Sequential(nn.Linear(2, 2))
    edit = hookkit.ablate()
    handle = model[0].register_forward_hook(edit)
    with pytest.raises(hookkit.EditError, match="not tied to a layer"):
        model(torch.randn(1, 2))
    handle.remove()
    bound = edit.bind("0")
    handle = model[0].register_forward_hook(bound)  # a raw torch hook, if you want one
    assert torch.count_nonzero(model(torch.randn(1, 2))) == 0
    handle.remove()
    assert bound.applied == 1
    bound.check()


# -- errors, and the census on every path ---------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["edits", "hooks"])
def test_an_edit_that_never_applied_raises_on_exit(form):
    model = Twice()
    before = hook_census(model)

    def block(spec):
        return hookkit.edits(model, spec) if form == "edits" else hookkit.hooks(model, forward=spec)

    with pytest.raises(hookkit.EditError, match=r"on 'unused' never applied: the layer never ran"):
        with block({"unused": hookkit.add(torch.ones(4)), "lin": hookkit.add(torch.ones(4))}):
            model(torch.randn(1, 4))
    assert hook_census(model) == before
    with pytest.raises(hookkit.EditError, match=r"on 'lin' never applied: the layer ran 2 time\(s\) and call=2 "
                                                r"needs 3.*call= below 2"):
        with block({"lin": hookkit.ablate(call=2)}):
            model(torch.randn(1, 4))
    assert hook_census(model) == before
    with pytest.raises(hookkit.EditError, match="the layer never ran inside the block"):
        with block({"lin": hookkit.ablate()}):
            pass  # the model was never called
    assert hook_census(model) == before


def test_a_forward_that_raises_keeps_its_own_error_and_the_census():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.late = nn.Linear(2, 2)

        def forward(self, x):
            self.lin(x)
            raise ValueError("boom")

    model = Boom()
    before = hook_census(model)
    with pytest.raises(ValueError, match="boom"):  # not an EditError for 'late', which never got to run
        with hookkit.edits(model, {"lin": hookkit.ablate(), "late": hookkit.ablate()}):
            model(torch.randn(1, 2))
    assert hook_census(model) == before


@pytest.mark.parametrize("edit, pattern", [
    (hookkit.patch(torch.zeros(3, 5), index=(slice(None), 1)),
     r"hookkit.patch on '0' \(call=0\): the value has shape \(3, 5\), which does not broadcast to output\[:, 1\] "
     r"of shape \(2, 4\) \(the output has shape \(2, 3, 4\), index \[:, 1\]\)"),
    (hookkit.add(torch.zeros(5)), r"the vector has shape \(5,\).*output of shape \(2, 3, 4\)"),
    (hookkit.ablate("mean", mean=torch.zeros(3, 1, 2)), r"the mean has shape \(3, 1, 2\)"),
    (hookkit.patch(torch.zeros(4), index=(slice(None), 7)), r"index \[:, 7\] does not fit the output, of shape "
                                                            r"\(2, 3, 4\)"),
    (hookkit.ablate("mean", over=5), r"cannot take the mean over dims \(5,\)"),
    (hookkit.ablate(out=1), r"out=1 picks a NoneType"),
    (hookkit.ablate(out="attn"), r"out='attn' is not in the output, a tuple of 2 \(Tensor\[2, 3, 4\], NoneType\)"),
])
def test_a_shape_that_does_not_fit_raises_in_the_forward_naming_the_shapes(edit, pattern):
    class Layer(nn.Module):
        def forward(self, x):
            return (x * 1, None)

    model = nn.Sequential(Layer())
    before = hook_census(model)
    with pytest.raises(hookkit.EditError, match=pattern):
        with hookkit.edits(model, {"0": edit}):
            model(torch.randn(2, 3, 4))
    assert hook_census(model) == before
    with pytest.raises(hookkit.EditError, match=pattern):
        with hookkit.hooks(model, forward={"0": edit}):
            model(torch.randn(2, 3, 4))
    assert hook_census(model) == before


@pytest.mark.parametrize("make, error, pattern", [
    (lambda: hookkit.ablate("max"), ValueError, "use 'zero' or 'mean'"),
    (lambda: hookkit.ablate(mean=torch.zeros(2)), ValueError, "pass kind='mean'"),
    (lambda: hookkit.ablate("mean", over=1.0), TypeError, "over= takes a dim"),
    (lambda: hookkit.ablate("mean", mean=[0.0]), TypeError, "mean= takes a tensor"),
    (lambda: hookkit.patch(0.0), TypeError, "a tensor or a hookkit.Capture"),
    (lambda: hookkit.add([1.0, 2.0]), TypeError, "takes a tensor"),
    (lambda: hookkit.add(torch.ones(2), scale="2"), TypeError, "scale= takes a number"),
    (lambda: hookkit.ablate(call="1"), TypeError, "call= takes None"),
    (lambda: hookkit.ablate(call=True), TypeError, "call= takes None"),
    (lambda: hookkit.ablate(call=-1), ValueError, "negative"),
    (lambda: hookkit.ablate(out=1.5), TypeError, "out= takes an int"),
    (lambda: hookkit.ablate(index="a"), TypeError, "index='a' holds a str"),
])
def test_bad_arguments_raise_before_any_hook(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_bad_edits_blocks_raise_before_any_hook():
    model = Twice()
    before = hook_census(model)
    with pytest.raises(TypeError, match="not an edit"):
        hookkit.edits(model, {"lin": lambda m, a, o: o})
    with pytest.raises(hookkit.ArgumentError, match="holds no edit"):  # a ValueError: an empty dict is a dict
        hookkit.edits(model, {})
    with pytest.raises(hookkit.LayerNotFoundError):
        hookkit.edits(model, {"lin": hookkit.ablate(), "nope": hookkit.ablate()})
    with pytest.raises(ValueError, match="two edits for layer 'lin'"):
        hookkit.edits(model, {"lin": hookkit.ablate(), "l*": hookkit.add(torch.ones(4))})
    assert hook_census(model) == before


def test_patch_from_a_capture_on_an_op_node_equals_the_raw_hook_patch():
    torch.manual_seed(0)
    model, _, _ = _resnet()
    clean, corrupt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    index = (slice(None), slice(0, 16))
    with torch.no_grad(), hookkit.capture(model, ["layer1.0.add"]) as cap:
        model(clean)
    before = hook_census(model)
    with torch.no_grad(), hookkit.edits(model, {"layer1.0.add": hookkit.patch(cap, index=index)}) as ed:
        got = model(corrupt)
    assert ed.applied == {"layer1.0.add": 1} and hook_census(model) == before
    handles = raw_add_node(model, lambda t: _written(t, index, cap["layer1.0.add"][index]))
    with torch.no_grad():
        expected = model(corrupt)
    handles[0].remove()
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        assert not torch.allclose(got, model(corrupt), atol=1e-5)


class InPlaceStatements(nn.Module):
    """In-place ops written as statements, whose returned value the model drops (``y.add_(1)``, ``y.mul_(2)``),
    beside a ``+=`` whose result Python rebinds; ``by_hand(name, tensor)`` is where a user would write the same
    edit into the tensor by hand, right after the op."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x, by_hand=None):
        y = self.lin(x)
        y.add_(1)
        if by_hand is not None:
            by_hand("add_", y)
        y.mul_(2)
        if by_hand is not None:
            by_hand("mul_", y)
        y += x.sum(-1, keepdim=True)
        if by_hand is not None:
            by_hand("add", y)
        return self.out(torch.tanh(y))


@pytest.mark.parametrize("node", ["add_", "mul_", "add"])
@pytest.mark.parametrize("kind", ["patch", "add", "zero", "mean", "capture"])
def test_an_edit_on_an_in_place_op_changes_the_tensor_it_wrote_as_the_same_edit_by_hand(node, kind):
    torch.manual_seed(0)
    model = InPlaceStatements()
    x, other = torch.randn(3, 4), torch.randn(3, 4)
    assert node in hookkit.layer_names(model, x)
    index = (slice(None), slice(1, 4))
    value, vector = torch.randn(3, 3), torch.randn(3)
    with torch.no_grad(), hookkit.capture(model, [node]) as clean:
        model(other)
    edit, by_hand = {
        "patch": (hookkit.patch(value, index=index), lambda r: value),
        "add": (hookkit.add(vector, scale=2.0, index=index), lambda r: r + 2.0 * vector),
        "zero": (hookkit.ablate(index=index), lambda r: torch.zeros_like(r)),
        "mean": (hookkit.ablate("mean", over=0, index=index), lambda r: r.mean(0, keepdim=True).expand_as(r)),
        "capture": (hookkit.patch(clean, index=index), lambda r: clean[node][index]),
    }[kind]

    def run(**kw):
        xx = x.clone().requires_grad_()
        out = model(xx, **kw)
        grads = torch.autograd.grad(out.pow(2).sum(), [xx, model.lin.weight])
        return out.detach(), grads

    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with hookkit.edits(model, {node: edit}) as ed:
        got, got_grads = run()
    assert ed.applied == {node: 1} and hook_census(model) == before
    assert torch._C._len_torch_function_stack() == depth

    def write(name, y):  # the same edit, written into the tensor by hand after the op
        if name == node:
            y[index] = by_hand(y[index])

    want, want_grads = run(by_hand=write)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    assert not torch.allclose(got, model(x).detach(), atol=1e-6)  # the edit did change something


def test_hooks_on_an_in_place_op_that_cannot_carry_a_replacement_are_refused():
    class SetItem(nn.Module):
        def forward(self, x):
            y = x * 1
            y[0] = 5.0  # setitem returns None: there is no result to replace
            return y.add_(1) * 2

    model = SetItem()
    x = torch.randn(2, 3)
    assert {"setitem", "add_"} <= set(hookkit.layer_names(model, x))
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with pytest.raises(hookkit.EditError, match=r"'setitem'.*writes in place and returns NoneType"):
        with hookkit.hooks(model, forward={"setitem": lambda site, args, out: torch.zeros(2, 3)}):
            model(x)
    with pytest.raises(hookkit.EditError, match=r"'add_'.*shape \(3,\).*must have that shape"):
        with hookkit.hooks(model, forward={"add_": lambda site, args, out: torch.zeros(3)}):
            model(x)
    with pytest.raises(hookkit.EditError, match=r"argument 0 of 'add_', the tensor this op writes into"):
        with hookkit.hooks(model, forward_pre={"add_": lambda site, args: (args[0].clone(), args[1])}):
            model(x)
    with hookkit.hooks(model, forward_pre={"add_": lambda site, args: (args[0], 2)}):  # the other argument: fine
        torch.testing.assert_close(model(x), (torch.cat([torch.full((1, 3), 5.0), x[1:]]) + 2) * 2)
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth


def _captured_linear():
    model = nn.Sequential(nn.Linear(3, 3))
    with hookkit.capture(model, ["0"]) as cap:
        model(torch.ones(1, 3))
    return cap


@pytest.mark.parametrize("make", [
    lambda call: hookkit.patch(torch.zeros(3), call=call),
    lambda call: hookkit.patch(_captured_linear(), index=(..., 0), call=call),
    lambda call: hookkit.add(torch.ones(3), scale=2, call=call),
    lambda call: hookkit.ablate(call=call),
    lambda call: hookkit.ablate("mean", over=1, call=call, out=1),
], ids=["patch", "patch-capture", "add", "ablate", "ablate-mean"])
def test_an_edits_repr_shows_its_call_so_edits_differing_only_in_call_read_differently(make):
    assert "call=1" in repr(make(1)), repr(make(1))
    assert "call=" not in repr(make(None))  # every call: the default, not shown
    assert len({repr(make(call)) for call in (None, 0, 1, 2)}) == 4


def test_remove_takes_an_edit_blocks_hooks_off_at_once_and_twice_is_safe():
    """``Edits.remove()`` inside the block: every hook of the block is gone (the model runs unedited), a second
    ``remove()`` and the block's exit change nothing."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    before = hook_census(model)
    clean = model(x)
    with hookkit.edits(model, {"0": hookkit.ablate()}) as block:
        assert not torch.equal(model(x), clean)
        block.remove()
        assert hook_census(model) == before
        assert torch.equal(model(x), clean)
        block.remove()
    assert hook_census(model) == before


def test_patch_takes_the_capture_block_as_well_as_the_capture_it_fills():
    """``block = hookkit.capture(...)`` kept instead of ``with ... as cap``: ``patch(block)`` patches from the
    capture the block filled, as ``patch(cap)`` does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    clean, corrupt = torch.randn(2, 3), torch.randn(2, 3)
    block = hookkit.capture(model, ["0"])
    with torch.no_grad(), block as cap:
        expected = model(clean)
    with torch.no_grad():
        with hookkit.edits(model, {"0": hookkit.patch(block)}):
            from_block = model(corrupt)
        with hookkit.edits(model, {"0": hookkit.patch(cap)}):
            from_capture = model(corrupt)
    assert torch.equal(from_block, expected) and torch.equal(from_capture, expected)
