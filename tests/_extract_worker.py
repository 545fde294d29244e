"""Run by tests/test_extract.py in subprocesses: under torchrun (gloo), or as a run that gets killed midway."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn

import hookkit


def model_and_data(n: int, batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
    batches = [(x[i:i + batch], torch.zeros(len(x[i:i + batch]))) for i in range(0, n, batch)]
    return model, x, batches


def main() -> None:
    mode, out, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model, _, batches = model_and_data(n, batch)
    if mode == "dist":
        torch.distributed.init_process_group("gloo")
        try:
            hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
        finally:
            torch.distributed.destroy_process_group()
    elif mode == "slow":  # prints each batch it computes, sleeps, so the parent can kill -9 it midway
        def slow():
            for b in batches:
                yield b
                time.sleep(0.05)

        def announce(module, args, output):
            print("batch", flush=True)

        model[0].register_forward_hook(announce)
        hookkit.extract(model, ["1", "3"], slow(), out=out, progress=False)
        print("finished", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
