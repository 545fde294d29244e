"""The lecture's SimpleNet, traced forward and backward with hookkit.trace.

The lecture printed "Inside Conv2d forward / input: <class 'tuple'> ..." with bare print() inside hand-written
hooks. hookkit.trace shows the same events, for every module, with shapes and statistics, and removes its hooks
on exit. Look at the last line: conv1's grad_input is None, because the image does not require grad (the
lecture's `grad_input[0]: <class 'NoneType'>`).

    python examples/trace_simplenet.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

import hookkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lecture_autograd import SimpleNet  # noqa: E402  (the lecture's network, defined once)


def main() -> None:
    torch.manual_seed(0)
    console = Console()
    net = SimpleNet()
    image = torch.randn(1, 1, 28, 28)
    target = torch.tensor([3])

    console.rule("SimpleNet: forward and backward, every module")
    with hookkit.trace(net, console=console) as t:
        loss = F.cross_entropy(net(image), target)
        loss.backward()

    conv1_in = [e for e in t.events if e.name == "conv1" and e.kind == "grad_input"]
    console.rule("what the trace kept as data")
    console.print(f"{len(t.events)} events; conv1's grad_input: {conv1_in[0].text}")
    console.print("hooks left on the model:", sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                                                  for m in net.modules()))


if __name__ == "__main__":
    main()
