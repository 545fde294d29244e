"""Run by tests/test_param_grads.py as two torchrun-style ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): a
DDP model under ``hookkit.capture(..., param_grads=True)``, each rank on its half of each global batch; each rank
saves what the capture holds and what ``p.grad`` holds after every backward.

    python _param_grads_worker.py OUT_DIR
"""

from __future__ import annotations

import datetime
import gc
import os
import sys

import torch
import torch.nn as nn

import hookkit

LAYERS = ["0", "2"]
RANKS = 2


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def global_batches() -> list[torch.Tensor]:
    """Three global batches of 16 samples (rank r takes rows 8r..8r+7), the ranks' halves far apart."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(16, 6, generator=g) * torch.arange(1, 17).unsqueeze(1) / 4 for _ in range(3)]


def loss(out: torch.Tensor) -> torch.Tensor:
    return (out - 1).pow(2).mean()


def state(cap: hookkit.Capture, net: nn.Module) -> dict:
    """What the capture holds and each parameter's ``.grad``, now."""
    captured = {layer: {p: g.clone() for p, g in grads.items()} for layer, grads in cap.param_grads.items()}
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    return {"captured": captured, "grad": grads}


def main() -> None:
    out = sys.argv[1]
    dist = torch.distributed
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))  # a hang fails, quickly
    rank = dist.get_rank()
    net = model()
    ddp = nn.parallel.DistributedDataParallel(net)
    mine = [x[8 * rank:8 * rank + 8] for x in global_batches()]
    before = hookkit.hook_census(ddp)
    result = {}
    with hookkit.capture(ddp, LAYERS, param_grads=True) as cap:
        loss(ddp(mine[0])).backward()
        result["synced"] = state(cap, net)
        ddp.zero_grad()
        with ddp.no_sync():  # gradient accumulation: the first micro-batch is not reduced
            loss(ddp(mine[1])).backward()
        result["local"] = state(cap, net)
        loss(ddp(mine[2])).backward()  # the second is, with the first's gradient accumulated into it
        result["accumulated"] = state(cap, net)
    result["census_unchanged"] = hookkit.hook_census(ddp) == before
    torch.save(result, os.path.join(out, f"rank-{rank}.pt"))
    del ddp
    gc.collect()  # no DDP reducer left holding the group when it is destroyed (pytorch PR 179291)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
