"""Run by tests/test_monitor_ranks.py as two torchrun-style ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT):
a DDP model trained under hookkit.monitor with a NaN in one rank's batch, under one ``on_nonfinite`` mode. Each
scenario writes what every rank saw and decided to ``OUT_DIR/<scenario>-rank-<r>.json``.

    python _monitor_nonfinite_worker.py OUT_DIR MODE      (MODE: warn, stop, raise, raise-caught)

The process group's timeout is short (``PG_TIMEOUT_S``): a rank left waiting in a collective fails within it
instead of hanging the test.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

import hookkit
from hookkit.monitoring.records import JSONL_NAME, read_jsonl

PG_TIMEOUT_S = 20
STEPS = 6
# scenario: (every, step of the NaN, where: rank -> how) with how "batch" (a NaN in that rank's input, so layer
# '0' is the first to produce one) or a layer name (a NaN put into that layer's output by a forward hook)
SCENARIOS = {
    "unrecorded": (4, 3, {1: "batch"}),  # steps 0 and 4 are recorded, the NaN comes at step 3
    "recorded": (2, 2, {1: "batch"}),
    "both": (4, 3, {0: "2", 1: "batch"}),  # rank 0 in layer '2', rank 1 in its batch, the same step
}


def scenario(name: str, mode: str, out: str, rank: int) -> dict:
    every, nan_step, where = SCENARIOS[name]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    step = [0]
    how = where.get(rank)
    if how is not None and how != "batch":
        def inject(module, args, output):
            if step[0] == nan_step:
                output = output.clone()
                output[0, 0] = math.nan
                return output
            return None
        net[int(how)].register_forward_hook(inject)
    model = nn.parallel.DistributedDataParallel(net)
    census = hookkit.hook_census(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    log = os.path.join(out, f"log-{name}")
    seen: dict = {"error": None, "error_layer": None, "error_rank": None, "caught_at": None, "saved": False}
    loop_steps = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with hookkit.monitor(model, ["0", "1", "2", "3"], every=every, log=log, summary=False,
                                 on_nonfinite="raise" if mode == "raise-caught" else mode) as mon:
                for i in range(STEPS):
                    step[0] = i
                    x = torch.randn(8, 6, generator=g)
                    if how == "batch" and i == nan_step:
                        x[0, 0] = math.nan
                    model(x).pow(2).mean().backward()
                    opt.step()
                    opt.zero_grad()
                    loop_steps = i + 1
                    if mode == "raise-caught" and seen["caught_at"] is not None:
                        continue  # the monitor is closed: train on without it
                    try:
                        mon.step()
                    except hookkit.NonFiniteError as exc:
                        if mode != "raise-caught":
                            raise
                        # what a loop does to save a checkpoint: rank 0 writes, every rank waits for it
                        seen.update(error=str(exc), error_layer=exc.layer, error_rank=getattr(exc, "rank", None),
                                    caught_at=i)
                        if rank == 0:
                            torch.save(net.state_dict(), os.path.join(out, f"ckpt-{name}.pt"))
                        dist.barrier()
                        seen["saved"] = True
                    if mon.should_stop:
                        break
        except hookkit.NonFiniteError as exc:
            seen.update(error=str(exc), error_layer=exc.layer, error_rank=getattr(exc, "rank", None))
    # every rank reached this point together: one more collective that each rank must take part in
    total = torch.ones(1)
    dist.all_reduce(total)
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return {**seen, "census_kept": hookkit.hook_census(model) == census, "loop_steps": loop_steps,
            "mon_steps": mon.steps, "should_stop": mon.should_stop,
            "warnings": [str(w.message) for w in caught if "NaN" in str(w.message)],
            "alerts": mon.alerts, "records": [{"step": r["step"], "alerts": r["alerts"]} for r in mon.records],
            "jsonl": [{"step": r["step"], "alerts": r["alerts"]} for r in read_jsonl(os.path.join(log, JSONL_NAME))]
            if rank == 0 else None,
            "all_reduce": float(total), "params": [None if math.isnan(v) else v for v in params.tolist()]}


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    rank = dist.get_rank()
    for name in SCENARIOS:
        result = scenario(name, mode, out, rank)
        with open(os.path.join(out, f"{name}-rank-{rank}.json"), "w") as f:
            json.dump(result, f)
        gc.collect()  # the scenario's DDP reducer gone before the next one builds its own
    # Both ranks done before either tears down (a gloo group destroyed only at interpreter exit can abort with
    # "terminate called without an active exception", pytorch PR 179291).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
