"""Run by tests/test_parallel_ops.py as two torchrun-style ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): a
healthy model sharded with FSDP2 (``fully_shard``, CPU, gloo) under ``check_finite(ops=True)``, ``monitor(ops=True)``
and ``trace(ops=True)``, in several runs with freed memory full of NaN; then a NaN the model makes itself. Each rank
saves what it saw.

    python _fsdp_ops_worker.py OUT_DIR
"""

from __future__ import annotations

import datetime
import gc
import io
import json
import os
import sys

import torch
import torch.nn as nn
from rich.console import Console

import hookkit

RUNS = 3


class Block(nn.Module):
    """A block with ops of its own: ``sqrt`` makes NaN once ``shift`` exceeds its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.shift = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.lin(x).abs() - self.shift) + x


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), Block(), Block(), nn.Linear(16, 1))


def batch() -> torch.Tensor:
    """The global batch: 16 samples, rank r takes rows 8r..8r+7."""
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(3))


def poison() -> None:
    """Fill memory with NaN and free it, so that the allocator may hand it to the next uninitialised buffer (FSDP2's
    all-gather buffers, ``torch.empty``): every size up to 4096 floats, the sizes its buffers have here."""
    held = [torch.full((n,), float("nan")) for n in range(1, 4097)]
    del held


def traced_ops(net: nn.Module, x: torch.Tensor) -> list[str]:
    """The op lines ``trace(ops=True)`` prints in one forward and backward (one per op, indented)."""
    buf = io.StringIO()
    with hookkit.trace(net, ops=True, console=Console(file=buf, width=300, color_system=None)):
        net(x).sum().backward()
    return [line.split()[1] for line in buf.getvalue().splitlines() if line.startswith("  ▷")]


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = sys.argv[1]
    dist = torch.distributed
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))  # a hang fails, quickly
    rank = dist.get_rank()
    x = batch()[8 * rank:8 * rank + 8]
    plain = model()
    result: dict = {"plain_names": hookkit.layer_names(plain, x), "plain_ops": traced_ops(plain, x)}
    net = model()
    mesh = init_device_mesh("cpu", (2,))
    for m in net:
        fully_shard(m, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net(x).sum().backward()  # FSDP2's lazy init registers state-dict hooks of its own at the first forward
    opt.zero_grad()
    before = hookkit.hook_census(net)
    with hookkit.capture(net, ["0", "2"], param_grads=True) as cap:  # before any step: the weights of model()
        net(x).pow(2).mean().backward()
    result["param_grads"] = {f"{layer}.{p}": g.full_tensor().tolist()
                             for layer, grads in cap.param_grads.items() for p, g in grads.items()}
    result["grads_are_p_grad"] = all(
        torch.equal(g.full_tensor(), net.get_parameter(f"{layer}.{p}").grad.full_tensor())
        for layer, grads in cap.param_grads.items() for p, g in grads.items())
    opt.zero_grad()
    result["check_finite"] = []
    result["alerts"] = []
    for _ in range(RUNS):
        poison()
        try:
            with hookkit.check_finite(net, ops=True):
                net(x).pow(2).mean().backward()
            result["check_finite"].append("ok")
        except hookkit.NonFiniteError as exc:  # (the other rank may go on into a collective this one skips)
            print(f"rank {rank}: check_finite raised: {exc}", flush=True)
            result["check_finite"].append(str(exc))
        opt.step()
        opt.zero_grad()
        poison()
        sunk: list = []
        with hookkit.monitor(net, every=1, ops=True, sinks=[sunk.append], summary=False) as mon:
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
        result["alerts"].extend(str(a) for a in mon.alerts)
    result["names"] = hookkit.layer_names(net, x)
    result["ops"] = traced_ops(net, x)
    opt.zero_grad()
    net[2].shift = 1e3  # a NaN the model itself makes, on both ranks: still caught, and named
    try:
        with hookkit.check_finite(net, ops=True):
            net(x).sum().backward()
        result["real_nan"] = "not caught"
    except hookkit.NonFiniteError as exc:
        result["real_nan"] = str(exc)
    result["census_unchanged"] = hookkit.hook_census(net) == before
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    del net, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
