"""hookkit.hooks(): the user's own functions with torch's signatures and return semantics, removed on exit."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import hookkit

from conftest import SharedReLU, hook_census


def test_forward_hook_return_replaces_the_output_like_torch():
    model = SharedReLU()
    x = torch.randn(2, 6)
    twin = copy.deepcopy(model)
    h = twin.fc1.register_forward_hook(lambda m, a, o: o * 0)
    expected = twin(x)
    h.remove()
    with hookkit.hooks(model, forward={"fc1": lambda m, a, o: o * 0}):
        got = model(x)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(model(x), expected)  # and the hook is gone afterwards


def test_forward_pre_hook_with_kwargs_can_rewrite_inputs():
    class Scaled(nn.Module):
        def forward(self, x, *, scale=1.0):
            return x * scale

    model = nn.Sequential()
    model.add_module("s", Scaled())

    def double(module, args, kwargs):
        return args, {**kwargs, "scale": 2.0}

    with hookkit.hooks(model, forward_pre={"s": double}, with_kwargs=True):
        torch.testing.assert_close(model(torch.ones(2)), torch.full((2,), 2.0))
    torch.testing.assert_close(model(torch.ones(2)), torch.ones(2))


def test_backward_hook_gets_torch_grads_and_can_replace_grad_input():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(4, 3, requires_grad=True)
    seen = {}

    def record(module, grad_input, grad_output):
        seen["gi"], seen["go"] = grad_input[0], grad_output[0]
        return (torch.zeros_like(grad_input[0]),)

    with hookkit.hooks(model, backward={"1": record}):
        out = model(x)
        out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0  # the replaced grad_input flowed on
    assert torch.count_nonzero(model[0].weight.grad) == 0
    assert seen["gi"].shape == seen["go"].shape == (4, 3)


def test_glob_class_and_lists_of_functions():
    model = SharedReLU()
    calls = []
    with hookkit.hooks(model, forward={nn.Linear: [lambda m, a, o: calls.append("a"),
                                                   lambda m, a, o: calls.append("b")]}) as hk:
        model(torch.randn(1, 6))
    assert calls == ["a", "b"] * 3
    assert set(hk.handles["forward"]) == {"fc1", "fc2", "head"}


def test_backward_pre_hook_can_replace_grad_output():
    model = nn.Sequential(nn.Linear(2, 2))
    x = torch.randn(1, 2, requires_grad=True)
    with hookkit.hooks(model, backward_pre={"0": lambda m, go: (go[0] * 3,)}):
        model(x).sum().backward()
    torch.testing.assert_close(x.grad, 3 * torch.ones(1, 2) @ model[0].weight)


def test_remove_is_idempotent_and_leaves_user_hooks():
    model = SharedReLU()
    keep = model.fc1.register_forward_hook(lambda *a: None)
    before = hook_census(model)
    hk = hookkit.hooks(model, forward={"fc1": lambda *a: None})
    with hk:
        assert hook_census(model) != before
    hk.remove()
    hk.remove()
    assert hook_census(model) == before
    keep.remove()


def test_a_mock_hook_is_registered_as_itself_not_as_its_bind_attribute():
    """hooks() binds hookkit's edits through a dunder on their class; a Mock (which answers any plain attribute,
    `bind` included) must be called itself."""
    from unittest import mock

    model = nn.Sequential(nn.Linear(2, 2))
    fn = mock.Mock(return_value=None)
    with hookkit.hooks(model, forward={"0": fn}):
        model(torch.ones(1, 2))
    assert fn.call_count == 1
