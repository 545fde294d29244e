"""What hostile testing broke in capture / hooks / trace (issue 8, items 9, 11-15, 17 and the census): options
checked before the forward, taps that step aside instead of breaking the user's computation, state restored
whatever the exit order, results that never hold the model, values that cannot be snapshotted refused by name,
and inputs paired with their own outputs."""

from __future__ import annotations

import contextlib
import gc
import io
import random
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

import hookkit

from _optional import needs_torchvision
from conftest import SharedReLU, hook_census


def small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


# -- item 9: options found bad only inside the forward --------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_to_cuda_without_cuda_is_refused_when_the_capture_is_made():
    model = small()
    with pytest.raises(ValueError, match=r"to='cuda'.*not available here.*'cpu'"):
        hookkit.capture(model, ["0"], to="cuda")
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_with_cuda_stores_on_the_gpu():
    model = small()
    x = torch.randn(2, 3)
    with hookkit.capture(model, ["0"], to="cuda", grads=True) as cap:
        model(x).sum().backward()
    assert cap["0"].device.type == "cuda" and cap.grads["0"].device.type == "cuda"
    torch.testing.assert_close(cap["0"].cpu(), model[0](x).detach())


def test_a_device_index_this_machine_lacks_is_refused():
    with pytest.raises(ValueError, match="not available here"):
        hookkit.capture(small(), ["0"], to=f"cuda:{torch.cuda.device_count() + 3}")


@pytest.mark.parametrize("to, what", [
    ((torch.float16, torch.float64), "two dtypes"),
    (("meta", "cpu"), "two devices"),
    ([torch.device("cpu"), torch.float16, "meta"], "two devices"),
])
def test_contradictory_to_is_refused_instead_of_the_last_winning(to, what):
    with pytest.raises(ValueError, match=what):
        hookkit.capture(small(), ["0"], to=to)


def test_repeating_the_same_device_or_dtype_is_fine():
    model = small()
    with hookkit.capture(model, ["0"], to=("cpu", torch.float64, torch.device("cpu"), torch.float64)) as cap:
        model(torch.randn(2, 3))
    assert cap["0"].dtype == torch.float64


def test_trace_console_must_be_a_rich_console():
    model = small()
    with pytest.raises(TypeError, match=r"console= takes a rich.console.Console, got str"):
        hookkit.trace(model, console="stdout")
    with hookkit.trace(model, console=quiet()) as t:  # and a real one works
        model(torch.randn(1, 3))
    assert t.events


# -- item 11: the torch.compile warning only when compiled code can be involved ------------------------------------

@needs_torchvision
def test_importing_torchvision_alone_does_not_make_an_empty_capture_warn():
    code = (
        "import warnings, torch, torch.nn as nn, torchvision, hookkit, sys\n"
        "assert 'torch._dynamo' in sys.modules\n"
        "m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))\n"
        "warnings.simplefilter('error')\n"
        "with hookkit.capture(m, ['1']) as cap:\n"
        "    pass\n"
        "print('no warning')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no warning" in done.stdout


# -- item 12: a tap that cannot handle a tensor steps aside -----------------------------------------------------------

def test_grads_capture_does_not_break_torch_func_grad():
    model = small()
    x = torch.randn(3)
    expected = torch.func.grad(lambda v: model(v).sum())(x)
    with hookkit.capture(model, ["0", "2"], grads=True) as cap:
        got = torch.func.grad(lambda v: model(v).sum())(x)
    torch.testing.assert_close(got, expected)
    assert "0" in cap.grads  # the stores say what happened rather than pretending nothing arrived
    with pytest.raises(hookkit.GradientUnavailableError, match=r"torch\.func transform"):
        cap.grads["0"]


def test_param_grads_work_with_a_sparse_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    idx = torch.tensor([[1, 2, 2], [7, 1, 0]])
    with hookkit.capture(model, ["0"], param_grads=True) as cap:
        model(idx).sum().backward()
    stored = cap.param_grads["0"]["weight"]
    assert stored.layout == torch.sparse_coo
    torch.testing.assert_close(stored.to_dense(), model[0].weight.grad.to_dense())
    model[0].weight.grad = None
    (model(idx).sum() * 2).backward()  # a later backward outside the block does not change what was stored
    torch.testing.assert_close(stored.to_dense() * 2, model[0].weight.grad.to_dense())


class SparseSum(nn.Module):
    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sparse.sum(s * 3.0)


def test_grads_capture_of_a_module_taking_a_sparse_tensor_that_requires_grad():
    model = nn.Sequential(SparseSum())
    s = torch.eye(3).to_sparse().requires_grad_()
    model(s).backward()
    expected = s.grad.to_dense().clone()
    s.grad = None
    with hookkit.capture(model, ["0"], grads=True, inputs=True) as cap:
        model(s).backward()
    torch.testing.assert_close(s.grad.to_dense(), expected)  # the user's computation is untouched
    torch.testing.assert_close(cap.grads["0"], torch.tensor(1.0))
    with pytest.raises(hookkit.GradientUnavailableError, match=r"sparse_coo tensor.*ran unchanged"):
        cap.grad_inputs["0"]


# -- item 13: state restored whatever the exit order --------------------------------------------------------------

def test_captures_exited_out_of_order_restore_dynamos_flag():
    import torch._dynamo.config as config

    model = small()
    before = hook_census(model)
    a = hookkit.capture(model, ["0"])  # the with blocks, entered and exited by hand
    b = hookkit.capture(model, ["2"])
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert config.skip_nnmodule_hook_guards is False  # b is still open: compiled code must still see hooks
    b.__exit__(None, None, None)
    assert config.skip_nnmodule_hook_guards is True
    assert hook_census(model) == before


def test_hooks_blocks_exited_out_of_order_restore_the_full_backward_flag():
    model = small()
    before = hook_census(model)
    first = hookkit.hooks(model, backward={"0": lambda *a: None}).__enter__()
    second = hookkit.hooks(model, backward={"0": lambda *a: None}).__enter__()
    first.remove()
    assert model[0]._is_full_backward_hook is True  # second still hooked
    second.remove()
    assert model[0]._is_full_backward_hook is None
    assert hook_census(model) == before
    model[0].register_backward_hook(lambda *a: None).remove()  # torch would refuse this with the flag left True


def test_a_users_own_full_backward_hook_keeps_its_flag():
    model = small()
    mine = model[0].register_full_backward_hook(lambda *a: None)
    with hookkit.hooks(model, backward={"0": lambda *a: None}):
        pass
    assert model[0]._is_full_backward_hook is True
    mine.remove()


LAYERS = ["fc1", "fc2", "relu", "head"]
block = st.fixed_dictionaries({
    "kind": st.sampled_from(["capture", "hooks", "trace", "check_finite"]),
    "layers": st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True),
    "grads": st.booleans(),
    "inputs": st.booleans(),
})


def _open(model: nn.Module, b: dict) -> object:
    if b["kind"] == "capture":
        ctx = hookkit.capture(model, b["layers"], grads=b["grads"], inputs=b["inputs"], param_grads=b["inputs"])
    elif b["kind"] == "trace":
        ctx = hookkit.trace(model, b["layers"], console=quiet(), backward=b["grads"])
    elif b["kind"] == "check_finite":
        ctx = hookkit.check_finite(model, b["layers"], backward=b["grads"])
    else:
        ctx = hookkit.hooks(model, forward={n: (lambda *a: None) for n in b["layers"]},
                            backward={b["layers"][0]: lambda *a: None},
                            backward_pre={b["layers"][-1]: lambda *a: None})
    ctx.__enter__()
    return ctx


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, min_size=2, max_size=5), order_seed=st.integers(0, 2**16),
       backward=st.booleans(), run_between=st.booleans())
def test_blocks_exited_in_any_order_leave_the_census_unchanged(blocks, order_seed, backward, run_between):
    model = SharedReLU()
    model.train()
    keep = model.fc2.register_forward_hook(lambda *a: None)  # a user's own hook survives
    before = hook_census(model)
    opened = [_open(model, b) for b in blocks]
    y = model(torch.randn(2, 6))
    if backward:
        y.sum().backward()
    order = list(range(len(opened)))
    random.Random(order_seed).shuffle(order)
    for k, i in enumerate(order):
        opened[i].__exit__(None, None, None)
        if run_between and k < len(order) - 1:
            hookkit.extract(model, ["fc1"], [torch.randn(2, 6)], progress=False)  # flips and restores modes
            model(torch.randn(2, 6)).sum().backward()
    assert hook_census(model) == before
    keep.remove()


def test_the_census_sees_what_it_claims_to():
    """The census is only worth its name if each thing it checks, changed, makes it differ."""
    import torch._dynamo.config as config

    model = SharedReLU()
    before = hook_census(model)
    changes = [
        lambda: model.fc1.register_state_dict_pre_hook(lambda *a: None),
        lambda: model.fc1.register_load_state_dict_post_hook(lambda *a: None),
        lambda: model.fc1.weight.register_post_accumulate_grad_hook(lambda p: None),
        lambda: model.fc1.weight.register_hook(lambda g: None),
        lambda: nn.modules.module.register_module_forward_hook(lambda *a: None),
        lambda: nn.modules.module.register_module_buffer_registration_hook(lambda *a: None),
    ]
    for change in changes:
        handle = change()
        assert hook_census(model) != before
        handle.remove()
        assert hook_census(model) == before
    model.fc1.train(False)
    assert hook_census(model) != before
    model.fc1.train(True)
    model.fc1._is_full_backward_hook = True
    assert hook_census(model) != before
    model.fc1._is_full_backward_hook = None
    config.skip_nnmodule_hook_guards = not config.skip_nnmodule_hook_guards
    assert hook_census(model) != before
    config.skip_nnmodule_hook_guards = not config.skip_nnmodule_hook_guards
    assert hook_census(model) == before


# -- item 14: results never hold the model ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["trace", "check_finite", "check_finite_raising", "capture"])
def test_results_do_not_keep_the_traced_modules_alive(kind):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.LogSigmoid())
    refs = [weakref.ref(m) for m in model.modules()]
    x = torch.ones(1, 2) if kind != "check_finite_raising" else torch.tensor([[float("inf"), 1.0]])
    if kind == "trace":
        result = hookkit.trace(model, console=quiet())
    elif kind == "capture":
        result = hookkit.capture(model, ["0", "2"], inputs=True, grads=True)
    else:
        result = hookkit.check_finite(model)
    try:
        with result:
            model(x).sum().backward()
    except hookkit.NonFiniteError:
        pass
    del model
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert result is not None  # the result is still alive, and held nothing


# -- item 15: values that cannot be snapshotted --------------------------------------------------------------------

class Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class BoxOut(nn.Module):
    def forward(self, x):
        return Box(x * 2)


class SetOut(nn.Module):
    def forward(self, x):
        return {x * 2}


class MixedOut(nn.Module):
    def forward(self, x):
        return {"y": x * 2, "box": Box(x), "tags": {"a", "b"}, "kind": "static", "n": 3}


class Unbox(nn.Module):
    def forward(self, box):
        return box.t + 1


@pytest.mark.parametrize("module, type_name", [(BoxOut(), "Box"), (SetOut(), "set")])
def test_an_output_hookkit_cannot_walk_is_refused_by_layer_and_type(module, type_name):
    model = nn.Sequential(nn.Linear(2, 2), module)
    with hookkit.capture(model, ["1"]) as cap:
        out = model(torch.ones(1, 2))
    with pytest.raises(hookkit.NotRecordedError, match=rf"output of '1' is a .*{type_name}.*cannot snapshot"):
        cap["1"]
    assert out is not None  # the forward itself ran as usual


def test_walkable_parts_are_stored_and_the_rest_is_marked():
    model = nn.Sequential(nn.Linear(2, 2), MixedOut())
    with hookkit.capture(model, ["1"]) as cap:
        out = model(torch.ones(1, 2))
    stored = cap["1"]
    torch.testing.assert_close(stored["y"], out["y"].detach())
    assert not stored["y"].requires_grad
    assert stored["tags"] == {"a", "b"} and stored["tags"] is not out["tags"]
    assert stored["kind"] == "static" and stored["n"] == 3
    assert "not stored" in repr(stored["box"]) and "Box" in repr(stored["box"])
    assert type(stored["box"]).__name__ == "NotStored"


def test_an_input_hookkit_cannot_walk_is_refused_by_name():
    model = nn.Sequential(Unbox())
    with hookkit.capture(model, ["0"], inputs=True) as cap:
        model(Box(torch.ones(2)))
    with pytest.raises(hookkit.NotRecordedError, match=r"input of '0' is a .*Box"):
        cap.inputs["0"]


def test_a_numpy_array_in_an_output_is_copied():
    np = pytest.importorskip("numpy")

    class NumpyOut(nn.Module):
        def forward(self, x):
            self.arr = np.ones(3)
            return x, self.arr

    model = nn.Sequential(NumpyOut())
    with hookkit.capture(model, ["0"]) as cap:
        model(torch.ones(1))
    model[0].arr[:] = 5
    assert cap["0"][1].tolist() == [1.0, 1.0, 1.0]


# -- item 17: a module that calls itself and catches a failing inner call -------------------------------------------

class Retry(nn.Module):
    """Tries itself on a scaled input first; the inner call fails and is caught (a retry / fallback pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, inner: bool = False):
        if inner:
            raise ValueError("inner attempt fails")
        with contextlib.suppress(ValueError):
            self(x * 100, inner=True)
        return self.lin(x)


def test_inputs_pair_with_their_own_outputs_after_a_failed_inner_call():
    model = nn.Sequential(Retry())
    x = torch.ones(1, 2)
    with hookkit.capture(model, ["0"], inputs=True, grads=True) as cap:
        y = model(x)
        y.sum().backward()
    assert len(cap.calls("0")) == 1  # the failed call produced nothing
    torch.testing.assert_close(cap.inputs["0"], x)
    torch.testing.assert_close(cap["0"], y.detach())
    torch.testing.assert_close(cap.grads["0"], torch.ones_like(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hookkit.trace(model, console=quiet(), backward=False) as t:
            model(x)
    assert [(e.kind, e.name) for e in t.events if e.name == "0"][-1] == ("forward", "0")


# -- trace on a model without submodules ----------------------------------------------------------------------------

def test_trace_and_check_finite_of_a_model_without_submodules_watch_the_model_itself():
    model = nn.Linear(2, 2)
    with hookkit.trace(model, console=quiet()) as t:
        model(torch.ones(1, 2)).sum().backward()
    assert [e.kind for e in t.events] == ["forward_pre", "forward", "grad_output", "grad_input"]
    assert "(model) Linear out" in t.events[1].line().plain
    leaf = nn.Softplus()
    with pytest.raises(hookkit.NonFiniteError, match=r"\(Softplus\) produced 1 NaN"):
        with hookkit.check_finite(leaf):
            leaf(torch.tensor([float("nan")]))


# -- the README's limit of in-place detection ------------------------------------------------------------------------

def test_writes_torch_does_not_count_are_not_detected_and_clone_is_the_way_out():
    """README: writes through ``.data`` or a numpy view do not bump the version counter, so they cannot be
    detected; ``clone=True`` is the way out. This pins both halves of that sentence."""
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin)
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = lin(x).clone()
    with hookkit.capture(model, ["0"]) as plain, hookkit.capture(model, ["0"], clone=True) as copied:
        out = model(x)
        out.data.mul_(0)  # not counted by torch
    assert out._version == 0
    torch.testing.assert_close(plain["0"], torch.zeros_like(expected))  # followed the write, undetectably
    torch.testing.assert_close(copied["0"], expected)
    with torch.no_grad(), hookkit.capture(model, ["0"]) as plain, hookkit.capture(model, ["0"], clone=True) as copied:
        out = model(x)
        out.numpy()[:] = 7.0
    torch.testing.assert_close(plain["0"], torch.full_like(expected, 7.0))
    torch.testing.assert_close(copied["0"], expected)
