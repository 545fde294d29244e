"""Run by tests/test_monitor.py as two torchrun-style ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): a DDP
model trained under hookkit.monitor; each rank saves the record it finished (its statistics reduced over the ranks),
rank 0 what its sink got.

    python _monitor_worker.py OUT_DIR
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys

import torch
import torch.nn as nn

import hookkit
from hookkit.monitoring import ranks as _ranks


def train(rank: int) -> dict:
    """Each rank's own records and what rank 0's sink got. The DDP model, which holds the process group, is gone
    when this returns."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1)))
    own: list[dict] = []
    reduce = _ranks.reduced

    def keep_own(record):
        own.append(copy.deepcopy({k: v for k, v in record.items() if k != "histograms"}))
        return reduce(record)

    _ranks.reduced = keep_own
    sunk: list[dict] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    with hookkit.monitor(model, ["0", "1", "2"], every=2, sinks=[sunk.append], summary=False) as mon:
        for _ in range(4):
            model(torch.randn(8, 6, generator=g) * (1 + rank)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    _ranks.reduced = reduce
    return {"own": own, "sunk": [{k: v for k, v in r.items() if k != "histograms"} for r in sunk]}


def main() -> None:
    out = sys.argv[1]
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    result = train(rank)
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    # Both ranks done before either tears down, and no DDP reducer left holding the group: a gloo group destroyed
    # only at interpreter exit can abort with "terminate called without an active exception" (pytorch PR 179291).
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
