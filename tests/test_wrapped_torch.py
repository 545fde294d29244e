"""Op nodes when another library has replaced torch's functions with Python wrappers (torchlens does so for the
rest of the process on first use; ``_torch_wrapper`` does it the same way): names, values and reports are the
ones hookkit gives without the wrappers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hookkit

import _torch_wrapper
from _optional import needs_torchvision, torchvision
from conftest import hook_census


@pytest.fixture
def wrap_torch():
    """``wrap_torch()`` wraps torch's functions as torchlens does; whatever the test does, every original is put
    back afterwards (and checked to be)."""
    originals = [torch.add, torch.Tensor.add, torch.Tensor.__iadd__, torch.Tensor.view, torch.cat, torch.sqrt,
                 F.relu, vars(torch._C.TensorBase)["shape"]]
    before = _torch_wrapper.seen[0]

    def wrap() -> None:
        _torch_wrapper.wrap_torch()
        assert torch.add is not originals[0] and torch.Tensor.__iadd__ is not originals[2]  # really wrapped
        assert isinstance(vars(torch.Tensor)["shape"], property)

    try:
        yield wrap
        assert _torch_wrapper.seen[0] > before  # the model's ops went through the wrappers
    finally:
        _torch_wrapper.unwrap_torch()
    assert [torch.add, torch.Tensor.add, torch.Tensor.__iadd__, torch.Tensor.view, torch.cat, torch.sqrt, F.relu,
            vars(torch._C.TensorBase)["shape"]] == originals
    assert "shape" not in vars(torch.Tensor)


class OpsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h += 1  # an in-place operator: FX's "add"
        y = torch.cat([h, h * 2], dim=1)
        n = y.shape[0]
        y = F.relu(y).view(n, -1)
        return y.sum(dim=1, keepdim=True) + x.mean()


def ops_model() -> nn.Module:
    return nn.Sequential(OpsBlock(), nn.Linear(1, 1))


def test_op_names_through_wrapped_torch_functions_are_the_names_without_them(wrap_torch):
    model, x = ops_model(), torch.randn(3, 4)
    expected = hookkit.layer_names(model, x)
    assert [n for n in expected if n.startswith("0.")] == [
        "0.lin", "0.add", "0.mul", "0.cat", "0.getattr", "0.relu", "0.view", "0.sum", "0.mean", "0.add_1"]
    wrap_torch()
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    assert hookkit.layer_names(model, x) == expected  # no untyped_storage, getattr or add_ of the wrappers' own
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth


def test_capture_of_op_nodes_through_wrapped_torch_functions_matches_torch(wrap_torch):
    model, x = ops_model(), torch.randn(3, 4)
    lin_out = model[0].lin(x).detach()
    h = lin_out + 1
    reference = {"0.add": h, "0.mul": h * 2, "0.cat": torch.cat([h, h * 2], 1),
                 "0.relu": F.relu(torch.cat([h, h * 2], 1))}
    wrap_torch()
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with hookkit.capture(model, list(reference)) as cap:
        model(x)
    for name, value in reference.items():
        torch.testing.assert_close(cap[name], value, rtol=0, atol=0)
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth


@needs_torchvision
def test_resnet_add_node_through_wrapped_torch_functions(wrap_torch):
    """The reported case: ResNet's ``out += identity`` is ``layer1.0.add`` (it was ``layer1.0.add_``, and capture
    said ``'layer1.0.add' never ran``)."""
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    expected = hookkit.layer_names(model, x)
    seen = {}
    handles = [model.layer1[0].register_forward_pre_hook(lambda m, a: seen.update(identity=a[0].clone())),
               model.layer1[0].bn2.register_forward_hook(lambda m, a, o: seen.update(bn2=o.clone()))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    wrap_torch()
    before = hook_census(model)
    assert hookkit.layer_names(model, x) == expected
    with torch.no_grad(), hookkit.capture(model, ["layer1.0.add", "layer4.1.add"]) as cap:
        model(x)
    torch.testing.assert_close(cap["layer1.0.add"], seen["bn2"] + seen["identity"], rtol=0, atol=0)
    assert cap["layer4.1.add"].shape == (1, 512, 1, 1)
    assert hook_census(model) == before


class SqrtOfZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return torch.sqrt(h * 0) + h  # finite forward, Inf gradient from sqrt's backward


def test_check_finite_and_trace_name_ops_through_wrapped_torch_functions(wrap_torch):
    model, x = nn.Sequential(nn.Linear(4, 4), SqrtOfZero(), nn.Linear(4, 1)), torch.randn(2, 4)
    wrap_torch()
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=True):
        model(x).sum().backward()
    assert (info.value.layer, info.value.phase) == ("1.sqrt", "backward")
    assert str(info.value).startswith("'1.sqrt' (torch.sqrt) in '1' (SqrtOfZero) made 8 Inf")
    with hookkit.trace(model, "1", ops=True, inputs=False, backward=False,
                       console=_quiet_console()) as t:
        model(x)
    assert [e.name for e in t.events] == ["1.mul", "1.sqrt", "1.add", "1"]


def _quiet_console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=120, color_system=None)
