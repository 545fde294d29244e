"""Activation checkpointing recomputes forwards during backward: those are not new calls, and gradients still
pair with the original calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import hookkit

from conftest import hook_census


class Checkpointed(nn.Module):
    def __init__(self, use_checkpoint: bool) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.a = nn.Linear(4, 4)
        self.b = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.c = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        h = checkpoint(self.b, h, use_reentrant=False) if self.use_checkpoint else self.b(h)
        return self.c(h)


def test_recomputed_forwards_are_not_new_calls_and_grads_match_the_plain_model():
    model = Checkpointed(use_checkpoint=True)
    plain = copy.deepcopy(model)
    plain.use_checkpoint = False
    x = torch.randn(3, 4)
    names = ["a", "b", "b.0", "b.1", "b.2", "c"]
    before = hook_census(model)
    with hookkit.capture(model, names, grads=True, inputs=True) as cap:
        model(x).pow(2).sum().backward()
    with hookkit.capture(plain, names, grads=True, inputs=True) as ref:
        plain(x).pow(2).sum().backward()
    assert hook_census(model) == before
    for n in names:
        assert len(cap.calls(n)) == len(ref.calls(n)) == 1, n
        torch.testing.assert_close(cap[n], ref[n])
        torch.testing.assert_close(cap.grads[n], ref.grads[n])
        torch.testing.assert_close(cap.grad_inputs[n], ref.grad_inputs[n])


def test_trace_does_not_show_recomputation_as_forward_events():
    import io

    from rich.console import Console

    model = Checkpointed(use_checkpoint=True)
    with hookkit.trace(model, console=Console(file=io.StringIO())) as t:
        model(torch.randn(2, 4)).sum().backward()
    forwards = [e.name for e in t.events if e.kind == "forward"]
    assert forwards == ["a", "b.0", "b.1", "b.2", "b", "c"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reentrant_checkpointing_records_forward_values_once():
    """use_reentrant=True runs the original forward without a graph: values are recorded once; gradients inside the
    checkpointed block are not available then (the graph only exists during the recomputation)."""
    class Reentrant(Checkpointed):
        def forward(self, x):
            return self.c(checkpoint(self.b, self.a(x), use_reentrant=True))

    model = Reentrant(use_checkpoint=True)
    with hookkit.capture(model, ["b.0", "c"], grads=True) as cap:
        model(torch.randn(2, 4)).sum().backward()
    assert len(cap.calls("b.0")) == 1
    assert cap.grads["c"] is not None
