"""Run by tests/test_monitor_distributed.py under ``torch.distributed.run`` (2 or 3 gloo ranks on CPU): the same
small MLP and the same global batches as the test's one-process reference, trained under hookkit.monitor with each
parallelism in turn; rank 0 saves what its sink got and, for every recorded step, the norm of the whole gradient
each parameter's optimizer stepped with.

    python -m torch.distributed.run --nproc-per-node N _monitor_dist_worker.py OUT_DIR MODE [MODE...]
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import hookkit

STEPS, EVERY, MICRO, LR = 4, 2, 2, 0.1


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 18)  # 18 hidden: tensor parallel over 2 or 3 ranks (it needs even shards);
        # fc2.weight has 4 rows: FSDP2 over 3 ranks shards it 2, 2, 0
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(18, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def global_batches(batch: int) -> list[list[torch.Tensor]]:
    """Per step, MICRO micro-batches of the global batch (all of them used by the no_sync mode, the first by the
    others)."""
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(batch, 6, generator=g) * 2 - 0.5 for _ in range(MICRO)] for _ in range(STEPS)]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def refuse_2d() -> dict:
    """FSDP2 on a two-dimensional mesh (HSDP, 1 x world): refused before any hook, naming the parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard")))
    census = hookkit.hook_census(model)
    try:
        hookkit.monitor(model, ["fc1"], summary=False)
    except hookkit.ArgumentError as e:
        return {"error": str(e), "census_kept": hookkit.hook_census(model) == census}
    return {"error": None, "census_kept": True}


def run(mode: str, batch: int) -> dict:
    if mode == "refuse_2d":
        return refuse_2d()
    rank, world = dist.get_rank(), dist.get_world_size()
    model: nn.Module = make_model()
    data_parallel = not mode.startswith("tp")
    if mode in ("ddp", "ddp_nosync"):
        model = nn.parallel.DistributedDataParallel(model)
    elif mode in ("fsdp", "fsdp_bf16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mode == "fsdp_bf16" else MixedPrecisionPolicy()
        fully_shard(model.fc1, mp_policy=mp)
        fully_shard(model.fc2, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif mode in ("tp", "tp_dtensor"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        # tp_dtensor: fc1 and act hand DTensors on (use_local_output=False), sharded over the hidden features
        dtensors = mode == "tp_dtensor"
        parallelize_module(model, init_device_mesh("cpu", (world,)),
                           {"fc1": ColwiseParallel(use_local_output=not dtensors), "fc2": RowwiseParallel()})
    else:
        raise SystemExit(f"unknown mode {mode}")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sunk: list[dict] = []
    stepped: list[dict] = []
    micros = MICRO if mode == "ddp_nosync" else 1
    if mode.startswith("fsdp"):  # FSDP2 adds its own state_dict hooks at its first forward
        with torch.no_grad():
            model(torch.zeros(1, 6))
    census = hookkit.hook_census(model)
    with hookkit.monitor(model, ["fc1", "act", "fc2"], every=EVERY, sinks=[sunk.append], summary=False) as mon:
        for step, xs in enumerate(global_batches(batch)):
            for i, x in enumerate(xs[:micros]):
                # each rank its part of the global batch (tensor_split: uneven parts for 3 ranks), the loss scaled
                # so that the ranks' average (what DDP and FSDP step with) is the global batch's mean
                local = x.tensor_split(world)[rank] if data_parallel else x
                sync = i == micros - 1 or mode != "ddp_nosync"
                with model.no_sync() if not sync else _null():
                    out = model(local).float()
                    (out.pow(2).sum() * (world if data_parallel else 1) / (x.shape[0] * out.shape[1])).backward()
            if step % EVERY == 0:  # every rank: full_tensor() is a collective
                stepped.append({n.removeprefix("module."): float(full(p.grad).double().norm())
                                for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
            mon.step()
    strip = [{k: v for k, v in r.items() if k != "histograms"} for r in sunk]
    return {"sunk": strip, "stepped": stepped, "rank": rank, "census_kept": hookkit.hook_census(model) == census}


class _null:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


def main() -> None:
    out, batch, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results = {}
    for mode in modes:
        results[mode] = run(mode, batch)
        gc.collect()  # no DDP reducer or FSDP state left holding the group
        dist.barrier()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
