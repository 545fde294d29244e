"""Gradients equal torch.autograd.grad, also where register_full_backward_hook fails."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hookkit

from conftest import DictOut, InplaceAfter, SharedReLU, hook_census


def outputs_by_raw_hook(model, names, run):
    """Live (non-detached) outputs and inputs of each call, by raw hooks: the arguments for autograd.grad."""
    got = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: got[n].append((i, o))) for n in names]
    try:
        result = run()
    finally:
        for h in hs:
            h.remove()
    return got, result


def test_grads_equal_autograd_grad_on_a_plain_mlp():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 4)
    with hookkit.capture(model, ["0", "1", "2"], grads=True) as cap:
        model(x).pow(2).sum().backward()
    ref = copy.deepcopy(model)
    got, y = outputs_by_raw_hook(ref, ["0", "1", "2"], lambda: ref(x))
    expected = torch.autograd.grad(y.pow(2).sum(), [got[n][0][1] for n in ["0", "1", "2"]])
    for n, g in zip(["0", "1", "2"], expected, strict=True):
        torch.testing.assert_close(cap.grads[n], g)


def test_full_backward_hook_crashes_on_inplace_after_but_capture_does_not():
    model = InplaceAfter(inplace=True)
    x = torch.randn(3, 5, requires_grad=True)
    # What torch's own full backward hook does with ReLU(inplace=True) right after the hooked Linear:
    h = model.fc.register_full_backward_hook(lambda m, gi, go: None)
    try:
        with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
            model(x).sum().backward()
    finally:
        h.remove()
    model._is_full_backward_hook = None
    with hookkit.capture(model, ["fc", "act"], grads=True) as cap:
        model(x).sum().backward()
    ref = InplaceAfter(inplace=False)
    ref.load_state_dict(model.state_dict())
    got, y = outputs_by_raw_hook(ref, ["fc", "act"], lambda: ref(x))
    g_fc, g_act, g_act_in, g_x = torch.autograd.grad(
        y.sum(), [got["fc"][0][1], got["act"][0][1], got["act"][0][0][0], x])
    torch.testing.assert_close(cap.grads["fc"], g_fc)
    torch.testing.assert_close(cap.grads["act"], g_act)
    # act = ReLU(inplace=True) modifies its own input: its input gradient is still the right one.
    torch.testing.assert_close(cap.grad_inputs["act"], g_act_in)
    torch.testing.assert_close(cap.grad_inputs["fc"], g_x)


def test_module_called_several_times_pairs_each_gradient_with_its_call():
    model = SharedReLU()
    x = torch.randn(4, 6)
    with hookkit.capture(model, ["relu"], grads=True) as cap:
        (model(x) ** 2).sum().backward()
    ref = copy.deepcopy(model)
    got, y = outputs_by_raw_hook(ref, ["relu"], lambda: ref(x))
    outs = [o for _, o in got["relu"]]
    ins = [i[0] for i, _ in got["relu"]]
    expected = torch.autograd.grad((y ** 2).sum(), outs + ins)
    assert len(cap.grads.calls("relu")) == 3
    for mine, theirs in zip(cap.grads.calls("relu"), expected[:3], strict=True):
        torch.testing.assert_close(mine, theirs)
    for mine, theirs in zip(cap.grad_inputs.calls("relu"), expected[3:], strict=True):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(cap.grads["relu"], expected[0])  # FX's "relu": the first call of the forward
    torch.testing.assert_close(cap.grad_inputs["relu"], expected[3])


def test_call_without_gradient_is_none_and_aligned():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            unused = self.lin(x)  # noqa: F841 - this call's output never reaches the loss
            return self.lin(x * 2)

    model = TwoCalls()
    with hookkit.capture(model, "lin", grads=True) as cap:
        model(torch.randn(2, 3)).sum().backward()
    calls = cap.grads.calls("lin")
    assert len(calls) == 2 and calls[0] is None and calls[1] is not None


def test_dict_output_gradients_where_full_backward_hooks_never_fire():
    """pytorch issue 87540: full backward hooks do not fire for dict outputs."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.d = DictOut()

        def forward(self, x):
            out = self.d(self.lin(x))
            return out["y"].sum() + out["nested"][1][0].pow(2).sum()

    model = Model()
    fired = []
    h = model.d.register_full_backward_hook(lambda *a: fired.append(1))
    model(torch.randn(2, 3)).backward()
    h.remove()
    model.d._is_full_backward_hook = None
    assert fired == []  # torch's full backward hook is silent here

    x = torch.randn(2, 3)
    with hookkit.capture(model, ["d"], grads=True) as cap:
        model(x).backward()
    ref = copy.deepcopy(model)
    got, y = outputs_by_raw_hook(ref, ["d"], lambda: ref(x))
    out = got["d"][0][1]
    g_y, g_abs = torch.autograd.grad(y, [out["y"], out["nested"][1][0]])
    g = cap.grads["d"]
    assert set(g) == {"y", "nested", "name"} and g["name"] == "static"
    torch.testing.assert_close(g["y"], g_y)
    torch.testing.assert_close(g["nested"][1][0], g_abs)
    assert g["nested"][0] is None  # that tensor got no gradient
    assert g["nested"][1][1] is None


def test_tuple_output_and_multiple_inputs():
    class Pairwise(nn.Module):
        def forward(self, a, b, k):
            return a * b, a + k * b

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(3, 3)
            self.pair = Pairwise()

        def forward(self, x, side):
            p, q = self.pair(self.pre(x), side, 3)
            return (p.sum() + q.pow(2).sum())

    model = Model()
    x = torch.randn(2, 3)
    side = torch.randn(2, 3)  # needs no grad
    with hookkit.capture(model, "pair", grads=True, inputs=True) as cap:
        model(x, side).backward()
    ref = copy.deepcopy(model)
    got, y = outputs_by_raw_hook(ref, ["pair"], lambda: ref(x, side))
    (a_in, _, _), (p, q) = got["pair"][0]
    gp, gq, ga = torch.autograd.grad(y, [p, q, a_in])
    torch.testing.assert_close(cap.grads["pair"][0], gp)
    torch.testing.assert_close(cap.grads["pair"][1], gq)
    grad_in = cap.grad_inputs["pair"]
    assert isinstance(grad_in, tuple) and len(grad_in) == 3
    torch.testing.assert_close(grad_in[0], ga)
    assert grad_in[1] is None and grad_in[2] is None  # side needs no grad; 3 is not a tensor
    assert cap.inputs["pair"][2] == 3


def test_input_used_elsewhere_gets_only_this_modules_share():
    """A residual input: the gradient w.r.t. the block's input is what the block sends back, not the total."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

        def forward(self, x):
            h = x * 2
            return (self.block(h) + h).sum()

    model = Residual()
    x = torch.randn(3, 4, requires_grad=True)
    with hookkit.capture(model, "block", grads=True) as cap:
        model(x).backward()
    ref = copy.deepcopy(model)
    got, y = outputs_by_raw_hook(ref, ["block"], lambda: ref(x))
    (h,), out = got["block"][0]
    (via_block,) = torch.autograd.grad(out, h, grad_outputs=torch.ones_like(out), retain_graph=True)
    torch.testing.assert_close(cap.grad_inputs["block"], via_block)
    (total,) = torch.autograd.grad(y, h)
    assert not torch.allclose(cap.grad_inputs["block"], total)


def test_repeated_backward_accumulates_like_dot_grad():
    model = nn.Sequential(nn.Linear(2, 2))
    x = torch.randn(1, 2)
    with hookkit.capture(model, "0", grads=True) as cap:
        y = model(x).sum()
        y.backward(retain_graph=True)
        first = cap.grads["0"].clone()
        y.backward()
    torch.testing.assert_close(cap.grads["0"], 2 * first)


def test_backward_after_exit_records_nothing_and_leaves_no_hook():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    before = hook_census(model)
    with hookkit.capture(model, ["0", "1"], grads=True) as cap:
        y = model(torch.randn(2, 3, requires_grad=True))
        assert len(y._backward_hooks) == 1  # hookkit's tensor hook on the output of "1"
    assert hook_census(model) == before
    assert len(y._backward_hooks) == 0  # ...is gone from the graph, not merely switched off
    y.sum().backward()
    with pytest.raises(KeyError, match="no gradient"):
        cap.grads["0"]
    with pytest.raises(KeyError, match="no gradient"):
        cap.grad_inputs["1"]


def test_grads_not_requested_says_how_to_ask():
    model = nn.Sequential(nn.Linear(3, 3))
    with hookkit.capture(model, "0") as cap:
        model(torch.randn(1, 3)).sum().backward()
    with pytest.raises(KeyError, match="grads=True"):
        cap.grads["0"]
    with pytest.raises(KeyError, match="inputs=True"):
        cap.inputs["0"]


def test_grads_under_no_grad_are_none_free_and_do_not_break():
    model = nn.Sequential(nn.Linear(3, 3))
    with torch.no_grad(), hookkit.capture(model, "0", grads=True) as cap:
        model(torch.randn(1, 3))
    assert cap["0"].shape == (1, 3)
    with pytest.raises(KeyError, match="no gradient"):
        cap.grads["0"]


def test_module_modifying_its_input_twice_in_place_raises_for_that_layer():
    class Twice(nn.Module):
        def forward(self, x):
            x.mul_(2)
            x.add_(1)
            return x

    model = nn.Sequential(nn.Linear(3, 3), Twice(), nn.Linear(3, 1))
    with hookkit.capture(model, ["1"], grads=True) as cap:
        model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(hookkit.GradientUnavailableError, match="'1'.*in place"):
        cap.grad_inputs["1"]
    assert cap.grads["1"] is not None  # the output gradient is still there


def test_grads_to_cpu_half():
    model = nn.Sequential(nn.Linear(3, 3))
    with hookkit.capture(model, "0", grads=True, to=torch.float16) as cap:
        model(torch.randn(2, 3)).sum().backward()
    assert cap.grads["0"].dtype == torch.float16
    torch.testing.assert_close(cap.grads["0"].float(), torch.ones(2, 3))


def test_capture_does_not_change_parameter_gradients():
    model = InplaceAfter(inplace=True)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 5, requires_grad=True)
    with hookkit.capture(model, ["fc", "act", "head"], grads=True, inputs=True):
        model(x).sum().backward()
    twin(x).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
