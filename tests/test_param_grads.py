"""capture(..., param_grads=True): each selected module's parameter gradients after accumulation."""

from __future__ import annotations

import torch
import torch.nn as nn

import hookkit

from conftest import hook_census


def model_and_input():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 1))
    return model, torch.randn(5, 3)


def test_param_grads_equal_dot_grad_and_autograd_grad():
    model, x = model_and_input()
    before = hook_census(model)
    with hookkit.capture(model, ["0", "1"], param_grads=True) as cap:
        model(x).pow(2).sum().backward()
    assert hook_census(model) == before  # the parameters' own hook dicts are empty again
    assert set(cap.param_grads) == {"0", "1"}
    assert set(cap.param_grads["1"]) == {"0.weight", "0.bias"}
    torch.testing.assert_close(cap.param_grads["0"]["weight"], model[0].weight.grad)
    model.zero_grad()
    expected = torch.autograd.grad(model(x).pow(2).sum(), [model[1][0].weight])[0]
    torch.testing.assert_close(cap.param_grads["1"]["0.weight"], expected)


def test_param_grads_are_copies_that_follow_accumulation():
    model, x = model_and_input()
    with hookkit.capture(model, ["2"], param_grads=True) as cap:
        model(x).sum().backward()
        first = cap.param_grads["2"]["bias"]
        model(x).sum().backward()
    second = cap.param_grads["2"]["bias"]
    torch.testing.assert_close(second, 2 * first)  # .grad accumulated over the two backward passes
    model.zero_grad()  # zeroing .grad later does not reach the stored copies
    assert torch.count_nonzero(second) > 0


def test_backward_after_the_block_records_nothing():
    model, x = model_and_input()
    with hookkit.capture(model, ["0"], param_grads=True) as cap:
        y = model(x).sum()
    y.backward()
    assert cap.param_grads == {}


def test_frozen_parameters_are_skipped():
    model, x = model_and_input()
    model[0].weight.requires_grad_(False)
    with hookkit.capture(model, ["0"], param_grads=True) as cap:
        model(x).sum().backward()
    assert set(cap.param_grads["0"]) == {"bias"}
