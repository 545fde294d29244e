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
    # clone=True: no copy-on-write function mode inside Straight's forward, whose per-op graph breaks would leave
    # dynamo nothing to compile
    with hookkit.capture(model, ["b"], clone=True) as first:
        compiled(x)  # compiled here, while layer a has no hook
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with hookkit.capture(model, ["a"], clone=True) as second:
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
    from hookkit.core import compat as _compat

    monkeypatch.setattr(_compat.hook_guards, "acquire", lambda: None)
    _, _, _, _, second, caught = _run_compiled_inside_then_hook_another_layer()
    assert "a" not in second
    assert [m for m in caught if "recorded nothing" in m]


# -- hookkit's hooks run eagerly inside compiled code (issue 12: monitor with the model compiled inside the block) --
class Net(nn.Module):
    """A forward of its own (so copy-on-write watches inside it) that writes in place into a captured tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        y = self.out(torch.tanh(self.fc2(self.act(self.fc1(x)))))
        return y.add_(1)  # the captured output of `out` must keep its value


NET_LAYERS = ["fc1", "act", "fc2", "out"]


def _monitored_run(compile_with: str | None) -> list[dict]:
    torch.manual_seed(0)
    model = Net()
    forward = torch.compile(model, backend=compile_with) if compile_with else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    before = hook_census(model)
    with hookkit.monitor(model, NET_LAYERS, every=2, summary=False) as mon:
        for _ in range(5):
            forward(torch.randn(12, 6, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    assert hook_census(model) == before
    return mon.records


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2, 4]
    for a, b in zip(got, want, strict=True):
        for group in ("layers", "params"):
            assert set(a[group]) == set(b[group])
            for name, stats in b[group].items():
                for key, value in stats.items():
                    assert a[group][name][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], name, key)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_monitor_with_the_model_compiled_inside_the_block_equals_the_eager_run(backend, recwarn):
    """Every statistic (activations, gradients w.r.t. outputs through a compiled backward, update ratios) is what
    the eager model gives, compiled graphs did run, and dynamo never traced hookkit's own code (which used to run
    out of memory on the gradient taps)."""
    want = _monitored_run(None)
    got = _monitored_run(backend)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    _assert_same_records(got, want)
    assert not [w for w in recwarn if "recompile" in str(w.message)]


def test_capture_with_grads_and_copy_on_write_under_compile_equals_eager():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(12, 6)
    with hookkit.capture(model, NET_LAYERS, grads=True) as want:
        model(x).sum().backward()
    compiled = torch.compile(model, backend="aot_eager")
    with hookkit.capture(model, NET_LAYERS, grads=True) as got:
        y = compiled(x)
        y.sum().backward()
    torch.testing.assert_close(y, model(x))
    for name in NET_LAYERS:
        torch.testing.assert_close(got[name], want[name])
        torch.testing.assert_close(got.grads[name], want.grads[name])
    assert got.copies == 1  # the output of `out`, copied before add_ wrote into it


class WritesCaptured(Net):
    """Net's layers; a forward that writes into the captured ReLU output after fc2 read it."""

    def forward(self, x):
        h = self.act(self.fc1(x))
        z = self.fc2(h)
        h.mul_(2)  # into the captured ReLU output
        return self.out(torch.tanh(z)) + h.sum()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_forward_that_writes_into_a_captured_tensor_keeps_the_captured_value(backend):
    """The copy-on-write op tap runs eagerly too: traced by dynamo, its check of the op's arguments failed inside
    the compiled frame ("Boolean value of Tensor ... is ambiguous")."""
    torch.manual_seed(0)
    model = WritesCaptured()
    x = torch.randn(5, 6)
    with torch.no_grad():
        relu = torch.relu(model.fc1(x))
        want = model(x)
    compiled = torch.compile(model, backend=backend)
    with hookkit.capture(model, ["fc1", "act", "fc2", "out"]) as cap:
        for _ in range(3):
            got = compiled(x)
    torch.testing.assert_close(got, want)
    assert len(cap.calls("act")) == 3
    for value in cap.calls("act"):
        torch.testing.assert_close(value, relu)  # not doubled
    assert cap.copies == 3


def test_monitor_refuses_the_compiled_wrapper_with_the_fix():
    compiled = torch.compile(Net(), backend="eager")
    with pytest.raises(hookkit.UnsupportedModelError, match=r"_orig_mod.*before compiling"):
        hookkit.monitor(compiled, ["_orig_mod.fc1"])


_DYNAMO_IMPORTED_INSIDE = """
import sys, torch, torch.nn as nn, hookkit

class WritesCaptured(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.out = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.act(self.fc1(x))
        z = self.fc2(h)
        h.mul_(2)
        return self.out(torch.tanh(z)) + h.sum()

model = WritesCaptured()
x = torch.randn(4, 6)
with hookkit.capture(model, ["fc1", "act", "out"]) as want:
    y = model(x)
with hookkit.capture(model, ["fc1", "act", "out"]) as got:
    assert "torch._dynamo" not in sys.modules  # a capture alone does not import dynamo
    compiled = torch.compile(model, backend="eager")
    for _ in range(3):
        torch.testing.assert_close(compiled(x), y)
for n in ["fc1", "act", "out"]:
    assert len(got.calls(n)) == 3
    torch.testing.assert_close(got.calls(n)[-1], want[n])
print("ok")
"""


def test_dynamo_first_imported_inside_the_block_still_runs_the_hooks_eagerly():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _DYNAMO_IMPORTED_INSIDE], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
    assert "recompile" not in proc.stderr
