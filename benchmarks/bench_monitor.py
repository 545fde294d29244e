#!/usr/bin/env python
"""What ``hookkit.monitor`` costs a training loop: bare vs ``monitor(every=100)`` vs ``every=1`` vs
``wandb.watch(log="all", log_freq=100)`` (offline; left out when wandb does not import).

    python benchmarks/bench_monitor.py [--steps 200] [--rounds 5] [--device cpu|cuda] [--threads N]

ResNet-18 (torchvision, random init), batch 32 x 3 x 32 x 32, SGD (lr 0.01, momentum 0.9), ``--steps`` optimizer
steps per round; the variants run interleaved, round by round (``bench_extract.interleaved``), and the medians of
the rounds are compared. Every variant runs the same loop (forward, cross-entropy, backward, step, zero_grad);
monitor adds ``mon.step()`` and writes its JSONL into a temporary folder (layers: the model's children, so every
parameter); wandb adds ``wandb.watch`` and, every ``log_freq`` steps, the ``run.log`` that commits its
histograms (offline, in a temporary folder, WANDB_SILENT). On CUDA each round ends with a synchronize.

Measured 2026-11-26 (CPU, 2 threads, --steps 200 --rounds 5, wandb 0.31.0; single rounds moved +-15% around their
median): medians per step bare 69.5 ms, monitor(every=100) 71.0 ms (1.022x; the run before the float64 statistics
stopped copying tensors to float64: 1.034x), monitor(every=1) 142 ms (2.04x; before: 2.55x),
wandb.watch(log="all", log_freq=100) 70.1 ms (1.009x).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import interleaved  # noqa: E402

import hookkit  # noqa: E402


def wandb_module() -> Any:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except Exception as exc:  # not installed, or broken against this environment
        print(f"wandb.watch left out: wandb does not import ({type(exc).__name__}: {exc})")
        return None
    return wandb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per round (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(torch.randn(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device))
               for _ in range(8)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_monitor_"))

    def loop(after_step: Callable[[int, torch.Tensor], None] = lambda i, loss: None) -> None:
        for i in range(args.steps):
            x, y = batches[i % len(batches)]
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            after_step(i, loss)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        loop()

    children = [name for name, _ in model.named_children()]  # what the figures above measured

    def monitored(every: int) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory(dir=tmp) as log, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with hookkit.monitor(model, children, every=every, log=log, summary=False) as mon:
                    loop(lambda i, loss: mon.step())
        return run

    variants: dict[str, Callable[[], None]] = {
        "bare": bare, "monitor(every=100)": monitored(100), "monitor(every=1)": monitored(1)}

    wandb = wandb_module()
    if wandb is not None:
        @contextlib.contextmanager
        def watched() -> Iterator[Any]:
            with tempfile.TemporaryDirectory(dir=tmp) as d:
                run = wandb.init(project="bench_monitor", dir=d, mode="offline")
                run.watch(model, log="all", log_freq=100)
                try:
                    yield run
                finally:
                    run.unwatch(model)
                    run.finish()

        def wandb_watch() -> None:
            with watched() as run:
                loop(lambda i, loss: run.log({"loss": loss.item()}) if i % 100 == 99 else None)

        variants["wandb.watch(log='all', log_freq=100)"] = wandb_watch

    print(f"ResNet-18, batch 32x3x32x32, SGD, {args.steps} steps per round, {args.rounds} interleaved rounds, "
          f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                f", {torch.get_num_threads()} threads") + f", torch {torch.__version__}")
    times = interleaved(variants, args.rounds)
    base = statistics.median(times["bare"])
    print(f"{'variant':40} {'median s/round':>15} {'ms/step':>9} {'vs bare':>8}   rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:40} {med:15.3f} {1000 * med / args.steps:9.2f} {med / base:8.3f}x   "
              + " ".join(f"{t:.2f}" for t in ts))


if __name__ == "__main__":
    main()
