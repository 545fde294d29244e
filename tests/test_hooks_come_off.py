"""Hooks always come off: every exit path, nested captures, user hooks left untouched (a hook census)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

import hookkit

from _optional import needs_torchvision, torchvision
from conftest import InplaceAfter, SharedReLU, hook_census


class Boom(Exception):
    pass


class FailingModel(nn.Module):
    """Raises inside forward, after some hooked layers already ran."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        self.a(x)
        raise Boom("inside forward")


def user_hooks(model: nn.Module) -> list:
    """Hooks a user registered before hookkit came along: they must survive untouched."""
    first = next(m for n, m in model.named_modules() if n)
    return [
        first.register_forward_hook(lambda *a: None),
        first.register_forward_pre_hook(lambda *a: None),
        first.register_full_backward_hook(lambda *a: None),
        model.register_forward_hook(lambda *a: None),
    ]


@needs_torchvision
def test_normal_exit_removes_everything_and_keeps_user_hooks():
    model = torchvision.models.resnet18()
    mine = user_hooks(model)
    before = hook_census(model)
    with hookkit.capture(model, [nn.Conv2d, "fc"], inputs=True, grads=True):
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert hook_census(model) == before
    for h in mine:
        h.remove()


def test_exception_in_the_block_removes_hooks():
    model = SharedReLU()
    before = hook_census(model)
    with pytest.raises(Boom), hookkit.capture(model, ["relu", "fc1"], inputs=True, grads=True):
        model(torch.randn(1, 6))
        raise Boom()
    assert hook_census(model) == before


def test_exception_inside_forward_removes_hooks_and_keeps_what_ran():
    model = FailingModel()
    before = hook_census(model)
    with pytest.raises(Boom), hookkit.capture(model, ["a", "b"], inputs=True, grads=True) as cap:
        model(torch.randn(1, 3))
    assert hook_census(model) == before
    assert list(cap) == ["a"]
    with pytest.raises(KeyError, match="'b' never ran"):
        cap["b"]


def test_hooks_api_removes_only_its_own_and_restores_the_full_backward_flag():
    model = InplaceAfter(inplace=False)
    before = hook_census(model)
    seen = []
    with hookkit.hooks(
        model,
        forward={"fc": lambda m, a, o: seen.append("fwd")},
        forward_pre={"fc": lambda m, a: seen.append("pre")},
        backward={"head": lambda m, gi, go: seen.append("bwd")},
        backward_pre={"head": lambda m, go: seen.append("bwd_pre")},
    ) as hk:
        assert len(hk) == 4
        model(torch.randn(2, 5)).sum().backward()
    assert seen == ["pre", "fwd", "bwd_pre", "bwd"]
    assert hook_census(model) == before
    # torch would otherwise refuse an old-style backward hook on `head` for the rest of the model's life
    model.head.register_backward_hook(lambda *a: None).remove()


@needs_torchvision
def test_deepcopy_and_torch_save_work_afterwards():
    model = torchvision.models.resnet18()
    pristine = hook_census(model)
    with hookkit.capture(model, nn.Conv2d, grads=True, inputs=True):
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    model.eval(), clone.eval(), loaded.eval()
    torch.testing.assert_close(clone(x), model(x))
    torch.testing.assert_close(loaded(x), model(x))
    model.train()  # the test's own eval() above; the census also compares training flags
    assert hook_census(model) == pristine
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.modules()] == [0] * len(
        list(loaded.modules()))


@needs_torchvision
def test_capture_does_not_touch_training_mode_or_grad_mode():
    model = torchvision.models.resnet18().train()
    with hookkit.capture(model, "fc", stop=True):
        model(torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


# -- hypothesis: random nestings of captures / user hooks, with failures at random places ------------------------

def _test_failure_hook(*args):
    raise Boom("inside the model's forward")


LAYERS = ["fc1", "fc2", "relu", "head"]
layer_lists = st.lists(st.sampled_from(LAYERS), min_size=1, max_size=4, unique=True)
frame = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["capture", "hooks", "trace", "check_finite"]),
        "layers": layer_lists,
        "inputs": st.booleans(),
        "grads": st.booleans(),
        "stop": st.booleans(),
        "clone": st.booleans(),
        "fail": st.sampled_from([None, "block", "forward", "hook", "backward"]),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(frame, min_size=1, max_size=4), backward=st.booleans())
def test_any_nesting_of_captures_and_failures_leaves_the_census_unchanged(frames, backward):
    model = SharedReLU()
    keep = model.fc2.register_forward_hook(lambda *a: None)  # a user's own hook
    before = hook_census(model)

    def body(depth: int) -> None:
        if depth == len(frames):
            assert hook_census(model) != before  # the frames really did hook something
            y = model(torch.randn(2, 6))
            if backward:
                if any(f["fail"] == "backward" for f in frames):
                    y.register_hook(lambda g: (_ for _ in ()).throw(Boom("in backward")))
                y.sum().backward()
            return
        f = frames[depth]
        if f["kind"] == "capture":
            ctx = hookkit.capture(model, f["layers"], inputs=f["inputs"], grads=f["grads"], stop=f["stop"],
                                  clone=f["clone"])
        elif f["kind"] == "trace":
            ctx = hookkit.trace(model, f["layers"], console=Console(file=io.StringIO()), backward=f["grads"])
        elif f["kind"] == "check_finite":
            ctx = hookkit.check_finite(model, f["layers"], backward=f["grads"])
        else:
            def bad(*a):
                raise Boom("in a user hook")
            fn = bad if f["fail"] == "hook" else (lambda *a: None)
            ctx = hookkit.hooks(model, forward={n: fn for n in f["layers"]},
                                backward={f["layers"][0]: lambda *a: None})
        with ctx:
            if f["fail"] == "forward":
                model.fc1.register_forward_hook(_test_failure_hook)  # the test's own; removed below
            body(depth + 1)
            if f["fail"] == "block":
                raise Boom("in the block")

    try:
        body(0)
    except Boom:
        pass
    finally:
        # the failure hooks added by the test itself (not hookkit's) are cleaned by the test
        known = {k for k, _ in before["fc1._forward_hooks"]}
        for k in [k for k in model.fc1._forward_hooks if k not in known]:
            if model.fc1._forward_hooks[k] is _test_failure_hook:
                del model.fc1._forward_hooks[k]
    assert hook_census(model) == before
    keep.remove()
