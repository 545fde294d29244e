"""``monitor()`` under ``torch.distributed``: which rank this is, this rank's part of a DTensor, the layouts the
reduction covers, the ranks' agreement on each step's non-finite verdict, and the reduction of a recorded step's sums
over ranks, finished into the record's statistics.

``monitoring.monitor.Monitor`` calls ``agreed_alerts`` once per ``step()`` on every rank (never inside a hook, whose
calls depend on a rank's data) and ``Reduction`` once per recorded step; ``monitoring.collect``'s listeners take
``local`` parts of DTensors. Outside ``torch.distributed`` (or with one rank) nothing here calls a collective.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError
from hookkit.monitoring.records import LAYER_STATS

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["Reduction", "agreed_alerts", "verdict", "check_layout", "reduced", "rank", "world_size", "local"]


class Reduction:
    """One recorded step's sums, of every watched layer and parameter, reduced over ranks and finished into
    statistics: added (counts, sums, squares) in one SUM ``all_reduce`` and maximised in one MAX ``all_reduce``,
    the same two calls in the same order on every rank; nothing is called outside ``torch.distributed`` or with one
    rank. Statistics are finished only from the reduced sums, never averaged over ranks."""

    _SUMS = 8  # per layer: n, sum, sum of squares, zeros, nan, inf, the output gradient's squared norm, gradients

    def __init__(self, *, data_parallel: bool) -> None:
        self.data_parallel = data_parallel
        self.world = world_size()
        self.sums: list[float] = []
        self.maxes: list[float] = []
        self.layers: list[tuple[int, int]] = []  # where each layer's numbers start in sums and in maxes
        self.params: list[int] = []  # where each parameter's numbers start in sums

    def add_layer(self, acc: list[float] | None, grad_sq: float | None) -> None:
        n, total, sq, absmax, zeros, nan, inf = acc if acc is not None else (0.0, 0.0, 0.0, -math.inf, 0.0, 0.0, 0.0)
        vals = [n, total, sq, zeros, nan, inf, grad_sq or 0.0, 0.0 if grad_sq is None else 1.0]
        self.layers.append((len(self.sums), len(self.maxes)))
        self.sums += vals
        # the max of each sum and of its negative (minus the min): under tensor parallel, whether a layer's output
        # is the same on every rank (counted once) or sharded over them (added)
        self.maxes += [-math.inf if math.isnan(absmax) else absmax, *vals, *(-v for v in vals)]

    def add_param(self, p: torch.Tensor, w_sq: float, delta_sq: float | None, grad_sq: float | None) -> int:
        """Squares of this rank's part of ``p`` (its shard where ``p`` is a DTensor), weighted so that their sum
        over all ranks counts each element of the whole parameter once; returns the parameter's index."""
        copies = self.world / distinct_shards(p)
        self.params.append(len(self.sums))
        self.sums += [w_sq / copies, (delta_sq or 0.0) / copies, float(delta_sq is not None),
                      (grad_sq or 0.0) / copies, float(grad_sq is not None)]
        return len(self.params) - 1

    def reduce(self) -> None:
        if self.world == 1:
            return
        dist = torch.distributed
        device = collective_device()
        for values, op in ((self.sums, dist.ReduceOp.SUM), (self.maxes, dist.ReduceOp.MAX)):
            if values:  # the same layers and parameters, so the same lengths, on every rank
                t = torch.tensor(values, dtype=torch.float64, device=device)
                dist.all_reduce(t, op=op)
                values[:] = t.tolist()

    def layer_stats(self, i: int) -> dict[str, Any]:
        s, m = self.layers[i]
        n, total, sq, zeros, nan, inf, grad_sq, grads = self.sums[s:s + self._SUMS]
        absmax = self.maxes[m]
        hi = self.maxes[m + 1:m + 1 + self._SUMS]
        lo = [-v for v in self.maxes[m + 1 + self._SUMS:m + 1 + 2 * self._SUMS]]
        if self.world > 1 and not self.data_parallel:  # tensor parallel: every rank the same batch
            same = hi[:6] == lo[:6] if hi[0] > 0 else hi[6] == lo[6]
            if same:  # a replicated output: each rank holds all of it
                n, total, sq, zeros, nan, inf, grad_sq = hi[:7]
        elif self.world > 1:  # the gradient of the mean of the ranks' losses, which DDP and FSDP average
            grad_sq /= self.world ** 2
        out: dict[str, Any] = dict.fromkeys(LAYER_STATS)
        out["grad_norm"] = math.sqrt(grad_sq) if grads else None
        if not n:
            return out
        var = (sq - total * total / n) / (n - 1) if n > 1 else math.nan
        out.update(act_mean=total / n, act_std=math.sqrt(max(var, 0.0)) if not math.isnan(var) else math.nan,
                   act_absmax=math.nan if nan else absmax, zero_frac=zeros / n, nan=int(nan), inf=int(inf))
        return out

    def param_stats(self, j: int) -> dict[str, Any]:
        s = self.params[j]
        w_sq, delta_sq, deltas, grad_sq, grads = self.sums[s:s + 5]
        norm = math.sqrt(w_sq)
        return {"grad_norm": math.sqrt(grad_sq) if grads else None, "weight_norm": norm,
                "update_ratio": math.sqrt(delta_sq) / norm if deltas and norm else None}


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device() -> torch.device:
    """Where the reduction's tensors live: the CPU for gloo (also a ``cpu:gloo,cuda:nccl`` group), else the current
    accelerator (NCCL reduces only device tensors)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def dtensor_type() -> type[DTensor] | None:
    """DTensor, where it may exist: no DTensor can exist before its module is imported (so a process that never
    uses one never pays for importing it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2, tensor parallel), with no collective; any other tensor itself."""
    dtensor = dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def distinct_shards(p: torch.Tensor) -> int:
    """Into how many distinct parts a parameter is split over the ranks: the product of its mesh's sizes along the
    dimensions where it is sharded (1 for a plain tensor: every rank holds all of it)."""
    dtensor = dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return 1
    return math.prod(p.device_mesh.size(d) for d, pl in enumerate(p.placements) if pl.is_shard())


def check_layout(model: nn.Module) -> bool:
    """Whether the ranks split the batch (data parallel: DDP, FSDP2, a plain model) rather than share it (tensor
    parallel: DTensor parameters without FSDP2); refuses what the reduction does not cover yet."""
    dtensor = dtensor_type()
    if dtensor is None or not torch.distributed.is_initialized():
        return True
    from torch.distributed.fsdp import FSDPModule

    sharded = [(n, p) for n, p in model.named_parameters() if isinstance(p, dtensor)]
    for name, p in sharded:
        if p.device_mesh.ndim > 1:
            raise ArgumentError(f"parameter {name!r} is a DTensor on a {p.device_mesh.ndim}-dimensional device "
                                "mesh (HSDP, or FSDP2 with tensor parallel): monitor reduces statistics over "
                                "one-dimensional meshes only (DDP, FSDP2, tensor parallel) for now.")
        if any(pl.is_partial() for pl in p.placements):
            raise ArgumentError(f"parameter {name!r} is a DTensor with a Partial placement: monitor cannot tell "
                                "its whole value from its parts; redistribute it to Shard or Replicate.")
    return not sharded or any(isinstance(m, FSDPModule) for m in model.modules())


def reduced(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record on rank 0 (its statistics are already the whole run's: ``Reduction``), None on the other ranks."""
    return record if rank() == 0 else None


def agreed_alerts(alert: dict[str, Any] | None) -> list[dict[str, Any]]:
    """This step's alerts of every rank, in rank order, the same list on every rank; ``[]`` when no rank saw a
    non-finite output. Under ``torch.distributed`` (more than one rank) every rank calls this at every step, whatever
    its own data showed: one all_reduce of one number (the lowest rank that saw one, or the world size), and only
    when some rank did, an ``all_gather_object`` of the alerts, which every rank then calls too."""
    if world_size() == 1:
        return [] if alert is None else [alert]
    dist = torch.distributed
    world = dist.get_world_size()
    first = torch.tensor([world if alert is None else dist.get_rank()], dtype=torch.int64,
                         device=collective_device())
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if int(first.item()) == world:
        return []
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, alert)
    return [a for a in gathered if a is not None]


def verdict(alerts: list[dict[str, Any]]) -> str:
    """The warning or error of a non-finite step: the first rank's alert, naming the other ranks that saw one."""
    message = alerts[0]["message"]
    if len(alerts) > 1:
        others = ", ".join(f"rank {a['rank']} too ({a['where']!r})" for a in alerts[1:])
        message += f" Non-finite outputs in the same step on {others}; mon.alerts holds every rank's alert."
    return message
