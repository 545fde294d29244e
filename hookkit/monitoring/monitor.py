"""``monitor()``: watch a training run layer by layer: statistics of activations, gradients and parameter updates on
recorded steps, an alert at the first non-finite activation on any step, records handed to sinks.

How it connects: ``Monitor`` owns two views on the hook engine (``core.engine.Engine``, as ``trace`` and ``extract``):
a light one, entered for the whole block, whose listener (``_Finite``) takes one sum per selected layer's output
on every step, so that the first NaN or Inf is found at its step and layer without a sync per layer; and a full one
(``_Collect``), entered only for recorded steps (``every``), which takes the activation statistics and the gradient
w.r.t. each layer's output. Parameter gradients are read from ``p.grad`` when a backward has finished (after DDP's
and FSDP's own end-of-backward reductions: the gradient the optimizer steps with), and update ratios come from a copy
of the weights taken when a recorded step begins; all of these exist only during recorded steps. Under
``torch.distributed`` each recorded step's sums (counts, sums, squares, maxima; of each rank's own shard where a
tensor is a DTensor) are reduced over ranks in one SUM and one MAX ``all_reduce`` before any statistic is finished
(``_Reduction``), so that each statistic is the whole run's. Each recorded step (and each step with an alert)
becomes one record, a plain dict (schema in ``monitoring.sinks``), handed by rank 0 to the sinks
(``monitoring.sinks.make_sinks``: JSONL, TensorBoard, W&B, callables). ``monitoring.plot.summary_table`` renders the run
at the end. Under ``torch.distributed`` the ranks agree on each step's non-finite verdict in ``step()``
(``_agreed_alerts``; never inside a hook, whose calls depend on a rank's data), so that every rank calls the same
collectives and warns, raises or stops at the same step.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError, ArgumentTypeError, NonFiniteError
from hookkit.core import tree as _tree
from hookkit.core.compat import after_gradient_reduction
from hookkit.core.engine import Engine
from hookkit.core.handles import HandleGroup
from hookkit.core.ops import OpSite, call_name
from hookkit.core.select import Layers, select

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["monitor", "Monitor", "LAYER_STATS", "PARAM_STATS"]

OnNonFinite = Literal["warn", "raise", "stop"]
LAYER_STATS = ("act_mean", "act_std", "act_absmax", "zero_frac", "nan", "inf", "grad_norm")
PARAM_STATS = ("grad_norm", "weight_norm", "update_ratio")
_HIST_VALUES = 1 << 16  # at most this many values of a tensor go into a histogram (an even stride through it)


def monitor(model: nn.Module, layers: Layers | None = None, *, every: int = 100, log: Any = None,
            sinks: Iterable[Any] | None = None, params: bool = True, histograms: bool = False,
            on_nonfinite: OnNonFinite = "warn", ops: bool = False, summary: bool = True,
            console: Any = None) -> Monitor:
    """Watch a training run layer by layer; call ``mon.step()`` once per training step.

    Example:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with hookkit.monitor(model, ["0", "1"], every=2, summary=False) as mon:
        ...     for _ in range(4):
        ...         model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        ...         mon.step()
        >>> [r["step"] for r in mon.records], sorted(mon.records[0]["layers"]["1"])
        ([0, 2], ['act_absmax', 'act_mean', 'act_std', 'grad_norm', 'inf', 'nan', 'zero_frac'])

    Steps are counted by ``mon.step()`` calls: step 0 runs until the first call. Steps 0, ``every``, 2 ``every``...
    are recorded; on the others only the non-finite check runs (one sum per selected layer's output, and one sync
    per step). Call ``step()`` after the optimizer step: the update ratio of a recorded step is the change that step
    made to the weights.

    Per selected layer (all of its calls in the step together; float64 sums): ``act_mean``, ``act_std`` (unbiased,
    as ``torch.std``), ``act_absmax``, ``zero_frac`` (exact zeros: dead ReLU units), ``nan`` and ``inf`` counts of
    the output's first tensor, and ``grad_norm``, the norm of the gradient w.r.t. that output (``None`` when no
    backward ran). Per parameter of the selected layers (``params=True``): ``grad_norm``, ``weight_norm`` (after the
    step) and ``update_ratio`` = ||w_after - w_before|| / ||w_after||, the learning-rate sanity check (about 1e-3 is
    healthy). ``histograms=True`` adds histograms of activations, parameter gradients and weights.

    Args:
        model: the ``nn.Module`` being trained (a DDP wrapper is seen through).
        layers: anything ``capture`` accepts; ``None`` (default): every submodule, modules only (the model itself
            if it has none; a DDP wrapper is seen through). Op and repeated-call nodes (``"layer1.0.add"``,
            ``"relu_1"``) get the layer statistics and the non-finite check; they own no parameter, so they add no
            parameter statistics (select their module for those).
        every: record every ``every``-th step.
        log: a folder: records go to ``<log>/monitor.jsonl`` (one JSON line per recorded step, flushed and synced,
            so a crash leaves it complete up to the last recorded step), and ``hookkit plot <log>`` draws them.
        sinks: more places for the records: ``"jsonl"``, ``"tensorboard"``, ``"wandb"``, a sink object or a
            callable taking each record (see ``hookkit._sinks``). Neither ``log`` nor ``sinks``: records are kept
            in ``mon.records`` only (they always are).
        params: also watch the parameters of the selected modules (op nodes have none).
        histograms: also hand histograms to the sinks (TensorBoard, W&B; the JSONL file keeps bin counts).
        on_nonfinite: at the first NaN or Inf in a selected layer's output, on any step: ``"warn"`` (a warning
            naming the step and layer), ``"raise"`` (``NonFiniteError``; the hooks come off), or ``"stop"`` (stop
            watching and set ``mon.should_stop``, for the loop to ``break``). The alert is also a record. Under
            ``torch.distributed`` the ranks agree on it at each ``step()``: every rank warns, raises (naming the
            rank and layer, ``NonFiniteError.rank``) or stops at the same step, whichever rank's data made it.
        ops: also check, on every step, each functional op and tensor method in the selected layers' own
            ``forward`` code (as ``check_finite(ops=True)``), so that the alert names the op that made the first
            non-finite value (``'2.sqrt' (torch.sqrt)``) as well as its layer. Costs one sum per op per step.
        summary: print a table of the run (rich, to ``console``, default stderr) when the block ends.

    Under ``torch.distributed`` every statistic is the whole run's, and rank 0 hands the records to the sinks.
    Data parallel (DDP, FSDP2, or a plain model whose ranks each take their part of the global batch): the layer
    statistics are those of the global batch (counts, sums and squares added over ranks before they are finished),
    a layer's ``grad_norm`` is that of the gradient of the mean of the ranks' losses (what DDP and FSDP average),
    and a parameter's ``grad_norm`` is that of the gradient the optimizer steps with, after the reduction (with
    ``no_sync()`` accumulation: the accumulated gradient of the backward that syncs). DTensor parameters (FSDP2,
    tensor parallel): every parameter statistic is the whole parameter's (the shards' squares added up). Tensor
    parallel (``parallelize_module``, every rank the same batch): a layer output that is the same on every rank
    counts once, one sharded over the ranks counts as the whole. Two-dimensional meshes (HSDP, FSDP2 with tensor
    parallel) and pipeline parallel are not supported yet.
    Every rank runs the monitor and calls ``step()`` once per step: each ``step()`` takes one all_reduce of one
    number, until the run's first non-finite step (whose alerts every rank then gathers: rank 0's records and every
    rank's ``mon.alerts`` hold the alert of each rank that saw one, ``alert["rank"]`` naming it), and recorded steps
    their reduction (one SUM and one MAX all_reduce).

    Raises:
        LayerNotFoundError: a layer that the model does not have, before any hook is registered.
        ArgumentTypeError, ArgumentError (a TypeError, a ValueError): an option of the wrong type or value (also
            ``console`` that is not a rich ``Console``, ``log`` that is a file, a sink that is none), before any
            hook is registered or any file is written.
        NonFiniteError: with ``on_nonfinite="raise"``, at the ``step()`` that ends the step with the first
            non-finite output.
        ArgumentError: a model whose parameters are DTensors on a mesh of more than one dimension, or with a
            ``Partial`` placement (not supported yet), before any hook is registered.
    """
    return Monitor(model, layers, every=every, log=log, sinks=sinks, params=params, histograms=histograms,
                   on_nonfinite=on_nonfinite, ops=ops, summary=summary, console=console)


class Monitor:
    """What ``monitor()`` returns; a context manager. ``step()`` ends a step; ``records`` holds every record (without
    histograms); ``should_stop`` is set by ``on_nonfinite="stop"``."""

    def __init__(self, model: nn.Module, layers: Layers | None, *, every: int, log: Any, sinks: Iterable[Any] | None,
                 params: bool, histograms: bool, on_nonfinite: OnNonFinite, ops: bool, summary: bool,
                 console: Any) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model={model!r:.80} ({type(model).__name__}): monitor watches an nn.Module "
                                    "(the model being trained, or its DDP wrapper).")
        _check_options(every=every, log=log, params=params, histograms=histograms, on_nonfinite=on_nonfinite,
                       ops=ops, summary=summary, console=console)
        chosen = select(model, layers, caller="hookkit.monitor", every_if_none=True)
        self.names = chosen.names  # modules, then op / repeated-call nodes (which own no parameter)
        self._modules = {n: m for m, ns in chosen.modules.items() for n in ns}
        self.params: dict[str, nn.Parameter] = {}
        if params:
            for name in self._modules:
                prefix = name.removeprefix("module.")
                for pname, p in self._modules[name].named_parameters():
                    if p.requires_grad:
                        self.params.setdefault(f"{prefix}.{pname}" if prefix else pname, p)
        self._data_parallel = _check_layout(model)
        from hookkit.monitoring.sinks import make_sinks  # checks the sinks before any hook is registered

        self._sinks = make_sinks(log, sinks) if _rank() == 0 else []  # rank 0 writes the reduced records
        self.model = model
        self.every = every
        self.histograms = histograms
        self.on_nonfinite = on_nonfinite
        self.ops = bool(ops)
        self.summary = summary
        self.console = console
        self.records: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []
        self.should_stop = False
        self._alerted = False  # the run had its first non-finite step, the same on every rank
        self.steps = 0  # mon.step() calls so far: the current step's number
        self._finite = _Finite()
        self._light: Engine | None = None
        self._collect: _Collect | None = None
        self._full: Engine | None = None
        self._param_hooks = HandleGroup()
        self._before: dict[str, torch.Tensor] = {}
        self._grad_sq: dict[str, float] = {}
        self._backward_pending = False
        self._entered = self._closed = False

    # -- the block ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        if self._entered:
            raise RuntimeError("a hookkit block can be entered once; call hookkit.monitor(...) again for a new run.")
        self._entered = True
        try:
            self._light = Engine(self.model, self.names, listener=self._finite, keep=False, ops=self.ops)
            self._light.__enter__()
            self._arm()
        except BaseException:
            self._close_hooks()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Take every hook off, close the sinks, print the summary; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close_hooks()
        finally:
            for sink in self._sinks:
                sink.close()
        if self.summary and self.records and _rank() == 0:
            from rich.console import Console

            from hookkit.monitoring.plot import summary_table

            (self.console or Console(stderr=True)).print(summary_table(self.records))

    def _close_hooks(self) -> None:
        self._disarm()
        if self._light is not None:
            light, self._light = self._light, None
            light.__exit__(None, None, None)

    # -- steps -------------------------------------------------------------------------------------------------------

    @property
    def recording(self) -> bool:
        """Whether the current step is recorded."""
        return self._full is not None

    def step(self) -> None:
        """End the current step: check it for non-finite outputs, finish its record if it is recorded, hand the
        record to the sinks, and begin the next step."""
        if not self._entered or self._closed:
            raise RuntimeError("mon.step() is called inside `with hookkit.monitor(...) as mon:`.")
        step = self.steps
        alert = self._finite.end_step(step, rank=_rank() if _world_size() > 1 else None)
        # Every rank takes the same path whatever its own data showed: the verdict is agreed between ranks here, at
        # a point each rank reaches once per step in the same order (never inside a hook), until the run's first
        # non-finite step; after it, as in one process, later ones are not reported.
        alerts = [] if self._alerted else _agreed_alerts(alert)
        self._alerted = bool(alerts) or self._alerted
        recorded = self.recording
        record = self._finish_record(step) if recorded else None
        if alerts:  # the first non-finite step of the run: every rank's alert of that step, in rank order
            self.alerts.extend(alerts)
            if record is None:
                record = self._empty_record(step)
            record["alerts"].extend(alerts)
        if record is not None:
            # an alert-only record has no statistics to reduce; every rank holds the same alerts
            record = _reduced(record) if recorded else record if _rank() == 0 else None
            if record is not None:  # rank 0
                self.records.append({k: v for k, v in record.items() if k != "histograms"})
                for sink in self._sinks:
                    sink.write(record)
        self.steps += 1
        if alerts:
            first, message = alerts[0], _verdict(alerts)
            if self.on_nonfinite == "raise":
                self.close()
                raise NonFiniteError(message, layer=first["where"], phase="forward", call=0, stats=None,
                                     rank=first["rank"] if _world_size() > 1 else None)
            if self.on_nonfinite == "stop":
                self.should_stop = True
                self.close()
                return
            warnings.warn(message, stacklevel=2)
        if self.steps % self.every == 0:
            self._arm()

    def _arm(self) -> None:
        """Begin a recorded step: the full engine, parameter gradient hooks, the weights before the step."""
        self._collect = _Collect(self.histograms, on_backward=self._on_backward)
        self._full = Engine(self.model, self.names, listener=self._collect, keep=False, grads=True)
        self._full.__enter__()
        self._grad_sq = {}
        self._backward_pending = False
        for name, p in self.params.items():
            self._before[name] = _local(p).detach().clone()
            self._param_hooks.param_grad(p, self._on_backward)

    def _on_backward(self, *_: Any) -> None:
        """A backward of a recorded step is running (a parameter's gradient is accumulated, or a layer's output
        gradient is seen; FSDP2's sharded parameters get their gradients without hooks): read the parameters'
        gradients once it has finished, DDP's and FSDP's reductions included."""
        if self._backward_pending:
            return
        self._backward_pending = True
        after_gradient_reduction(self._read_grads)

    def _read_grads(self) -> None:
        """At the end of a backward, after the callbacks queued before this one's outer callback ran: DDP queues its
        all-reduce's finalizer when the last bucket is ready and FSDP2 its reduce-scatter's wait at the root's
        pre-backward, both before the end of the backward, so ``p.grad`` is now what the optimizer steps with (the
        last backward of a step wins: with ``no_sync()``, the accumulated gradient of the one that syncs)."""
        self._backward_pending = False
        for name, p in self.params.items():
            if p.grad is not None:
                self._grad_sq[name] = _sq_norm(_local(p.grad))

    def _disarm(self) -> None:
        self._param_hooks.remove()
        if self._full is not None:
            full, self._full = self._full, None
            full.__exit__(None, None, None)

    def _empty_record(self, step: int) -> dict[str, Any]:
        return {"step": step, "time": time.time(), "layers": {}, "params": {}, "histograms": {}, "alerts": []}

    def _finish_record(self, step: int) -> dict[str, Any]:
        collect = self._collect
        self._disarm()
        record = self._empty_record(step)
        assert collect is not None  # noqa: S101 - armed implies collected
        red = _Reduction(data_parallel=self._data_parallel)
        layers = [(name.removeprefix("module."), collect.sums.get(name), collect.grad_sq.get(name))
                  for name in self.names]
        for _, acc, grad in layers:
            red.add_layer(acc, grad)
        record["histograms"].update(collect.hists)
        params = []
        with torch.no_grad():
            for name, p in self.params.items():
                w = _local(p.detach())
                before = self._before.pop(name, None)
                # w - before in w's dtype: rounds each difference once (2**-24 relative in float32), far below what
                # an update ratio is read for; the norm is accumulated in float64 without a float64 copy of w
                params.append((name, red.add_param(p, _sq_norm(w), None if before is None else _sq_norm(w - before),
                                                   self._grad_sq.get(name))))
                if self.histograms:  # this rank's shard where the parameter is a DTensor
                    record["histograms"][f"{name}/weight"] = _sample(w)
                    if p.grad is not None:
                        record["histograms"][f"{name}/grad"] = _sample(_local(p.grad.detach()))
        red.reduce()
        for i, (name, _, _) in enumerate(layers):
            record["layers"][name] = red.layer_stats(i)
        for name, j in params:
            record["params"][name] = red.param_stats(j)
        self._before = {}
        self._collect = None
        return record


def _check_options(*, every: Any, log: Any, params: Any, histograms: Any, on_nonfinite: Any, ops: Any,
                   summary: Any, console: Any) -> None:
    """Every option of ``monitor()`` but the model, the layers and the sinks (``resolve`` and ``make_sinks`` check
    those), before any hook is registered or any file written: a mistake found at the end of a training run would
    cost the run."""
    from rich.console import Console

    if isinstance(every, bool) or not isinstance(every, int):
        raise ArgumentTypeError(f"every={every!r} ({type(every).__name__}): record every N-th step, N a whole number "
                                ">= 1 (e.g. every=100).")
    if every < 1:
        raise ArgumentError(f"every={every!r}: record every N-th step, N a whole number >= 1 (e.g. every=100).")
    for name, value in (("params", params), ("histograms", histograms), ("ops", ops), ("summary", summary)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{name}={value!r} ({type(value).__name__}): {name}= takes True or False.")
    if not isinstance(on_nonfinite, str):
        raise ArgumentTypeError(f"on_nonfinite={on_nonfinite!r} ({type(on_nonfinite).__name__}): use 'warn', "
                                "'raise' or 'stop'.")
    if on_nonfinite not in ("warn", "raise", "stop"):
        raise ArgumentError(f"on_nonfinite={on_nonfinite!r}: use 'warn', 'raise' or 'stop'.")
    if console is not None and not isinstance(console, Console):
        raise ArgumentTypeError(f"console= takes a rich.console.Console, got {type(console).__name__} "
                                f"{console!r:.80}. For standard error leave it out; for text, "
                                "Console(file=io.StringIO(), color_system=None).")
    if log is not None:
        if not isinstance(log, (str, os.PathLike)):
            raise ArgumentTypeError(f"log={log!r:.80} ({type(log).__name__}): log= takes a folder (a str or a "
                                    "path), e.g. log='runs/exp1', or None for no file.")
        if not str(log):
            raise ArgumentError("log='': name a folder for monitor.jsonl, e.g. log='runs/exp1', or leave log out.")
        folder = Path(log)
        nearest = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
        if nearest is not None and not nearest.is_dir():
            where = "is not a folder" if nearest == folder else f"lies below {str(nearest)!r}, which is not a folder"
            raise ArgumentError(f"log={str(log)!r} {where}; pass a folder for monitor.jsonl (it is "
                                "created if missing), e.g. a new name next to it.")


# -- listeners ---------------------------------------------------------------------------------------------------------

class _Finite:
    """Every step: one sum per selected layer's output (and per op in their own code, with ``ops=True``; float64,
    so that only NaN or Inf, never an overflow, makes it non-finite), checked together once at the end of the step."""

    def __init__(self) -> None:
        self.sums: list[tuple[str, OpSite | None, int, torch.Tensor]] = []  # (name, op site, call, sum)

    def forward_pre(self, where: Any, args: tuple, kwargs: dict) -> None:
        pass

    def grad(self, *args: Any) -> None:  # pragma: no cover - the light engine records no gradients
        pass

    def forward(self, where: tuple[str, Any, int], args: tuple, output: Any) -> None:
        name, site, call = where  # call: which call of the layer in its forward, as FX numbers them
        for t in _tree.leaves(output):
            if (t.is_floating_point() or t.is_complex()) and t.numel() and t.device.type != "meta":
                with torch.no_grad():
                    # this rank's shard of a DTensor output (tensor parallel): a DTensor's sum would be a Partial
                    # one, reduced by a collective later; the ranks agree on the verdict in Monitor.step()
                    total = _local(t.detach()).sum(dtype=torch.complex128 if t.is_complex() else torch.float64)
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


class _Collect:
    """Recorded steps: the statistics of each layer's output and of the gradient w.r.t. it, summed over calls."""

    def __init__(self, histograms: bool, *, on_backward: Callable[[], None]) -> None:
        self.sums: dict[str, list[float]] = {}  # n, sum, sum of squares, absmax, zeros, nan, inf
        self.grad_sq: dict[str, float] = {}
        self.histograms = histograms
        self.hists: dict[str, Any] = {}
        self.on_backward = on_backward

    def forward_pre(self, where: Any, args: tuple, kwargs: dict) -> None:
        pass

    def forward(self, where: tuple[str, Any, int], args: tuple, output: Any) -> None:
        name = where[0]
        t = next((t for t in _tree.leaves(output) if t.is_floating_point()), None)
        if t is None:
            return
        t = _local(t)  # a DTensor output (tensor parallel): this rank's part; the ranks' sums are reduced later
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
            self.hists.setdefault(f"{name.removeprefix('module.')}/activation", _sample(t.detach()))

    def grad(self, where: tuple[str, Any, int], which: str, i: int, n: int, grad: torch.Tensor) -> None:
        if which != "output":
            return
        self.on_backward()
        with torch.no_grad():
            sq = _sq_norm(_local(grad))
        self.grad_sq[where[0]] = self.grad_sq.get(where[0], 0.0) + sq


class _Reduction:
    """One recorded step's sums, of every watched layer and parameter, reduced over ranks and finished into
    statistics: added (counts, sums, squares) in one SUM ``all_reduce`` and maximised in one MAX ``all_reduce``,
    the same two calls in the same order on every rank; nothing is called outside ``torch.distributed`` or with one
    rank. Statistics are finished only from the reduced sums, never averaged over ranks."""

    _SUMS = 8  # per layer: n, sum, sum of squares, zeros, nan, inf, the output gradient's squared norm, gradients

    def __init__(self, *, data_parallel: bool) -> None:
        self.data_parallel = data_parallel
        self.world = _world_size()
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
        copies = self.world / _distinct_shards(p)
        self.params.append(len(self.sums))
        self.sums += [w_sq / copies, (delta_sq or 0.0) / copies, float(delta_sq is not None),
                      (grad_sq or 0.0) / copies, float(grad_sq is not None)]
        return len(self.params) - 1

    def reduce(self) -> None:
        if self.world == 1:
            return
        dist = torch.distributed
        device = _collective_device()
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


# -- helpers -----------------------------------------------------------------------------------------------------------

def _sq_norm(t: torch.Tensor) -> float:
    """The squared L2 norm of ``t``, accumulated in float64 (no float64 copy of ``t`` is made)."""
    with torch.no_grad():
        return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2


def _sample(t: torch.Tensor) -> Any:
    flat = t.reshape(-1)
    if flat.numel() > _HIST_VALUES:
        flat = flat[:: -(-flat.numel() // _HIST_VALUES)]
    return flat.float().cpu().numpy()


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    """Where the reduction's tensors live: the CPU for gloo (also a ``cpu:gloo,cuda:nccl`` group), else the current
    accelerator (NCCL reduces only device tensors)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _dtensor_type() -> type[DTensor] | None:
    """DTensor, where it may exist: no DTensor can exist before its module is imported (so a process that never
    uses one never pays for importing it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2, tensor parallel), with no collective; any other tensor itself."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _distinct_shards(p: torch.Tensor) -> int:
    """Into how many distinct parts a parameter is split over the ranks: the product of its mesh's sizes along the
    dimensions where it is sharded (1 for a plain tensor: every rank holds all of it)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return 1
    return math.prod(p.device_mesh.size(d) for d, pl in enumerate(p.placements) if pl.is_shard())


def _check_layout(model: nn.Module) -> bool:
    """Whether the ranks split the batch (data parallel: DDP, FSDP2, a plain model) rather than share it (tensor
    parallel: DTensor parameters without FSDP2); refuses what the reduction does not cover yet."""
    dtensor = _dtensor_type()
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


def _reduced(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record on rank 0 (its statistics are already the whole run's: ``_Reduction``), None on the other ranks."""
    return record if _rank() == 0 else None


def _agreed_alerts(alert: dict[str, Any] | None) -> list[dict[str, Any]]:
    """This step's alerts of every rank, in rank order, the same list on every rank; ``[]`` when no rank saw a
    non-finite output. Under ``torch.distributed`` (more than one rank) every rank calls this at every step, whatever
    its own data showed: one all_reduce of one number (the lowest rank that saw one, or the world size), and only
    when some rank did, an ``all_gather_object`` of the alerts, which every rank then calls too."""
    if _world_size() == 1:
        return [] if alert is None else [alert]
    dist = torch.distributed
    world = dist.get_world_size()
    first = torch.tensor([world if alert is None else dist.get_rank()], dtype=torch.int64,
                         device=_collective_device())
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if int(first.item()) == world:
        return []
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, alert)
    return [a for a in gathered if a is not None]


def _verdict(alerts: list[dict[str, Any]]) -> str:
    """The warning or error of a non-finite step: the first rank's alert, naming the other ranks that saw one."""
    message = alerts[0]["message"]
    if len(alerts) > 1:
        others = ", ".join(f"rank {a['rank']} too ({a['where']!r})" for a in alerts[1:])
        message += f" Non-finite outputs in the same step on {others}; mon.alerts holds every rank's alert."
    return message
