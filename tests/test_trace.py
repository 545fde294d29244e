"""trace() and check_finite(): readable hook traces and the first non-finite module."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import hookkit

from _optional import needs_torchvision, torchvision
from conftest import SharedReLU, hook_census


def plain_console(width: int = 120) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)


class ExactNet(nn.Module):
    """Small integer weights and inputs: every value is exact in float32, so the golden text cannot drift with
    the CPU's summation order. Has a nested block, a reused ReLU and a tuple output with None."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.relu = nn.ReLU()
        self.split = Split()
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(torch.arange(p.numel()).reshape(p.shape).float().remainder(5) - 2 + (i % 2))

    def forward(self, x):
        h = self.relu(self.fc1(x))
        h = self.relu(self.block(h) - 3)
        a, none = self.split(h)
        return self.head(a)


class Split(nn.Module):
    def forward(self, x):
        return x[:, :2] * 2, None


def exact_input() -> torch.Tensor:
    return torch.tensor([[1.0, -2.0, 3.0], [0.0, 1.0, -1.0]])


def test_golden_trace_forward_and_backward(golden):
    model = ExactNet()
    x = exact_input().requires_grad_()
    out = plain_console()
    with hookkit.trace(model, console=out):
        model(x).sum().backward()
    golden("trace_exactnet.txt", out.file.getvalue())


def test_events_are_kept_as_data_with_calls_and_depth():
    model = ExactNet()
    with hookkit.trace(model, console=plain_console()) as t:
        model(exact_input()).sum().backward()
    fwd = [(e.name, e.call, e.depth) for e in t.events if e.kind == "forward"]
    assert fwd == [("fc1", 0, 0), ("relu", 0, 0), ("block.0", 0, 1), ("block.1", 0, 1), ("block", 0, 0),
                   ("relu", 1, 0), ("split", 0, 0), ("head", 0, 0)]
    split = next(e for e in t.events if e.kind == "forward" and e.name == "split")
    assert split.text.startswith("(f32[2, 2]") and split.text.endswith(", None)")
    grads = [(e.kind, e.name, e.call) for e in t.events if e.kind.startswith("grad")]
    # backward runs in reverse; fc1's input needs no grad, which the trace says once (the lecture's None)
    assert grads[0] == ("grad_output", "head", 0)
    assert grads[-2:] == [("grad_output", "fc1", 0), ("grad_input", "fc1", 0)]
    none_line = [e for e in t.events if e.kind == "grad_input" and e.name == "fc1"]
    assert none_line[0].text == "None" and none_line[0].stats == ()


def test_trace_statistics_match_torch_and_keep_no_tensors():
    model = SharedReLU()
    x = torch.randn(4, 6)
    with hookkit.trace(model, ["fc1"], console=plain_console()) as t:
        y = model(x)
    (out,) = [e for e in t.events if e.kind == "forward"]
    s = out.stats[0]
    ref = model.fc1(x).detach()
    assert s.shape == (4, 6) and s.nan == 0
    assert s.mean == pytest.approx(ref.mean().item(), rel=1e-5)
    assert s.std == pytest.approx(ref.std().item(), rel=1e-5)
    assert (s.min, s.max) == (ref.min().item(), ref.max().item())
    assert not any(isinstance(v, torch.Tensor) for e in t.events for v in vars(e).values())
    assert y.requires_grad


@needs_torchvision
def test_tracing_does_not_change_results_or_gradients():
    model = torchvision.models.resnet18()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with hookkit.trace(model, console=plain_console()):
        y = model(x)
        y.pow(2).sum().backward()
    y2 = twin(x)
    y2.pow(2).sum().backward()
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@needs_torchvision
def test_resnet50_forward_backward_trace_is_readable_at_120_columns():
    model = torchvision.models.resnet50()
    out = plain_console(120)
    before = hook_census(model)
    with hookkit.trace(model, console=out) as t:
        model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert hook_census(model) == before
    lines = out.file.getvalue().splitlines()
    assert len(lines) == len(t.events) > 600  # one line per event, no wrapping
    assert max(len(line) for line in lines) <= 120
    assert any("layer4.2.conv3 Conv2d out: f32[1, 2048, 2, 2]" in line for line in lines)


def test_long_names_are_shortened_in_the_middle():
    inner = nn.Linear(2, 2)
    model = nn.Sequential()
    deep = model
    for part in ["encoder", "layers", "seventeen", "attention_block", "output_projection_stack"]:
        child = nn.Sequential()
        deep.add_module(part, child)
        deep = child
    deep.add_module("dense", inner)
    out = plain_console(120)
    with hookkit.trace(model, [inner], console=out):
        model(torch.ones(1, 2))
    text = out.file.getvalue()
    assert "encoder.….output_projection_stack.dense Linear out" in text


def test_trace_removes_hooks_on_error_and_rejects_bad_names():
    model = SharedReLU()
    before = hook_census(model)
    with pytest.raises(ValueError), hookkit.trace(model, console=plain_console()):
        model(torch.randn(1, 6))
        raise ValueError("boom")
    assert hook_census(model) == before
    with pytest.raises(LookupError, match="fc3.*layer_names"):
        hookkit.trace(model, ["fc3"])
    assert hook_census(model) == before


def test_trace_without_backward_or_inputs_or_stats():
    model = SharedReLU()
    with hookkit.trace(model, console=plain_console(), backward=False, inputs=False, stats=False) as t:
        model(torch.randn(1, 6)).sum().backward()
    assert {e.kind for e in t.events} == {"forward"}
    assert all("μ" not in e.text for e in t.events)


# -- check_finite ----------------------------------------------------------------------------------------------------

class GoesNaNDeepInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.body = nn.Sequential(nn.Linear(8, 8), LogOfNegative(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class LogOfNegative(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN wherever x < 0


def test_check_finite_names_the_first_module_with_nan_in_forward():
    model = GoesNaNDeepInside()
    before = hook_census(model)
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model):
        model(torch.randn(16, 4))
    # the op inside the module's forward that made them, and the module it is in
    assert (info.value.layer, info.value.phase) == ("body.1.log", "forward")
    assert str(info.value).startswith("'body.1.log' (torch.log) in 'body.1' (LogOfNegative) produced ")
    assert "its inputs were finite" in str(info.value)
    assert hook_census(model) == before
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=False):
        model(torch.randn(16, 4))
    err = info.value
    assert (err.layer, err.phase, err.call) == ("body.1", "forward", 0)
    msg = str(err)
    assert "'body.1' (LogOfNegative) produced" in msg and "NaN of 128 values" in msg
    assert "input f32[16, 8]" in msg and "Its input was finite" in msg
    assert err.stats.nan > 0
    assert isinstance(err, hookkit.HookkitError) and isinstance(err, FloatingPointError)
    assert hook_census(model) == before  # left as it was found


def test_check_finite_blames_the_data_when_the_input_is_already_bad():
    model = GoesNaNDeepInside()
    x = torch.randn(2, 4)
    x[0, 0] = float("nan")
    with pytest.raises(hookkit.NonFiniteError, match="'stem.0' .*upstream of every checked module"):
        with hookkit.check_finite(model):
            model(x)


class SqrtAtZero(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)  # finite forward at 0, infinite gradient


def test_check_finite_in_backward_names_the_module_whose_input_gradient_goes_bad():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), SqrtAtZero(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
        model[0].bias.zero_()
    x = torch.ones(2, 3)  # every ReLU output is 0: sqrt'(0) = inf
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=False):
        model(x).sum().backward()
    err = info.value
    assert (err.layer, err.phase) == ("2", "backward")
    assert "from a finite gradient at its output" in str(err)
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model):  # ops=True: the op inside
        model(x).sum().backward()
    assert (info.value.layer, info.value.phase) == ("2.sqrt", "backward")


def test_check_finite_says_when_the_gradient_arrives_already_bad():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with pytest.raises(hookkit.NonFiniteError, match="'1' .*arriving at its output.*outside the checked modules"):
        with hookkit.check_finite(model):
            (model(torch.ones(1, 3)) * float("inf")).sum().backward()


@needs_torchvision
def test_check_finite_is_silent_on_a_healthy_model_and_leaves_no_hooks():
    model = torchvision.models.resnet18()
    before = hook_census(model)
    with hookkit.check_finite(model):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert hook_census(model) == before


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_detect_anomaly_blames_a_backward_op_where_check_finite_names_the_module():
    """What the README compares: anomaly mode only looks at backward and names the first op whose gradient is NaN
    (here the head's matmul, far from the cause); check_finite names the module that made the NaN, in forward."""
    model = GoesNaNDeepInside()
    x = torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="Function 'AddmmBackward0' returned nan values"):
        with torch.autograd.detect_anomaly():
            model(x).sum().backward()
    with pytest.raises(hookkit.NonFiniteError, match="'body.1' \\(LogOfNegative\\) produced"):
        with hookkit.check_finite(model):
            model(x).sum().backward()


def test_check_finite_catches_inf_gradients_that_anomaly_mode_ignores():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), SqrtAtZero(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
        model[0].bias.zero_()
    with torch.autograd.detect_anomaly():  # Inf (not NaN), then masked to 0 by ReLU's backward: no complaint
        model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(hookkit.NonFiniteError,
                       match="'2.sqrt' \\(torch.sqrt\\) in '2' \\(SqrtAtZero\\) made 6 Inf of 6 values in backward"):
        with hookkit.check_finite(model):
            model(torch.ones(2, 3)).sum().backward()


class SqrtOfZeroBlock(nn.Module):
    """``torch.sqrt(h * 0) + h``: finite forward; sqrt's backward makes Inf (d sqrt(u)/du at u = 0), and with
    ``times_zero`` the Inf is multiplied by the zero gradient arriving at sqrt: NaN."""

    def __init__(self, times_zero: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.times_zero = times_zero

    def forward(self, x):
        h = self.lin(x)
        r = torch.sqrt(h * 0)
        return (r * 0 if self.times_zero else r) + h


def sqrt_of_zero_model(times_zero: bool = False, *, first: bool = False) -> nn.Module:
    if first:
        return nn.Sequential(SqrtOfZeroBlock(times_zero), nn.Linear(4, 1))
    return nn.Sequential(nn.Linear(4, 4), SqrtOfZeroBlock(times_zero), nn.Linear(4, 1))


def first_node_that_goes_non_finite(loss: torch.Tensor) -> str:
    """torch's own answer: hook every autograd node of the graph, run backward, and return the name of the first
    node to run whose incoming gradients were finite and whose outgoing ones were not."""
    found: list[str] = []
    handles = []

    def finite(ts) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)

    def hook(node):
        def on_run(grad_inputs, grad_outputs):
            if not found and finite(grad_outputs) and not finite(grad_inputs):
                found.append(node.name())
        return on_run

    todo, seen = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        handles.append(node.register_hook(hook(node)))
        todo.extend(n for n, _ in node.next_functions)
    loss.backward()
    for h in handles:
        h.remove()
    return found[0]


def first_module_that_goes_non_finite(model: nn.Module, x: torch.Tensor) -> str:
    """torch's own answer for modules: full backward hooks on every submodule; the first module whose
    grad_output was finite and whose grad_input is not (or, with no input gradient, whose children's was)."""
    seen: list[tuple[str, bool, bool]] = []
    handles = []

    def finite(ts) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_full_backward_hook(
                lambda m, gi, go, name=name: seen.append((name, finite(go), finite(gi)))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Full backward hook is firing when ... no inputs require"
        model(x).sum().backward()
    for h in handles:
        h.remove()
    return next(name for name, out_ok, in_ok in seen if out_ok and not in_ok)


@pytest.mark.parametrize("times_zero", [False, True], ids=["inf", "nan"])
def test_check_finite_names_the_op_whose_backward_made_the_gradient_non_finite(times_zero):
    model = sqrt_of_zero_model(times_zero)
    x = torch.randn(2, 4)
    guilty = first_node_that_goes_non_finite(model(x).sum())
    assert guilty == "SqrtBackward0"
    if times_zero:  # NaN: anomaly mode names the same op
        with pytest.raises(RuntimeError, match="Function 'SqrtBackward0' returned nan values"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "Anomaly Detection has been enabled"
                with torch.autograd.detect_anomaly():
                    model(x).sum().backward()
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=True):
        model(x).sum().backward()
    err = info.value
    assert (err.layer, err.phase, err.call) == ("1.sqrt", "backward", 0)
    bad = "NaN" if times_zero else "Inf"
    assert str(err).startswith(f"'1.sqrt' (torch.sqrt) in '1' (SqrtOfZeroBlock) made 8 {bad} of 8 values in backward")
    assert "the gradient arriving at its output was finite" in str(err)
    assert "outside the checked modules" not in str(err)
    # the stats are those of the gradient sqrt's backward passed on, as torch computes it (at h * 0 = 0)
    u = torch.zeros(2, 4, requires_grad=True)
    (g,) = torch.autograd.grad(torch.sqrt(u), u, torch.zeros(2, 4) if times_zero else torch.ones(2, 4))
    assert (err.stats.shape, err.stats.nan, err.stats.inf) == (
        tuple(g.shape), int(g.isnan().sum()), int(g.isinf().sum()))
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth


@pytest.mark.parametrize("first", [False, True], ids=["middle", "first"])
def test_check_finite_without_ops_names_the_module_whose_backward_made_the_gradient_non_finite(first):
    model = sqrt_of_zero_model(first=first)
    x = torch.randn(2, 4)
    name = "0" if first else "1"
    if not first:  # torch's full backward hooks agree (the first block's input needs no gradient: no grad_input)
        assert first_module_that_goes_non_finite(model, x) == name
    before = hook_census(model)
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=False):
        model(x).sum().backward()
    err = info.value
    assert (err.layer, err.phase, err.call) == (name, "backward", 0)
    assert str(err).startswith(f"'{name}' (SqrtOfZeroBlock) made 8 NaN of 8 values in backward")
    assert f"back to the output of '{name}.lin' (Linear)" in str(err)
    assert "outside the checked modules" not in str(err)
    assert (err.stats.nan, err.stats.shape) == (8, (2, 4))
    assert hook_census(model) == before


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: an op no function mode sees."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class UnseenOpBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        # .contiguous() returns its (contiguous) input itself, InfGradient's autograd node included: its backward
        # is not contiguous's
        return InfGradient.apply(self.lin(x)).contiguous() + 1


@pytest.mark.parametrize("ops", [True, False])
def test_check_finite_blames_the_module_around_an_op_it_cannot_see(ops):
    model = nn.Sequential(nn.Linear(4, 4), UnseenOpBlock(), nn.Linear(4, 1))
    assert first_node_that_goes_non_finite(model(torch.randn(2, 4)).sum()) == "InfGradientBackward"
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=ops):
        model(torch.randn(2, 4)).sum().backward()
    err = info.value
    assert (err.layer, err.phase, err.call) == ("1", "backward", 0)
    assert str(err).startswith("'1' (UnseenOpBlock) made 8 Inf of 8 values in backward")
    assert ("does not see (such as a custom autograd.Function)" if ops else "check_finite(ops=True) names it") in str(
        err)


class HealthyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return torch.relu(h) + h


@pytest.mark.parametrize("ops", [True, False])
def test_check_finite_still_says_a_non_finite_loss_comes_from_outside(ops):
    model = nn.Sequential(nn.Linear(4, 4), HealthyBlock(), nn.Linear(4, 1))
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=ops):
        (model(torch.randn(2, 4)) * float("inf")).sum().backward()
    err = info.value
    assert (err.layer, err.phase, err.call) == ("2", "backward", 0)
    assert "arriving at its output is already non-finite" in str(err) and "outside the checked modules" in str(err)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "120", "PATH": "", "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_example_trace_simplenet_shows_conv1_grad_input_none():
    out = run_example("trace_simplenet.py")
    assert "conv1 Conv2d grad_input: None" in out
    assert "hooks left on the model: 0" in out


def test_example_find_nan_finds_the_block_and_shows_what_anomaly_mode_says():
    out = run_example("find_nan.py")
    assert "NonFiniteError" in out and "layer='2.sqrt' phase='forward'" in out
    assert "'2.sqrt' (torch.sqrt) in '2' (Block) produced" in out and "its inputs were finite" in out
    assert "LogsumexpBackward0" in out


def test_check_finite_sees_a_parent_that_changes_its_childs_output_in_place():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.child = nn.Linear(2, 2)

        def forward(self, x):
            y = self.child(x)
            y.mul_(float("inf"))  # the same tensor object the child returned, now non-finite
            return y

    model = nn.Sequential(Parent())
    with pytest.raises(hookkit.NonFiniteError, match="'0' \\(Parent\\) produced"):
        with torch.no_grad(), hookkit.check_finite(model):
            model(torch.ones(1, 2))


class ThresholdTwice(nn.Module):
    """One leaf module run twice per forward; Threshold(0, nan) turns every value <= 0 into NaN, so only the second
    call (on a negative input) makes NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Threshold(0.0, float("nan"))

    def forward(self, x):
        return self.act(-self.act(x.abs() + 1))


def test_trace_names_each_call_within_its_forward_as_capture_and_layer_names_do():
    model, x = SharedReLU(), torch.randn(3, 6)
    before, stack = hook_census(model), torch._C._len_torch_function_stack()
    with hookkit.trace(model, console=plain_console(), inputs=False, backward=False) as t:
        model(x)
        model(x)
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == stack
    out = t.events
    lines = [e.line().plain.split()[1] for e in out if e.name == "relu"]
    assert lines == ["relu", "relu_1", "relu_2"] * 2  # counted per forward of the model, not over the block
    assert [e.call for e in out if e.name == "relu"] == [0, 1, 2] * 2
    assert {"relu_1", "relu_2"} <= set(hookkit.layer_names(model, x))


def test_check_finite_names_a_later_call_of_a_module_as_fx_does():
    model = ThresholdTwice()
    x = torch.randn(2, 3)
    assert "act_1" in hookkit.layer_names(model, x)
    before = hook_census(model)
    with pytest.raises(hookkit.NonFiniteError) as info, hookkit.check_finite(model, ops=False):
        model(x)
    assert hook_census(model) == before
    err = info.value
    assert (err.layer, err.phase, err.call) == ("act", "forward", 1)
    assert str(err).startswith("'act_1' (Threshold) produced 6 NaN of 6 values in forward;")
    with pytest.warns(UserWarning, match=r"step 0: 'act_1' produced NaN or Inf in forward, the first"):
        with hookkit.monitor(model, ["act"], every=100, summary=False) as mon:
            model(x)
            mon.step()
    assert hook_census(model) == before


def test_trace_and_check_finite_show_only_their_user_api_not_the_engines_listener_methods():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    listener = {"forward_pre", "forward", "grad"}
    for cls in (hookkit.Trace, hookkit.CheckFinite):
        assert not listener & set(dir(cls)), f"{cls.__name__} shows the engine's listener methods"
    with hookkit.trace(model, console=plain_console()) as t:
        model(torch.ones(1, 2))
    assert [n for n in dir(t) if not n.startswith("_")] == ["events"] and len(t.events) == 4
    with hookkit.check_finite(model) as c:
        model(torch.ones(1, 2))
    assert [n for n in dir(c) if not n.startswith("_")] == []
