#!/usr/bin/env python
"""Cost of the debugging views on a healthy model (CPU): check_finite and trace vs detect_anomaly vs bare.

    python benchmarks/bench_debug.py

ResNet-18, batch 4 x 3 x 128 x 128, forward + backward, variants interleaved round by round, median of rounds.
Also checks that a model runs at its bare speed once a trace block has exited (nothing left behind).
"""

from __future__ import annotations

import io
import statistics
import time
import warnings

import torch
import torchvision
from rich.console import Console

import hookkit


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torchvision.models.resnet18()
    x = torch.randn(4, 3, 128, 128)
    sink = Console(file=io.StringIO(), width=120, color_system=None)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def bare() -> None:
        step()

    def finite() -> None:
        with hookkit.check_finite(model):
            step()

    def anomaly() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly():
                step()

    def traced() -> None:
        sink.file.seek(0)
        sink.file.truncate()
        with hookkit.trace(model, console=sink):
            step()

    def after_trace() -> None:  # the same model right after a trace block: must cost what bare costs
        step()

    variants = {"bare": bare, "check_finite": finite, "detect_anomaly": anomaly, "trace (all modules)": traced,
                "bare, after a trace block": after_trace}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()  # warm-up
    for _r in range(7):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["bare"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-18 4x3x128x128 forward+backward")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:28s} {1e3 * m:8.1f} ms  {m / base:5.2f}x bare")


if __name__ == "__main__":
    main()
