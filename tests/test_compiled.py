"""torch.compile: capture works when compilation happens inside the block; otherwise a clear error or warning,
never silently nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import hookkit

from conftest import hook_census


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()  # what was compiled for earlier tests' modules must not decide this test
    yield
    torch._dynamo.reset()


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_passing_the_compiled_module_is_refused_with_the_fix(backend):
    compiled = torch.compile(small(), backend=backend)  # nothing is compiled until it is called
    with pytest.raises(hookkit.UnsupportedModelError, match=r"_orig_mod.*before compiling"):
        hookkit.capture(compiled, "_orig_mod.0")


def test_compiling_inside_the_block_sees_the_hooks():
    model = small()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 4)
    before = hook_census(model)
    with hookkit.capture(model, ["0", "2"]) as cap:
        y = compiled(x)
    assert hook_census(model) == before
    assert list(cap) == ["0", "2"]
    torch.testing.assert_close(cap["2"], y)
    torch.testing.assert_close(cap["0"], model[0](x).detach())
    assert torch._dynamo.config.skip_nnmodule_hook_guards is True  # restored


def test_compiled_before_the_block_warns_instead_of_returning_nothing_silently():
    model = small()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 4)
    compiled(x)  # compiled without hooks: this code skips hooks added later
    with pytest.warns(UserWarning, match="recorded nothing.*torch.compile"), hookkit.capture(model, ["0"]) as cap:
        compiled(x)
    assert "0" not in cap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eager model inside the block: recorded, no warning
        with hookkit.capture(model, ["0"]) as cap:
            model(x)
    assert "0" in cap



class Straight(nn.Module):
    """No loop in forward: dynamo compiles it as one frame and resumes after a graph break in a hook, so the
    compiled code is reused as long as its guards hold (nn.Sequential's loop would fall back to eager instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _run_compiled_inside_then_hook_another_layer():
    torch.manual_seed(0)
    model = Straight()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 4)
    before = hook_census(model)
    with hookkit.capture(model, ["b"]) as first:
        compiled(x)  # compiled here, while layer a has no hook
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with hookkit.capture(model, ["a"]) as second:
            y = compiled(x)  # reused only if dynamo does not notice a's new hook
    assert hook_census(model) == before
    return model, x, y, first, second, [str(w.message) for w in caught]


def test_code_compiled_inside_a_block_sees_the_hooks_of_the_next_block():
    """While a block is open dynamo guards on module hooks, also on empty hook dicts: code compiled in one block is
    recompiled for the next one instead of skipping its hooks. Without the guard the second block records nothing."""
    model, x, y, first, second, caught = _run_compiled_inside_then_hook_another_layer()
    assert len(first.calls("b")) == 1
    assert list(second) == ["a"], caught
    torch.testing.assert_close(second["a"], model.a(x).detach())
    assert not [m for m in caught if "recorded nothing" in m]
    assert torch._dynamo.config.skip_nnmodule_hook_guards is True  # restored


def test_without_the_hook_guard_the_next_block_records_nothing(monkeypatch):
    """The test above depends on the guard (hookkit's dynamo switch): with it off, the code compiled in the first
    block is reused and layer a's hook never runs, which hookkit can only warn about."""
    from hookkit import _engine

    monkeypatch.setattr(_engine._hook_guards, "acquire", lambda: None)
    _, _, _, _, second, caught = _run_compiled_inside_then_hook_another_layer()
    assert "a" not in second
    assert [m for m in caught if "recorded nothing" in m]
