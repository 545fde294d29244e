"""Op and repeated-call nodes (``"add"``, ``"layer1.0.relu_1"``) through the public API, against torch itself:
values equal the ops computed by hand, gradients equal ``torch.autograd.grad``, every hook and function mode comes
off. (The comparison with torchvision's FX extractor on its own models is tests/test_op_nodes_fx.py.)"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

import hookkit

from conftest import hook_census


def modes() -> int:
    return torch._C._len_torch_function_stack()


class Net(nn.Module):
    """Functional ops between modules, a leaf module called twice, and `+=`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        y = h * x
        z = F.relu(y) + h
        z += 1
        z = self.act(self.act(z) - 0.5)
        return self.fc2(z).flatten(1)


def reference(m: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same forward written out by hand, each value kept by name."""
    v: dict[str, torch.Tensor] = {}
    h = m.fc(x)
    v["mul"] = y = h * x
    v["relu"] = r = F.relu(y)
    v["add"] = z = r + h
    v["add_1"] = z = z + 1
    v["act"] = z = torch.relu(z)  # the first call of the module `act`
    v["sub"] = z = z - 0.5
    v["act_1"] = z = torch.relu(z)  # its second call
    v["flatten"] = m.fc2(z).flatten(1)
    return v


def test_layer_names_with_an_input_lists_modules_ops_and_repeated_calls_in_execution_order():
    m = Net()
    assert hookkit.layer_names(m, torch.randn(3, 4)) == [
        "fc", "mul", "relu", "add", "add_1", "act", "sub", "act_1", "fc2", "flatten"]
    assert hookkit.layer_names(m) == ["fc", "act", "fc2"]  # without an input: the modules, as before


class SameName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.relu(F.relu(x - 1) + 1) - 2)


def test_a_leaf_module_and_an_op_of_the_same_name_share_one_counter_and_the_module_name_keeps_meaning_the_module():
    """As in torchvision's FX names, F.relu is "relu" and the module's calls are "relu_1", "relu_2"; hookkit's
    module name "relu" still means the module (all its calls), so FX's functional "relu" has no name here."""
    m = SameName()
    x = torch.randn(2, 5)
    assert hookkit.layer_names(m, x) == ["sub", "relu", "add", "relu_1", "sub_1", "relu_2"]
    seen: list[torch.Tensor] = []
    h = m.relu.register_forward_hook(lambda mod, a, o: seen.append(o.clone()))
    with hookkit.capture(m, ["relu", "relu_1", "relu_2"]) as cap:
        m(x)
    h.remove()
    torch.testing.assert_close(cap["relu_1"], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(cap["relu_2"], seen[1], rtol=0, atol=0)
    assert len(cap.calls("relu")) == 2  # the module, both calls


def test_layer_names_restores_mode_and_rng_and_keeps_no_graph():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    x = torch.randn(2, 4, requires_grad=True)
    torch.manual_seed(3)
    assert hookkit.layer_names(m, x) == ["0", "1"]
    assert m.training and all(c.training for c in m)
    assert torch.equal(torch.rand(5), expected)  # the run's dropout did not move the user's random stream
    assert x.grad is None and modes() == 0


def test_layer_names_gives_every_module_back_its_own_mode_a_frozen_batchnorm_stays_in_eval():
    """A model trained with one BatchNorm frozen in eval (fine-tuning): discovery runs the model as it is and puts
    each module's own flag back, not the root's flag on every module; and a BatchNorm in train mode gets its running
    statistics back (the run updated them, under no_grad too)."""
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)),
                      nn.BatchNorm1d(2)).train()
    m[1].eval()  # frozen: its running statistics are not updated
    m[2][1].eval()  # a flag deep inside, differing from its parent's
    flags = [mod.training for mod in m.modules()]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    before = hook_census(m)
    assert hookkit.layer_names(m, torch.randn(3, 4)) == ["0", "1", "2", "2.0", "2.1", "3"]
    assert [mod.training for mod in m.modules()] == flags
    assert hook_census(m) == before  # the census holds every module's training flag
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())  # running_mean, num_batches_tracked
    m.eval()
    m[2].train()  # and the other way round: an eval model with a part in train mode
    flags = [mod.training for mod in m.modules()]
    hookkit.layer_names(m, torch.randn(3, 4))
    assert [mod.training for mod in m.modules()] == flags


def test_op_node_values_equal_the_ops_computed_by_hand_and_the_blocks_leave_nothing_behind():
    torch.manual_seed(0)
    m, x = Net(), torch.randn(3, 4)
    ref = reference(m, x)
    names = ["mul", "relu", "add", "add_1", "sub", "act_1", "flatten"]
    before = hook_census(m)
    with torch.no_grad(), hookkit.capture(m, names) as cap:
        m(x)
    assert hook_census(m) == before
    for n in names:
        torch.testing.assert_close(cap[n], ref[n], rtol=0, atol=0, msg=n)
    assert list(cap) == names  # in order of first call


def test_repeated_call_node_is_that_call_of_the_leaf_module():
    m, x = Net(), torch.randn(3, 4)
    seen: list[torch.Tensor] = []
    h = m.act.register_forward_hook(lambda mod, a, o: seen.append(o.clone()))
    with hookkit.capture(m, ["act_1", "act"]) as cap:
        m(x)
    h.remove()
    torch.testing.assert_close(cap["act_1"], seen[1], rtol=0, atol=0)  # the module's second call
    assert len(cap.calls("act")) == 2 and len(cap.calls("act_1")) == 1


def test_op_node_calls_are_one_per_forward_of_the_model():
    m = Net()
    xs = [torch.randn(3, 4) for _ in range(3)]
    with hookkit.capture(m, ["add_1"]) as cap:
        for x in xs:
            m(x)
    calls = cap.calls("add_1")
    assert len(calls) == 3
    for got, x in zip(calls, xs, strict=True):
        torch.testing.assert_close(got, reference(m, x)["add_1"], rtol=0, atol=0)


def test_op_node_inputs_grads_and_grad_inputs_equal_autograd():
    torch.manual_seed(1)
    m = Net()
    x = torch.randn(3, 4, requires_grad=True)
    with hookkit.capture(m, ["mul", "add", "relu"], inputs=True, grads=True) as cap:
        m(x).sum().backward()
    h = m.fc(x)
    y = h * x
    r = F.relu(y)
    z = r + h
    loss = m.fc2(torch.relu(torch.relu(z + 1) - 0.5)).flatten(1).sum()  # the rest of Net.forward
    gy, gr, gz = torch.autograd.grad(loss, [y, r, z])
    torch.testing.assert_close(cap.grads["mul"], gy)
    torch.testing.assert_close(cap.grads["relu"], gr)
    torch.testing.assert_close(cap.grads["add"], gz)
    # grad_inputs: this op's share of the gradient of each input (h also reaches the loss through `add`)
    g_h, g_x = cap.grad_inputs["mul"]
    torch.testing.assert_close(g_h, gy * x)
    torch.testing.assert_close(g_x, gy * h)
    a, b = cap.inputs["mul"]
    torch.testing.assert_close(a, h.detach())
    torch.testing.assert_close(b, x.detach())
    assert x.grad is not None  # the user's backward ran as usual


def test_stop_ends_the_forward_once_every_op_node_ran():
    m = Net()
    reached: list[str] = []
    before = hook_census(m)
    h = m.fc2.register_forward_pre_hook(lambda mod, a: reached.append("fc2"))
    with hookkit.capture(m, ["fc", "add"], stop=True) as cap:
        m(torch.randn(3, 4))
        reached.append("after")
    h.remove()
    assert reached == [] and list(cap) == ["fc", "add"]
    assert modes() == 0
    assert hook_census(m) == before


def test_to_moves_op_node_values():
    m = Net()
    with hookkit.capture(m, ["mul"], to=torch.float64) as cap:
        m(torch.randn(3, 4))
    assert cap["mul"].dtype == torch.float64


def test_op_looking_names_that_match_nothing_get_close_matches_and_the_discovery_call():
    m = Net()
    with pytest.raises(hookkit.LayerNotFoundError, match=r"'mull'.*Did you mean one of the op nodes 'mul', 'mul_' \(a "
                       r"node only if the forward calls those torch functions\)\?.*layer_names\(model, "):
        hookkit.capture(m, ["mull"])
    with pytest.raises(hookkit.LayerNotFoundError, match=r"ops inside torch's own modules .* not nodes"):
        hookkit.capture(m, ["fc.linear"])
    with hookkit.capture(m, ["sigmoid"]) as cap:  # a real op name that never runs in this model
        m(torch.randn(3, 4))
    with pytest.raises(hookkit.NotRecordedError, match="'sigmoid' never ran"):
        cap["sigmoid"]


class Branchy(nn.Module):
    """Data-dependent control flow: torchvision's FX extractor cannot trace this; names come from the run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # noqa: SIM108  (a branch, as users write it)
            y = torch.sigmoid(y) * 2
        else:
            y = torch.tanh(y)
        return y + 1


def test_data_dependent_control_flow_is_named_by_the_same_rule_at_run_time():
    m = Branchy()
    with torch.no_grad():
        m.conv.bias.fill_(5.0)  # sum > 0: the first branch
    x = torch.rand(1, 1, 4, 4)
    # `if t > 0:` calls Tensor.__bool__, an op like any other ("bool")
    assert hookkit.layer_names(m, x) == ["conv", "sum", "gt", "bool", "sigmoid", "mul", "add"]
    with hookkit.capture(m, ["mul", "add"]) as cap:
        out = m(x)
    torch.testing.assert_close(cap["add"], out, rtol=0, atol=0)
    torch.testing.assert_close(cap["mul"], out - 1)
    with torch.no_grad():
        m.conv.bias.fill_(-5.0)
    assert hookkit.layer_names(m, x) == ["conv", "sum", "gt", "bool", "tanh", "add"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 32)

    def forward(self, x):
        return torch.sqrt(self.lin(x)).relu()


def test_check_finite_names_the_op_and_its_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), Block())
    x = torch.randn(16, 16)
    with pytest.raises(hookkit.NonFiniteError, match=r"^'2\.sqrt' \(torch\.sqrt\) in '2' \(Block\) produced \d+ NaN "
                       r"of 512 values in forward; its inputs were finite") as info:
        with hookkit.check_finite(m):
            m(x)
    assert info.value.layer == "2.sqrt"
    # inside another block that taps the same op, the op is still seen as the model's, and named
    with pytest.raises(hookkit.NonFiniteError, match=r"^'2\.sqrt' \(torch\.sqrt\) in '2'"):
        with hookkit.capture(m, ["2.sqrt"]), hookkit.check_finite(m):
            m(x)
    with pytest.raises(hookkit.NonFiniteError, match=r"^'2' \(Block\) produced"):
        with hookkit.check_finite(m, ops=False):
            m(x)
    assert modes() == 0


def test_trace_shows_op_events_only_when_asked():
    m = nn.Sequential(nn.Linear(16, 16), Block())
    x = torch.randn(4, 16)
    for ops in (False, True):
        out = Console(file=io.StringIO(), width=140, color_system=None)
        with hookkit.trace(m, console=out, ops=ops, backward=False) as t:
            m(x)
        names = [e.name for e in t.events if e.kind == "forward"]
        if ops:
            assert names == ["0", "1.lin", "1.sqrt", "1.relu", "1"]
            assert "1.sqrt torch.sqrt out:" in out.file.getvalue()
        else:
            assert names == ["0", "1.lin", "1"]


def test_hooks_on_an_op_node_change_its_output_and_come_off():
    m = Net()
    x = torch.randn(3, 4)
    expected = m(x)
    before = hook_census(m)
    sites = []

    def zero(site, args, output):
        sites.append(site)
        return output * 0

    with hookkit.hooks(m, forward={"mul": zero}):
        changed = m(x)
    assert hook_census(m) == before
    h = m.fc(x)
    zeroed = torch.relu(torch.relu(F.relu(h * 0) + h + 1) - 0.5)
    torch.testing.assert_close(changed, m.fc2(zeroed).flatten(1))
    assert sites[0].func is torch.Tensor.mul or getattr(sites[0].func, "__name__", "") == "mul"
    torch.testing.assert_close(m(x), expected)
    with pytest.raises(ValueError, match="op node has no backward hook"):
        hookkit.hooks(m, backward={"mul": zero})


def test_the_function_mode_is_entered_only_inside_modules_that_need_it():
    """Copy-on-write watches the forward of modules whose code is not torch.nn's own; a stack of torch.nn layers
    runs with no function mode at all (and so costs what it cost before)."""
    inside: list[int] = []
    plain = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    plain[1].register_forward_hook(lambda mod, a, o: inside.append(modes()))
    with hookkit.capture(plain, ["0", "1", "2"]):
        plain(torch.randn(2, 4))
    custom = nn.Sequential(nn.Linear(16, 16), Block())
    custom[1].lin.register_forward_hook(lambda mod, a, o: inside.append(modes()))
    with hookkit.capture(custom, ["0"]):
        custom(torch.randn(2, 16))
    with hookkit.capture(custom, ["0"], clone=True):  # everything copied at hook time: nothing to watch
        custom(torch.randn(2, 16))
    assert inside == [0, 1, 0]
    assert modes() == 0


def test_a_keyboard_interrupt_inside_the_forward_leaves_no_mode_behind():
    class Interrupts(nn.Module):
        def forward(self, x):
            x = x + 1
            raise KeyboardInterrupt

    m = nn.Sequential(nn.Linear(2, 2), Interrupts())
    before = hook_census(m)
    with pytest.raises(KeyboardInterrupt), hookkit.capture(m, ["1.add"]):
        m(torch.randn(1, 2))
    assert hook_census(m) == before and modes() == 0


_KINDS = ["capture_op", "capture_default", "trace_ops", "check_finite", "hooks_op"]


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 32)

    def forward(self, x):
        return torch.sqrt(self.lin(x).abs() + 1).relu()


def _open(kind: str, m: nn.Module):
    if kind == "capture_op":
        return hookkit.capture(m, ["1.sqrt", "1.relu"], grads=True)
    if kind == "capture_default":
        return hookkit.capture(m, ["0", "1"])
    if kind == "trace_ops":
        return hookkit.trace(m, console=Console(file=io.StringIO()), ops=True)
    if kind == "check_finite":
        return hookkit.check_finite(m)
    return hookkit.hooks(m, forward={"1.sqrt": lambda s, a, o: o})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(_KINDS), min_size=1, max_size=4),
       exit_order=st.permutations(range(4)), fail=st.booleans())
def test_any_nesting_of_op_taps_leaves_census_and_mode_stack_as_found(kinds, exit_order, fail):
    m = nn.Sequential(nn.Linear(16, 16), Smooth())
    before = hook_census(m)
    blocks = [_open(k, m) for k in kinds]
    for b in blocks:
        b.__enter__()
    try:
        x = torch.rand(4, 16)
        if fail:
            x = torch.rand(4, 3)  # a shape error inside the forward, with modes pushed
        with pytest.raises(RuntimeError) if fail else _nothing():
            m(x).sum().backward()
        assert modes() == 0  # nothing pushed outlives the forward
    finally:
        for i in sorted(range(len(blocks)), key=lambda i: exit_order[i] if i < len(exit_order) else i):
            blocks[i].__exit__(None, None, None)
    assert hook_census(m) == before


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_finished_blocks_leave_no_reference_cycles():
    """A finished block is freed by reference counting: the op taps' mode and the listeners are let go on exit."""
    import gc

    m, x = Net(), torch.randn(3, 4)
    makers = [lambda: hookkit.capture(m, ["fc", "mul", "act_1"], grads=True), lambda: hookkit.capture(m, ["fc"]),
              lambda: hookkit.trace(m, console=Console(file=io.StringIO()), ops=True),
              lambda: hookkit.check_finite(m), lambda: hookkit.hooks(m, forward={"mul": lambda s, a, o: o})]
    gc.collect()
    gc.disable()
    try:
        for make in makers:
            with make() as block:
                m(x).sum().backward()
            del block
            hookkit.layer_names(m, x)
            assert gc.collect() == 0
    finally:
        gc.enable()


class Residual(nn.Module):
    """ResNet's pattern: `out += identity`, then ReLU(inplace=True) over the sum; and an assert on a Python bool."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x):
        torch._assert(x.dim() == 2, "expected a batch of vectors")
        out = self.fc(x)
        out += x
        return self.relu(out) * 2


def test_an_in_place_op_node_overwritten_next_keeps_its_output_gradient():
    torch.manual_seed(0)
    m = Residual()
    x = torch.randn(4, 6, requires_grad=True)
    with hookkit.capture(m, ["add", "mul"], grads=True) as cap:
        m(x).sum().backward()
    h = m.fc(x)
    s = h + x  # the out-of-place form of `out += x`
    (g_s,) = torch.autograd.grad((torch.relu(s) * 2).sum(), [s])
    torch.testing.assert_close(cap["add"], s.detach())
    torch.testing.assert_close(cap.grads["add"], g_s)
    with pytest.raises(hookkit.GradientUnavailableError, match="'add' writes into its input in place"):
        cap.grad_inputs["add"]


def test_an_op_without_tensor_arguments_is_not_a_node():
    """torch._assert(<a Python bool>) runs through the function mode but, as in FX (which runs it while tracing),
    names nothing; x.dim() is an op on a tensor and is named."""
    assert hookkit.layer_names(Residual(), torch.randn(4, 6)) == ["dim", "fc", "add", "relu", "mul"]


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        y = self.ln(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        return y + x


def test_a_capture_leaves_multihead_attentions_fast_path_and_its_exact_values():
    """nn.MultiheadAttention takes its fast path (eval, no grad) only when no torch function mode is active: the
    mode is taken off around it, so the model computes bit for bit what it computes without hookkit."""
    torch.manual_seed(0)
    m, x = WithAttention().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = m(x)
        for layers in (["ln", "attn"], ["add"]):
            with hookkit.capture(m, layers) as cap:
                got = m(x)
            assert torch.equal(got, expected), layers
            assert modes() == 0
    assert torch.equal(cap["add"], expected)


def test_a_module_name_close_to_the_spec_is_suggested_as_a_name_not_as_an_op():
    """A close module name is suggested plainly; only torch function names come with the warning that the forward
    may never call them (a Sequential of convs has no 'conv2d' node unless its forward calls F.conv2d)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(hookkit.LayerNotFoundError) as raised:
        hookkit.capture(m, ["conv"])
    assert "Did you mean one of the op nodes 'cov', 'conv3d', 'conv2d' (a node only if the forward calls those " \
           "torch functions)?" in str(raised.value)
    with pytest.raises(hookkit.LayerNotFoundError, match=r"Did you mean the op node 'einsum' \(a node only if the "
                       r"forward calls that torch function\)\?"):
        hookkit.capture(m, ["einsumm"])
    m.add_module("conv", nn.Conv2d(8, 8, 1))
    with pytest.raises(hookkit.LayerNotFoundError, match=r"Did you mean 'conv'\?"):
        hookkit.capture(m, ["cnv"])
