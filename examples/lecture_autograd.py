"""A runnable walkthrough of a lecture on autograd and module hooks, step by step.

The steps reproduce a classic introduction: ``y.backward(gradients)``, ``requires_grad=False``, backward twice and
``retain_graph``, ``grad_fn``, forward / pre / full backward hooks on a small CNN (``SimpleNet``), the sigmoid
chain rule seen from a backward hook, a hook that replaces ``grad_input``, ``handle.remove()``, and the same
activations and gradients read with ``hookkit.capture``. Every step prints what torch really does; where the
lecture's notes got it wrong, a "NOTE" line says what they claimed.
Runs on CPU in a few seconds:

    python examples/lecture_autograd.py

tests/test_lecture.py checks each claim.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import hookkit

GRADIENTS = torch.tensor([100, 0.1], dtype=torch.float)


def heading(title: str) -> None:
    print()
    print("=" * 78)
    print(title)
    print("=" * 78)


def note(text: str) -> None:
    print(f"  NOTE: {text}")


class SimpleNet(nn.Module):
    """The lecture's network (its `self_pool1 = nn_MaxPool2d(2, 2)` is OCR damage for `self.pool1`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(320, 50)
        self.out = nn.Linear(50, 10)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(input)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc(x))
        x = F.relu(self.out(x))
        return x


def lecture_loss(out: torch.Tensor) -> torch.Tensor:
    target = torch.tensor([3], dtype=torch.long)
    return nn.CrossEntropyLoss()(out, target)


# -- the lecture's hook functions (with the OCR damage repaired) ------------------------------------------------


def hook_func(self, input, output):
    print("  Inside " + self.__class__.__name__ + " forward")
    print("    input:    ", type(input))
    print("    input[0]: ", type(input[0]))
    print("    output:   ", type(output))


def hook_pre(self, input):
    print("  Inside " + self.__class__.__name__ + " forward (pre-hook, before forward runs)")
    print("    input:    ", type(input))
    print("    input[0]: ", type(input[0]))


def step_tutorial() -> None:
    heading("1. y.backward(gradients) computes gradients * dy/dx")
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    y.backward(GRADIENTS)
    print("  y = x * 3; y.backward([100, 0.1]) -> x.grad =", x.grad)

    x = torch.randn(2, requires_grad=True)
    y = x + 3
    y.backward(GRADIENTS)
    print("  y = x + 3; y.backward([100, 0.1]) -> x.grad =", x.grad)
    note("the notes' first block says `y = x + 3` and prints [200, 0.3]: a typo. x + 3 has derivative 1, so the")
    note("gradient comes back unchanged ([100, 0.1]); [300, 0.3] is what y = x * 3 gives.")

    try:
        (torch.randn(2, requires_grad=True) * 3).backward()
    except RuntimeError as e:
        print("  y.backward() with no gradient on a 2-element y -> RuntimeError:", e)


def step_requires_grad() -> None:
    heading("2. requires_grad=False: backward() raises RuntimeError")
    x = torch.randn(2, requires_grad=False)
    y = x * 3
    print("  y.grad_fn =", y.grad_fn, "| y.requires_grad =", y.requires_grad)
    try:
        y.backward(GRADIENTS)
    except RuntimeError as e:
        print("  y.backward(gradients) -> RuntimeError:", e)


def step_backward_twice() -> None:
    heading("3. backward() twice: RuntimeError, unless retain_graph=True (then gradients accumulate)")
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    y.backward(GRADIENTS)
    try:
        y.backward(GRADIENTS)
    except RuntimeError as e:
        print("  second y.backward() -> RuntimeError:", str(e).split(" (")[0])

    x = torch.randn(2, requires_grad=True)
    y = x * 3
    y.backward(GRADIENTS, retain_graph=True)
    print("  y.backward(gradients, retain_graph=True) -> x.grad =", x.grad)
    y.backward(GRADIENTS)
    print("  y.backward(gradients)                    -> x.grad =", x.grad, "(accumulated)")

    x = torch.randn(2, requires_grad=True)
    y = x + 3
    y.backward(GRADIENTS)
    y.backward(GRADIENTS)
    note("the error comes from freed *saved tensors*; x + 3 saves none, so backward twice works there:")
    print("  y = x + 3, backward twice without retain_graph -> x.grad =", x.grad)


def step_grad_fn() -> None:
    heading("4. grad_fn: the operation that produced a tensor")
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    z = x / 2
    w = x + y
    print("  w, y, z =", (w, y, z))
    print("  w.grad_fn:", w.grad_fn.name(), "| y.grad_fn:", y.grad_fn.name(), "| z.grad_fn:", z.grad_fn.name())
    print("  x.grad_fn (a leaf the user created):", x.grad_fn)
    print("  w.grad_fn.next_functions:", [type(fn).__name__ for fn, _ in w.grad_fn.next_functions])


def step_forward_hooks(image: torch.Tensor) -> None:
    heading("5. register_forward_hook on conv1 and conv2")
    net = SimpleNet()
    h1 = net.conv1.register_forward_hook(hook_func)
    h2 = net.conv2.register_forward_hook(hook_func)
    print("  handle:", type(h1).__module__ + "." + type(h1).__name__)
    out = net(image)
    print("  net(input).shape =", tuple(out.shape), "(the hooks fired once each, conv1 then conv2)")
    h1.remove()
    h2.remove()

    heading("6. register_forward_pre_hook: runs before forward, sees only the input")
    net = SimpleNet()
    h = net.conv1.register_forward_pre_hook(hook_pre)
    net(image)
    h.remove()
    note("the notes print `input[0]: <class 'tuple'>` here: wrong, input[0] is the Tensor.")


def step_backward_hooks(image: torch.Tensor) -> None:
    heading("7. register_full_backward_hook on conv1 (the notes' register_backward_hook is deprecated)")
    net = SimpleNet()
    seen = []

    def hook_grad(self, grad_input, grad_output):
        print("  Inside " + self.__class__.__name__ + " backward")
        print("    grad_input:     ", type(grad_input))
        print("    grad_input[0]:  ", type(grad_input[0]))
        print("    grad_output:    ", type(grad_output))
        print("    grad_output[0]: ", type(grad_output[0]), tuple(grad_output[0].shape))
        seen.append((grad_input, grad_output))

    # The reference d loss / d (conv1 output) comes from an identical, hook-free copy: torch.autograd.grad
    # through the hooked net would fire the backward hook too.
    reference = copy.deepcopy(net)
    conv1_outputs = []
    reference.conv1.register_forward_hook(lambda m, i, o: conv1_outputs.append(o))
    (d_out,) = torch.autograd.grad(lecture_loss(reference(image)), conv1_outputs[0])

    h = net.conv1.register_full_backward_hook(hook_grad)
    with warnings.catch_warnings():
        # torch warns that, as the image needs no grad, the hook fires on the output gradients only.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        err = lecture_loss(net(image))
        err.backward()
    h.remove()
    grad_input, grad_output = seen[0]
    print("  grad_input[0] is None:", grad_input[0] is None, "(the network input does not require grad)")
    print("  grad_output[0] == autograd.grad(loss, conv1 output):", torch.allclose(grad_output[0], d_out))
    note("the notes swap the names: grad_output is d loss / d (layer output); grad_input is d loss / d (layer")
    note("input). For the last layer, grad_output (not grad_input) is the seed gradient, e.g. ones.")

    net = SimpleNet()
    seen = []
    net.conv1.register_full_backward_hook(lambda m, gi, go: seen.append(gi))
    x = image.clone().requires_grad_(True)
    lecture_loss(net(x)).backward()
    print("  with input.requires_grad_(True): grad_input[0].shape =", tuple(seen[0][0].shape),
          "| == input.grad:", torch.allclose(seen[0][0], x.grad))

    heading("8. Sigmoid chain rule: grad_input[0] = grad_output[0] * s * (1 - s)")
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3))
    got, outs = [], []
    model[1].register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    model[1].register_full_backward_hook(lambda m, gi, go: got.append((gi, go)))
    model(torch.randn(2, 4)).pow(2).sum().backward()
    (gi, go), s = got[0], outs[0]
    print("  grad_input[0] == grad_output[0] * s * (1 - s):", torch.allclose(gi[0], go[0] * s * (1 - s)))
    print("  (the notes' grad_output == grad_input * s * (1 - s)):", torch.allclose(go[0], gi[0] * s * (1 - s)))

    heading("9. A backward hook may return a new grad_input (here zeros, on conv2)")
    net = SimpleNet()
    x = image.clone().requires_grad_(True)
    h = net.conv2.register_full_backward_hook(lambda m, gi, go: tuple(torch.zeros_like(g) for g in gi))
    lecture_loss(net(x)).backward()
    h.remove()
    print("  |conv1.weight.grad| =", net.conv1.weight.grad.abs().sum().item(),
          "| |input.grad| =", x.grad.abs().sum().item(),
          "| |conv2.weight.grad| =", round(net.conv2.weight.grad.abs().sum().item(), 4))


def step_remove(image: torch.Tensor) -> None:
    heading("10. handle.remove()")
    net = SimpleNet()
    calls = []
    h = net.conv1.register_forward_hook(lambda m, i, o: calls.append(1))
    net(image)
    print("  with the hook:  calls =", len(calls), "| len(conv1._forward_hooks) =", len(net.conv1._forward_hooks))
    h.remove()
    net(image)
    print("  after remove(): calls =", len(calls), "| len(conv1._forward_hooks) =", len(net.conv1._forward_hooks))


def step_toy_activation() -> None:
    heading("11. Toy activation example: save_feat by hand, then hookkit.capture")
    try:
        import torchvision
    except ImportError:
        print("  skipped: the toy example uses a torchvision ResNet-18 (pip install 'hookkit[torchvision]')")
        return
    model = torchvision.models.resnet18(weights=None).eval()
    img = torch.randn(3, 64, 64)
    target_layer_name = "layer2"
    save_feat = []

    def hook_feat(module, input, output):
        save_feat.append(output)
        return output

    # The notes use `model.get_model_shortcuts()`, which does not exist in torch: named_modules() does this.
    handles = [m.register_forward_hook(hook_feat) for name, m in model.named_modules() if name == target_layer_name]
    img = img.unsqueeze(0)
    with torch.no_grad():
        s = model(img)[0]
    for h in handles:
        h.remove()
    print("  s.shape =", tuple(s.shape), "| save_feat[0].shape =", tuple(save_feat[0].shape))
    print("  save_feat[0][0, 0, 0, :4] =", save_feat[0][0, 0, 0, :4])

    count = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    print("  forward hooks before capture:", count())
    with hookkit.capture(model, [target_layer_name]) as cap:
        print("  forward hooks inside capture:", count())
        with torch.no_grad():
            model(img)
    print("  forward hooks after capture: ", count())
    print("  cap['layer2'] == save_feat[0]:", torch.equal(cap[target_layer_name], save_feat[0]))


def step_hookkit_grads(image: torch.Tensor) -> None:
    heading("12. hookkit grads=True vs the raw full backward hook on SimpleNet.conv1")
    net = SimpleNet()
    seen = []
    net.conv1.register_full_backward_hook(lambda m, gi, go: seen.append((gi, go)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with hookkit.capture(net, ["conv1"], grads=True) as cap:
            lecture_loss(net(image)).backward()
    grad_input, grad_output = seen[0]
    print("  raw hook grad_input[0] is None:     ", grad_input[0] is None)
    print("  cap.grad_inputs['conv1'] is None:   ", cap.grad_inputs["conv1"] is None)
    print("  cap.grads['conv1'] == grad_output[0]:", torch.equal(cap.grads["conv1"], grad_output[0]))


def step_hookkit_ops(image: torch.Tensor) -> None:
    heading("13. hookkit op nodes: the F.relu calls inside SimpleNet.forward, which no module hook reaches")
    net = SimpleNet()
    print("  names:", hookkit.layer_names(net, image))
    with hookkit.capture(net, ["relu", "relu_2", "view"], grads=True) as cap:
        lecture_loss(net(image)).backward()
    conv1 = net.conv1(image)
    first = F.relu(conv1)
    hidden = F.relu(net.fc(net.pool2(F.relu(net.conv2(net.pool1(first)))).view(1, -1)))
    (grad_first,) = torch.autograd.grad(lecture_loss(F.relu(net.out(hidden))), [first])
    print("  cap['relu'] == F.relu(conv1(x)):            ", torch.equal(cap["relu"], first.detach()))
    print("  cap.grads['relu'] == torch.autograd.grad:   ", torch.allclose(cap.grads["relu"], grad_first))
    print("  cap['relu_2'] (the F.relu after fc):        ", tuple(cap["relu_2"].shape))


def main() -> None:
    torch.manual_seed(0)
    step_tutorial()
    step_requires_grad()
    step_backward_twice()
    step_grad_fn()
    image = torch.randn(1, 1, 28, 28)
    step_forward_hooks(image)
    step_backward_hooks(image)
    step_remove(image)
    step_toy_activation()
    step_hookkit_grads(image)
    step_hookkit_ops(image)


if __name__ == "__main__":
    main()
