"""Every claim of a Korean lecture on autograd and module hooks, checked against torch (examples/lecture_autograd.py).

Where the notes are wrong (typos, OCR damage or plain confusion), the test checks what torch really does and a
comment quotes what the notes said. The walkthrough ``examples/lecture_autograd.py`` prints the same steps.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import hookkit

from _optional import importorskip_torchvision

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lecture_autograd.py"

# The gradient vector the lecture passes to y.backward(...).
GRADIENTS = torch.tensor([100, 0.1], dtype=torch.float)

# A full backward hook on a module none of whose inputs requires grad (conv1 fed a plain image) makes torch warn
# that the hook fires on the output gradients only; that is exactly the lecture's grad_input[0] None case.
full_hook_on_plain_input = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


# The lecture's network lives in the walkthrough; the tests use that very class.
_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lecture_autograd.py"
_spec = importlib.util.spec_from_file_location("lecture_autograd", _EXAMPLE)
lecture_autograd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lecture_autograd)
SimpleNet = lecture_autograd.SimpleNet


def make_net_and_input(seed: int = 0) -> tuple[SimpleNet, torch.Tensor]:
    torch.manual_seed(seed)
    return SimpleNet(), torch.randn(1, 1, 28, 28)


def lecture_loss(out: torch.Tensor) -> torch.Tensor:
    target = torch.tensor([3], dtype=torch.long)
    return nn.CrossEntropyLoss()(out, target)


# ---------------------------------------------------------------------------------------------------------------
# Tutorial: y.backward(gradients) computes gradients . dy/dx
# ---------------------------------------------------------------------------------------------------------------


def test_backward_with_gradient_vector_through_mul_gives_300_and_0_3() -> None:
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    y.backward(GRADIENTS)
    # dy/dx = 3, so x.grad = gradients * 3: the lecture's [300, 0.3].
    torch.testing.assert_close(x.grad, GRADIENTS * 3)
    torch.testing.assert_close(x.grad, torch.tensor([300.0, 0.3]))


def test_backward_with_gradient_vector_through_add_passes_it_unchanged() -> None:
    # The notes' first block says `y = x + 3` and prints `x.grad = [200, 0.3]`: a typo. Adding a constant has
    # derivative 1, so x + 3 gives back the gradient vector itself, [100, 0.1]; [300, 0.3] needs y = x * 3.
    x = torch.randn(2, requires_grad=True)
    y = x + 3
    y.backward(GRADIENTS)
    torch.testing.assert_close(x.grad, GRADIENTS)
    assert not torch.allclose(x.grad, torch.tensor([200.0, 0.3]))


def test_backward_on_non_scalar_without_gradient_vector_raises() -> None:
    # The notes' "cf. y.backward()" line: for a 2-element y, backward() needs the gradient vector.
    x = torch.randn(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        (x * 3).backward()


def test_backward_without_requires_grad_raises() -> None:
    x = torch.randn(2, requires_grad=False)
    y = x * 3
    assert y.grad_fn is None and not y.requires_grad
    # Pass the gradient vector so that the error really is the missing requires_grad (a bare y.backward() on a
    # 2-element y would raise anyway, see the test above).
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward(GRADIENTS)
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# backward twice: RuntimeError, unless retain_graph=True, and then gradients accumulate
# ---------------------------------------------------------------------------------------------------------------


def test_second_backward_without_retain_graph_raises() -> None:
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    y.backward(GRADIENTS)
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        y.backward(GRADIENTS)
    # The failed call left the first gradient alone.
    torch.testing.assert_close(x.grad, GRADIENTS * 3)


def test_retain_graph_lets_backward_run_twice_and_gradients_accumulate() -> None:
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    y.backward(GRADIENTS, retain_graph=True)
    first = x.grad.clone()
    y.backward(GRADIENTS)
    torch.testing.assert_close(first, torch.tensor([300.0, 0.3]))
    torch.testing.assert_close(x.grad, torch.tensor([600.0, 0.6]))
    torch.testing.assert_close(x.grad, 2 * first)


def test_second_backward_through_graph_with_nothing_saved_does_not_raise() -> None:
    # Not in the notes, but it qualifies "calling backward() twice gives a RuntimeError": the error comes from
    # freed *saved tensors*. AddBackward0 of `x + 3` saves none, so a second backward runs (and accumulates).
    x = torch.randn(2, requires_grad=True)
    y = x + 3
    y.backward(GRADIENTS)
    y.backward(GRADIENTS)
    torch.testing.assert_close(x.grad, 2 * GRADIENTS)


# ---------------------------------------------------------------------------------------------------------------
# grad_fn
# ---------------------------------------------------------------------------------------------------------------


def test_grad_fn_names_the_operation_that_made_the_tensor() -> None:
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    z = x / 2
    w = x + y
    # The notes print `AddBackwardO` / `DivBackwardO`: OCR for a zero.
    assert type(w.grad_fn).__name__ == w.grad_fn.name() == "AddBackward0"
    assert type(y.grad_fn).__name__ == y.grad_fn.name() == "MulBackward0"
    assert type(z.grad_fn).__name__ == z.grad_fn.name() == "DivBackward0"
    torch.testing.assert_close(w, 4 * x)
    torch.testing.assert_close(z, x * 0.5)
    assert "grad_fn=<AddBackward0>" in repr(w)
    # grad_fn is the last operation: w's node points back at y's MulBackward0 and at x's leaf accumulator.
    parents = [fn for fn, _ in w.grad_fn.next_functions]
    assert y.grad_fn in parents
    assert any(type(fn).__name__ == "AccumulateGrad" and fn.variable is x for fn in parents)


def test_user_created_leaf_has_no_grad_fn() -> None:
    x = torch.randn(2, requires_grad=True)
    assert x.grad_fn is None
    assert x.is_leaf
    assert (x * 3).grad_fn is not None


# ---------------------------------------------------------------------------------------------------------------
# register_forward_hook / register_forward_pre_hook on SimpleNet
# ---------------------------------------------------------------------------------------------------------------


def test_simplenet_maps_28x28_image_to_10_outputs() -> None:
    net, image = make_net_and_input()
    assert net(image).shape == (1, 10)


def test_forward_hook_receives_input_tuple_and_output_tensor() -> None:
    net, image = make_net_and_input()
    seen = []

    def hook_func(module, input, output):
        seen.append((module, input, output))

    net.conv1.register_forward_hook(hook_func)
    net(image)
    (module, input, output), = seen
    assert module is net.conv1
    assert type(module).__name__ == "Conv2d"
    assert isinstance(input, tuple) and len(input) == 1
    assert type(input[0]) is torch.Tensor
    assert input[0] is image
    assert type(output) is torch.Tensor
    torch.testing.assert_close(output, net.conv1(image))


def test_forward_hooks_fire_once_per_forward_in_order_conv1_then_conv2() -> None:
    net, image = make_net_and_input()
    order = []
    net.conv1.register_forward_hook(lambda m, i, o: order.append(("conv1", type(i), type(i[0]), type(o))))
    net.conv2.register_forward_hook(lambda m, i, o: order.append(("conv2", type(i), type(i[0]), type(o))))
    net(image)
    assert order == [
        ("conv1", tuple, torch.Tensor, torch.Tensor),
        ("conv2", tuple, torch.Tensor, torch.Tensor),
    ]
    net(image)
    assert [name for name, *_ in order] == ["conv1", "conv2", "conv1", "conv2"]


def test_forward_pre_hook_gets_input_tuple_of_tensor_before_forward() -> None:
    # The notes' output block prints `input[0]: <class 'tuple'>`: wrong. input is the tuple of positional
    # arguments, so input[0] is the Tensor itself (also what the notes' own forward-hook output shows).
    net, image = make_net_and_input()
    events = []

    def hook_pre(module, input):
        events.append(("pre", type(input), type(input[0]), input[0] is image))

    net.conv1.register_forward_pre_hook(hook_pre)
    net.conv1.register_forward_hook(lambda m, i, o: events.append(("forward", type(o))))
    net(image)
    assert events == [("pre", tuple, torch.Tensor, True), ("forward", torch.Tensor)]


# ---------------------------------------------------------------------------------------------------------------
# Backward hooks: register_full_backward_hook (the notes' register_backward_hook is deprecated)
# ---------------------------------------------------------------------------------------------------------------


def conv1_backward_hook_run(input_requires_grad: bool = False):
    """The notes' backward example with a full backward hook on conv1; returns what the hook saw and more."""
    net, image = make_net_and_input()
    image.requires_grad_(input_requires_grad)
    seen = []

    def hook_grad(module, grad_input, grad_output):
        seen.append((grad_input, grad_output))

    net.conv1.register_full_backward_hook(hook_grad)
    out = net(image)
    err = lecture_loss(out)
    err.backward()
    return net, image, seen


@full_hook_on_plain_input
def test_full_backward_hook_on_first_conv_gets_none_grad_input_and_tensor_grad_output() -> None:
    _, _, seen = conv1_backward_hook_run()
    assert len(seen) == 1
    grad_input, grad_output = seen[0]
    assert isinstance(grad_input, tuple)
    assert grad_input[0] is None  # the network input (the image) does not require grad
    assert isinstance(grad_output, tuple)
    assert type(grad_output[0]) is torch.Tensor
    assert grad_output[0].shape == (1, 10, 24, 24)  # the shape of conv1's *output*


def reference_grads_of_conv1(input_requires_grad: bool):
    """Without any backward hook: d loss / d conv1 output and d loss / d conv1 input, by torch.autograd.grad."""
    net, image = make_net_and_input()
    image.requires_grad_(input_requires_grad)
    outputs = []
    net.conv1.register_forward_hook(lambda m, i, o: outputs.append(o))
    loss = lecture_loss(net(image))
    (d_output,) = torch.autograd.grad(loss, outputs[0], retain_graph=True)
    d_input = torch.autograd.grad(loss, image)[0] if input_requires_grad else None
    return d_output, d_input


@full_hook_on_plain_input
def test_grad_output_is_gradient_of_loss_wrt_layer_output() -> None:
    # The notes swap the two: they say grad_input is "the gradient w.r.t. the current layer's output". It is
    # grad_output that holds d loss / d (layer output).
    _, _, seen = conv1_backward_hook_run()
    grad_input, grad_output = seen[0]
    d_output, _ = reference_grads_of_conv1(input_requires_grad=False)
    assert d_output.abs().sum() > 0  # a real, non-trivial gradient (the final ReLU did not kill it)
    torch.testing.assert_close(grad_output[0], d_output)


def test_grad_input_is_gradient_of_loss_wrt_layer_input() -> None:
    _, image, seen = conv1_backward_hook_run(input_requires_grad=True)
    grad_input, grad_output = seen[0]
    d_output, d_input = reference_grads_of_conv1(input_requires_grad=True)
    assert type(grad_input[0]) is torch.Tensor
    assert grad_input[0].shape == image.shape == (1, 1, 28, 28)  # the shape of conv1's *input*
    assert d_input.abs().sum() > 0
    torch.testing.assert_close(grad_input[0], d_input)
    torch.testing.assert_close(grad_input[0], image.grad)
    torch.testing.assert_close(grad_output[0], d_output)


def test_last_layer_grad_output_is_the_seed_gradient_not_grad_input() -> None:
    # The notes: "for the last layer grad_input is the gradient of the model output w.r.t. itself, so [1, 1]".
    # That is grad_output, and it is whatever gradient backward() starts from (ones for y.backward(ones_like(y))).
    model = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid())
    seen = []
    model[1].register_full_backward_hook(lambda m, gi, go: seen.append((gi, go)))
    x = torch.randn(1, 3)
    y = model(x)
    y.backward(torch.ones_like(y))
    grad_input, grad_output = seen[0]
    torch.testing.assert_close(grad_output[0], torch.ones(1, 2))
    assert not torch.allclose(grad_input[0], torch.ones(1, 2))  # grad_input is already multiplied by s(1-s)


def test_sigmoid_grad_input_is_grad_output_times_s_times_one_minus_s() -> None:
    # The notes write `grad_output = grad_input * (forward_output * (1 - forward_output))`, with the names
    # swapped again. Correct: the gradient flowing to the sigmoid's input is grad_output * s * (1 - s).
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3))
    sig = model[1]
    seen, outputs = [], []
    sig.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    sig.register_full_backward_hook(lambda m, gi, go: seen.append((gi, go)))
    x = torch.randn(2, 4)
    model(x).pow(2).sum().backward()  # a non-constant upstream gradient, so the product really matters
    (grad_input, grad_output), = seen
    s = outputs[0]
    torch.testing.assert_close(s, torch.sigmoid(model[0](x)))
    torch.testing.assert_close(grad_input[0], grad_output[0] * s * (1 - s))
    # ... and the notes' formula, taken literally, does not hold.
    assert not torch.allclose(grad_output[0], grad_input[0] * s * (1 - s))


def test_full_backward_hook_return_value_replaces_grad_input() -> None:
    # "The hook should not modify its arguments, but it can return a new gradient used in place of grad_input."
    def run(replace: bool):
        net, image = make_net_and_input()
        image.requires_grad_(True)
        if replace:
            net.conv2.register_full_backward_hook(lambda m, gi, go: tuple(torch.zeros_like(g) for g in gi))
        lecture_loss(net(image)).backward()
        return net, image

    plain_net, plain_image = run(replace=False)
    zeroed_net, zeroed_image = run(replace=True)
    # Without the hook, everything upstream of conv2 gets a real gradient ...
    assert plain_net.conv1.weight.grad.abs().sum() > 0
    assert plain_image.grad.abs().sum() > 0
    # ... with it, the zeros replaced conv2's grad_input: nothing upstream of conv2 gets any gradient.
    torch.testing.assert_close(zeroed_net.conv1.weight.grad, torch.zeros_like(zeroed_net.conv1.weight))
    torch.testing.assert_close(zeroed_net.conv1.bias.grad, torch.zeros_like(zeroed_net.conv1.bias))
    torch.testing.assert_close(zeroed_image.grad, torch.zeros_like(zeroed_image))
    # conv2's own parameters and everything downstream are untouched.
    torch.testing.assert_close(zeroed_net.conv2.weight.grad, plain_net.conv2.weight.grad)
    torch.testing.assert_close(zeroed_net.fc.weight.grad, plain_net.fc.weight.grad)


def test_full_backward_hook_must_not_modify_grad_output_in_place() -> None:
    # "The hook should not modify its arguments": torch refuses an in-place change of grad_output.
    lin = nn.Linear(3, 3)
    lin.register_full_backward_hook(lambda m, gi, go: go[0].mul_(0))
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError):
        lin(x).sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# handle.remove()
# ---------------------------------------------------------------------------------------------------------------


def test_removed_forward_hook_no_longer_fires() -> None:
    net, image = make_net_and_input()
    calls = []
    assert len(net.conv1._forward_hooks) == 0
    h = net.conv1.register_forward_hook(lambda m, i, o: calls.append(type(o)))
    assert isinstance(h, torch.utils.hooks.RemovableHandle)
    assert len(net.conv1._forward_hooks) == 1
    net(image)
    assert calls == [torch.Tensor]
    h.remove()
    assert len(net.conv1._forward_hooks) == 0
    net(image)
    assert calls == [torch.Tensor]  # still one call: the removed hook did not fire


# ---------------------------------------------------------------------------------------------------------------
# Toy activation example, by hand and with hookkit
# ---------------------------------------------------------------------------------------------------------------


def toy_model_and_image():
    torch.manual_seed(0)
    model = importorskip_torchvision().models.resnet18(weights=None).eval()
    img = torch.randn(3, 64, 64)
    return model, img


def test_toy_save_feat_hook_matches_hookkit_capture() -> None:
    model, img = toy_model_and_image()
    target_layer_name = "layer2"
    save_feat = []

    def hook_feat(module, input, output):
        save_feat.append(output)
        return output

    # The notes loop over `model.get_model_shortcuts()`, which does not exist in torch; named_modules() is the
    # torch way to find a module by name.
    assert not hasattr(model, "get_model_shortcuts")
    handles = []
    for name, module in model.named_modules():
        if name == target_layer_name:
            handles.append(module.register_forward_hook(hook_feat))
    assert len(handles) == 1

    img = img.unsqueeze(0)
    with torch.no_grad():
        s = model(img)[0]
    for h in handles:
        h.remove()
    assert s.shape == (1000,)
    assert len(save_feat) == 1
    assert save_feat[0].shape == (1, 128, 8, 8)

    with hookkit.capture(model, [target_layer_name]) as cap, torch.no_grad():
        s2 = model(img)[0]
    torch.testing.assert_close(cap[target_layer_name], save_feat[0])
    assert len(cap.calls(target_layer_name)) == 1
    torch.testing.assert_close(s2, s)  # hook_feat returning `output` left the model's result unchanged


def test_hookkit_capture_removes_its_hooks() -> None:
    model, img = toy_model_and_image()

    def count(attr: str) -> int:
        return sum(len(getattr(m, attr)) for m in model.modules())

    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
    before = {a: count(a) for a in attrs}
    assert before["_forward_hooks"] == 0
    with hookkit.capture(model, ["layer2", "layer4"], grads=True) as cap:
        # per layer: the hook that records, and one that closes each call even when its forward raises; on the
        # model (whose own forward may write in place), one that ends copy-on-write watching when it returns, and
        # one that ends the forward (cap[name] reads a module's first call in the last forward, as FX names it)
        assert len(model.layer2._forward_hooks) == 2
        assert count("_forward_hooks") == before["_forward_hooks"] + 4 + 1 + 1
        model(img.unsqueeze(0)).sum().backward()
    assert {a: count(a) for a in attrs} == before
    assert len(model.layer2._forward_hooks) == 0
    assert cap["layer4"].shape == (1, 512, 2, 2)  # the values stay readable after the block


@full_hook_on_plain_input
def test_hookkit_grads_match_full_backward_hook_and_grad_input_is_none() -> None:
    net, image = make_net_and_input()
    seen = []
    net.conv1.register_full_backward_hook(lambda m, gi, go: seen.append((gi, go)))
    with hookkit.capture(net, ["conv1"], grads=True) as cap:
        lecture_loss(net(image)).backward()
    grad_input, grad_output = seen[0]
    assert grad_input[0] is None
    assert cap.grad_inputs["conv1"] is None  # like the lecture's grad_input[0]: the image needs no grad
    torch.testing.assert_close(cap.grads["conv1"], grad_output[0])
    d_output, _ = reference_grads_of_conv1(input_requires_grad=False)
    torch.testing.assert_close(cap.grads["conv1"], d_output)


def test_hookkit_grad_inputs_match_autograd_when_input_requires_grad() -> None:
    net, image = make_net_and_input()
    image.requires_grad_(True)
    with hookkit.capture(net, ["conv1"], grads=True) as cap:
        lecture_loss(net(image)).backward()
    d_output, d_input = reference_grads_of_conv1(input_requires_grad=True)
    torch.testing.assert_close(cap.grad_inputs["conv1"], d_input)
    torch.testing.assert_close(cap.grad_inputs["conv1"], image.grad)
    torch.testing.assert_close(cap.grads["conv1"], d_output)


# ---------------------------------------------------------------------------------------------------------------
# The walkthrough runs
# ---------------------------------------------------------------------------------------------------------------


def test_lecture_walkthrough_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "300" in result.stdout
    assert "600" in result.stdout
    assert "MulBackward0" in result.stdout


def test_simplenets_functional_relus_are_op_nodes_with_autograds_gradients() -> None:
    """The lecture's SimpleNet applies F.relu inside forward: no module hook reaches those values; op nodes do."""
    net, image = make_net_and_input()
    assert hookkit.layer_names(net, image) == [
        "conv1", "relu", "pool1", "conv2", "relu_1", "pool2", "size", "view", "fc", "relu_2", "out", "relu_3"]
    with hookkit.capture(net, ["relu", "relu_3"], grads=True) as cap:
        out = net(image)
        lecture_loss(out).backward()
    first = torch.nn.functional.relu(net.conv1(image))
    rest = net.fc(net.pool2(torch.nn.functional.relu(net.conv2(net.pool1(first)))).view(1, -1))
    last = torch.nn.functional.relu(net.out(torch.nn.functional.relu(rest)))
    (grad_first,) = torch.autograd.grad(lecture_loss(last), [first])
    assert torch.equal(cap["relu"], first.detach())
    assert torch.equal(cap["relu_3"], out.detach())
    torch.testing.assert_close(cap.grads["relu"], grad_first)
