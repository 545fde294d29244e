"""capture(..., param_grads=True): each selected module's parameter gradients after accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import hookkit

from _ranks import needs_gloo, two_ranks
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



@needs_gloo
def test_under_ddp_param_grads_are_the_reduced_grad_the_optimizer_steps_with(tmp_path):
    from _param_grads_worker import LAYERS, global_batches, loss, model

    two_ranks("_param_grads_worker.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    assert all(r["census_unchanged"] for r in ranks)
    net = model()  # one process on the global batches: the reference
    xs = global_batches()

    def reference(batches: list[torch.Tensor], rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        grads = torch.autograd.grad(sum(loss(net(x[rows])) for x in batches), list(net.parameters()))
        return dict(zip([n for n, _ in net.named_parameters()], grads, strict=True))

    for stage, want in (("synced", reference(xs[:1])), ("accumulated", reference(xs[1:]))):
        for rank in ranks:
            got = rank[stage]
            for layer in LAYERS:
                for pname, g in got["captured"][layer].items():
                    torch.testing.assert_close(g, got["grad"][f"{layer}.{pname}"], rtol=0, atol=0)  # p.grad itself
                    torch.testing.assert_close(g, want[f"{layer}.{pname}"])  # DDP's average: the global batch's
        assert set(ranks[0][stage]["captured"]["0"]) == {"weight", "bias"}
    # Under no_sync() the gradient stays local until the next synced backward: each rank holds its own.
    for r, rank in enumerate(ranks):
        own = reference(xs[1:2], slice(8 * r, 8 * r + 8))
        for layer in LAYERS:
            for pname, g in rank["local"]["captured"][layer].items():
                torch.testing.assert_close(g, rank["local"]["grad"][f"{layer}.{pname}"], rtol=0, atol=0)
                torch.testing.assert_close(g, own[f"{layer}.{pname}"])
    assert not torch.allclose(ranks[0]["local"]["captured"]["0"]["weight"],
                              ranks[1]["local"]["captured"]["0"]["weight"])  # the ranks' data differ


def test_a_backward_that_raised_leaves_no_parameter_held_by_the_capture():
    """A backward that raises after some parameters' gradients arrived never reaches its end, where their copies
    would be taken: once the block is left, the capture holds none of those parameters (the model can be freed)."""
    import gc
    import weakref

    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward failed on purpose")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(3, 4)
            self.last = nn.Linear(4, 2)

        def forward(self, x):
            return self.last(Fails.apply(self.first(x)))

    model = Net()
    ref = weakref.ref(model.last.weight)
    with pytest.raises(RuntimeError, match="on purpose"), hookkit.capture(model, ["last"], param_grads=True) as cap:
        model(torch.randn(5, 3)).sum().backward()  # last's gradients arrive, then Fails.backward raises
    del model
    gc.collect()
    assert ref() is None, "the capture still holds a parameter whose backward never finished"
    assert "last" not in cap.param_grads
