"""The autograd graph behind a tensor, drawn by hookkit's ``graph()``: the lecture's point (1), how gradients flow
back through the computational graph to the inputs.

Runs on CPU in a second or two:

    python examples/autograd_graph.py

tests/test_graph.py runs it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from rich.console import Console

from hookkit import graph


def lecture_graph(console: Console) -> None:
    console.rule("The lecture's example: y = x * 3, z = x / 2, w = x + y")
    x = torch.randn(2, requires_grad=True)
    y = x * 3
    z = x / 2  # noqa: F841 - in the lecture, but not in w's history
    w = x + y
    console.print(graph(w, params={"x": x}))
    console.print(
        "backward() starts at the top with a gradient of ones and walks down: each *Backward node multiplies what "
        "it receives by its local derivative (MulBackward0 by 3, AddBackward0 by 1) and passes the result on to its "
        "children. x is reached twice (#1, then the ↑ reference), so AccumulateGrad sums both contributions into "
        "x.grad: 1 + 3 = 4. z = x / 2 is not in w's history, so it has no node here."
    )
    w.sum().backward()
    console.print(f"x.grad after w.sum().backward(): {x.grad.tolist()}")


def network_graph(console: Console) -> None:
    console.print()
    console.rule("A two-layer net's loss, leaves named by parameter")
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    inputs, targets = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    loss = nn.functional.cross_entropy(net(inputs), targets)
    console.print(graph(loss, params=dict(net.named_parameters())))
    console.print(
        "Every parameter ends in an AccumulateGrad leaf: that is where loss.backward() deposits its gradient "
        "(net[0].weight.grad, ...). The inputs and targets need no gradient, so their edges are None and they "
        "have no node; give the inputs requires_grad=True and they would get a leaf of their own."
    )


def main() -> None:
    torch.manual_seed(0)
    console = Console()
    lecture_graph(console)
    network_graph(console)


if __name__ == "__main__":
    main()
