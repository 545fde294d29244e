"""``monitor()``'s statistics collection: the listeners it hands the hook engine (``core.engine.Engine``).

``Finite`` listens on the light engine, entered for the whole run: one float64 sum per selected layer's output (and
per op with ``ops=True``) on every step, checked together once per step, and nothing else kept between steps.
``Collect`` listens on the full engine, entered only for recorded steps: each layer's output statistics (as sums,
for ``monitoring.ranks.Reduction`` to add over ranks and finish) and the squared norm of the gradient w.r.t. it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hookkit.core import tree as _tree
from hookkit.core.listener import Listener
from hookkit.core.ops import OpSite, call_name
from hookkit.monitoring.ranks import local

__all__ = ["Finite", "Collect", "sq_norm", "sample"]

_HIST_VALUES = 1 << 16  # at most this many values of a tensor go into a histogram (an even stride through it)


class Finite(Listener):
    """Every step: one sum per selected layer's output (and per op in their own code, with ``ops=True``; float64,
    so that only NaN or Inf, never an overflow, makes it non-finite), checked together once at the end of the step."""

    def __init__(self) -> None:
        self.sums: list[tuple[str, OpSite | None, int, torch.Tensor]] = []  # (name, op site, call, sum)

    def forward(self, where: tuple[str, Any, int], args: tuple, output: Any) -> None:
        name, site, call = where  # call: which call of the layer in its forward, as FX numbers them
        for t in _tree.leaves(output):
            if (t.is_floating_point() or t.is_complex()) and t.numel() and t.device.type != "meta":
                with torch.no_grad():
                    # this rank's shard of a DTensor output (tensor parallel): a DTensor's sum would be a Partial
                    # one, reduced by a collective later; the ranks agree on the verdict in Monitor.step()
                    total = local(t.detach()).sum(dtype=torch.complex128 if t.is_complex() else torch.float64)
                self.sums.append((name, site if isinstance(site, OpSite) else None, call, total))
                return

    def end_step(self, step: int, *, rank: int | None) -> dict[str, Any] | None:
        """The alert for the first non-finite output of this step (in execution order: an op inside a layer comes
        before the layer's own output), else None. ``rank``: this process's, named in the message, under
        ``torch.distributed`` with more than one rank; else None (the alert's ``"rank"`` is 0)."""
        sums, self.sums = self.sums, []
        if not sums or bool(torch.isfinite(torch.stack([s[-1] for s in sums]).cpu()).all()):
            return None
        name, site, call, _ = next(item for item in sums if not bool(torch.isfinite(item[-1])))
        name = name.removeprefix("module.")
        when = f"step {step}" if rank is None else f"step {step}, rank {rank}"
        this = "this step" if rank is None else "this step on this rank"
        alert = {"kind": "nonfinite", "step": step, "rank": rank or 0}
        if site is None:
            return {**alert, "where": name, "op": None, "what": "activation",
                    "message": f"{when}: {call_name(name, call)!r} produced NaN or Inf in forward, the first "
                               f"of the watched layers to do so in {this}. monitor(..., ops=True) names the op "
                               "too, or hookkit.check_finite(model) on this step's batch."}
        where = site.scope.removeprefix("module.")
        scope = f"{where!r} ({site.scope_cls})" if where else f"the model's own forward ({site.scope_cls})"
        return {**alert, "where": where, "op": f"{name} ({site.label})", "what": "activation",
                "message": f"{when}: {call_name(name, call)!r} ({site.label}) in {scope} produced NaN or "
                           "Inf in forward, the first of the watched layers and their ops to do "
                           f"so in {this}."}


class Collect(Listener):
    """Recorded steps: the statistics of each layer's output and of the gradient w.r.t. it, summed over calls."""

    def __init__(self, histograms: bool) -> None:
        self.sums: dict[str, list[float]] = {}  # n, sum, sum of squares, absmax, zeros, nan, inf
        self.grad_sq: dict[str, float] = {}
        self.param_sq: dict[tuple[str, str], float] = {}  # (layer, parameter) -> squared norm of its gradient
        self.histograms = histograms
        self.hists: dict[str, Any] = {}

    def forward(self, where: tuple[str, Any, int], args: tuple, output: Any) -> None:
        name = where[0]
        t = next((t for t in _tree.leaves(output) if t.is_floating_point()), None)
        if t is None:
            return
        t = local(t)  # a DTensor output (tensor parallel): this rank's part; the ranks' sums are reduced later
        if t.numel() == 0:
            return
        with torch.no_grad():
            x = t.detach()  # float64 sums without a float64 copy; max and counts are exact in x's own dtype
            vals = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                                x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64) ** 2,
                                x.abs().max().double(), (x == 0).sum().double(), torch.isnan(x).sum().double(),
                                torch.isinf(x).sum().double()]).tolist()
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = vals
        else:
            for i in (0, 1, 2, 4, 5, 6):
                acc[i] += vals[i]
            acc[3] = max(acc[3], vals[3]) if not math.isnan(vals[3]) else vals[3]
        if self.histograms:
            self.hists.setdefault(f"{name.removeprefix('module.')}/activation", sample(t.detach()))

    def grad(self, where: tuple[str, Any, int], which: str, i: int, n: int, grad: torch.Tensor) -> None:
        if which != "output":
            return
        with torch.no_grad():
            sq = sq_norm(local(grad))
        self.grad_sq[where[0]] = self.grad_sq.get(where[0], 0.0) + sq

    def param_grad(self, layer: str, pname: str, grad: torch.Tensor) -> None:
        # read from .grad at the end of each backward (no copy kept); the last backward of a step wins
        self.param_sq[(layer, pname)] = sq_norm(local(grad))

def sq_norm(t: torch.Tensor) -> float:
    """The squared L2 norm of ``t``, accumulated in float64 (no float64 copy of ``t`` is made)."""
    with torch.no_grad():
        return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2


def sample(t: torch.Tensor) -> Any:
    flat = t.reshape(-1)
    if flat.numel() > _HIST_VALUES:
        flat = flat[:: -(-flat.numel() // _HIST_VALUES)]
    return flat.float().cpu().numpy()
