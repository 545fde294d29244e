"""A model that goes NaN deep inside, found in one call with hookkit.check_finite, which names the op
(``torch.sqrt``) and the module whose forward ran it.

Compare with torch.autograd.detect_anomaly, which only looks at backward and names the first autograd op whose
gradient is NaN: here the head's matmul, far from the module that made the NaN.

    python examples/find_nan.py
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn
from rich.console import Console

import hookkit


class Block(nn.Module):
    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.scale = scale

    def forward(self, x):
        h = self.norm(self.lin(x))
        # A "variance" that is not always positive: sqrt of a negative number is NaN.
        return x + torch.sqrt(h * self.scale)


def build() -> nn.Module:
    torch.manual_seed(0)
    blocks = [Block(64, 1.0) for _ in range(6)]
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), *blocks, nn.Linear(64, 10))


def main() -> None:
    console = Console()
    model = build()
    x = torch.randn(8, 32)

    console.rule("hookkit.check_finite")
    t0 = time.perf_counter()
    try:
        with hookkit.check_finite(model):
            model(x).logsumexp(-1).mean().backward()
    except hookkit.NonFiniteError as err:
        console.print(f"[bold red]NonFiniteError[/] after {1e3 * (time.perf_counter() - t0):.1f} ms:")
        console.print(str(err), markup=False)
        console.print(f"layer={err.layer!r} phase={err.phase!r} call={err.call}")

    console.rule("torch.autograd.detect_anomaly, same model")
    model.zero_grad()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anomaly mode's "will increase the runtime" warning
            with torch.autograd.detect_anomaly():
                model(x).logsumexp(-1).mean().backward()
        console.print("detect_anomaly raised nothing")
    except RuntimeError as err:
        console.print(f"[bold]RuntimeError[/] after {1e3 * (time.perf_counter() - t0):.1f} ms:")
        console.print(str(err).splitlines()[0], markup=False)


if __name__ == "__main__":
    main()
