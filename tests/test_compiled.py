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
    with pytest.warns(UserWarning, match="recorded nothing.*torch.compile"):
        with hookkit.capture(model, ["0"]) as cap:
            compiled(x)
    assert "0" not in cap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eager model inside the block: recorded, no warning
        with hookkit.capture(model, ["0"]) as cap:
            model(x)
    assert "0" in cap
