"""``monitor()``: watch a training run layer by layer: statistics of activations, gradients and parameter updates on
recorded steps, an alert at the first non-finite activation on any step, records handed to sinks.

How it connects: ``Monitor`` owns two views on the hook engine (``core.engine.Engine``, as ``trace`` and ``extract``):
a light one, entered for the whole block, whose listener (``Finite``) takes one sum per selected layer's output
on every step, so that the first NaN or Inf is found at its step and layer without a sync per layer; and a full one
(``Collect``), entered only for recorded steps (``every``), which takes the activation statistics and the gradient
w.r.t. each layer's output, and with ``params`` reads the parameters' gradients (the engine's ``param_grads``, told
to the listener without a copy: ``p.grad`` when a backward has finished, after DDP's and FSDP's own end-of-backward
reductions, i.e. the gradient the optimizer steps with), of which ``step()`` keeps the norms. Update ratios come from a
copy of the weights taken when a recorded step begins; all of these exist only during recorded steps. Under
``torch.distributed`` each recorded step's sums (counts, sums, squares, maxima; of each rank's own shard where a
tensor is a DTensor) are reduced over ranks in one SUM and one MAX ``all_reduce`` before any statistic is finished
(``Reduction``), so that each statistic is the whole run's. Each recorded step (and each step with an alert)
becomes one record, a plain dict (schema in ``monitoring.records``), handed by rank 0 to the sinks
(``monitoring.sinks.make_sinks``: JSONL, TensorBoard, W&B, callables). ``monitoring.plot.summary_table`` renders the
run at the end. Under ``torch.distributed`` the ranks agree on each step's non-finite verdict in ``step()``
(``agreed_alerts``; never inside a hook, whose calls depend on a rank's data), so that every rank calls the same
collectives and warns, raises or stops at the same step. The listeners are in ``monitoring.collect``, everything
that differs under ``torch.distributed`` (the agreement, the reduction, DTensor shards) in ``monitoring.ranks``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError, ArgumentTypeError, NonFiniteError, UsageError
from hookkit.core.engine import Engine
from hookkit.core.select import Layers, select
from hookkit.monitoring import ranks as _ranks
from hookkit.monitoring.collect import Collect, Finite, sample, sq_norm
from hookkit.monitoring.records import LAYER_STATS, PARAM_STATS

__all__ = ["monitor", "Monitor", "LAYER_STATS", "PARAM_STATS"]

OnNonFinite = Literal["warn", "raise", "stop"]


def monitor(model: nn.Module, layers: Layers | None = None, *, every: int = 100, log: Any = None,
            sinks: Iterable[Any] | None = None, params: bool = True, histograms: bool = False,
            on_nonfinite: OnNonFinite = "warn", ops: bool = False, summary: bool = True,
            console: Any = None) -> Monitor:
    """Watch a training run layer by layer; call ``mon.step()`` once per training step.

    Examples:
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
            callable taking each record (see ``hookkit.monitoring.sinks``). Neither ``log`` nor ``sinks``:
            records are kept in ``mon.records`` only (they always are).
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
        self._param_keys: dict[str, tuple[str, str]] = {}  # where the engine files each one's gradient
        if params:
            for name in self._modules:
                prefix = name.removeprefix("module.")
                for pname, p in self._modules[name].named_parameters():
                    key = f"{prefix}.{pname}" if prefix else pname
                    if p.requires_grad and key not in self.params:
                        self.params[key] = p
                        self._param_keys[key] = (name, pname)
        self._data_parallel = _ranks.check_layout(model)
        from hookkit.monitoring.sinks import make_sinks  # checks the sinks before any hook is registered

        self._sinks = make_sinks(log, sinks) if _ranks.rank() == 0 else []  # rank 0 writes the reduced records
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
        self._finite = Finite()
        self._light: Engine | None = None
        self._collect: Collect | None = None
        self._full: Engine | None = None
        self._before: dict[str, torch.Tensor] = {}
        self._entered = self._closed = False

    # -- the block ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        if self._entered:
            raise UsageError("a hookkit block can be entered once; call hookkit.monitor(...) again for a new run.")
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
        if self.summary and self.records and _ranks.rank() == 0:
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
            raise UsageError("mon.step() is called inside `with hookkit.monitor(...) as mon:`.")
        step = self.steps
        alert = self._finite.end_step(step, rank=_ranks.rank() if _ranks.world_size() > 1 else None)
        # Every rank takes the same path whatever its own data showed: the verdict is agreed between ranks here, at
        # a point each rank reaches once per step in the same order (never inside a hook), until the run's first
        # non-finite step; after it, as in one process, later ones are not reported.
        alerts = [] if self._alerted else _ranks.agreed_alerts(alert)
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
            record = _ranks.reduced(record) if recorded else record if _ranks.rank() == 0 else None
            if record is not None:  # rank 0
                self.records.append({k: v for k, v in record.items() if k != "histograms"})
                for sink in self._sinks:
                    sink.write(record)
        self.steps += 1
        if alerts:
            first, message = alerts[0], _ranks.verdict(alerts)
            if self.on_nonfinite == "raise":
                self.close()
                raise NonFiniteError(message, layer=first["where"], phase="forward", call=0, stats=None,
                                     rank=first["rank"] if _ranks.world_size() > 1 else None)
            if self.on_nonfinite == "stop":
                self.should_stop = True
                self.close()
                return
            warnings.warn(message, stacklevel=2)
        if self.steps % self.every == 0:
            self._arm()

    def _arm(self) -> None:
        """Begin a recorded step: the full engine (output statistics, output gradients, and with ``params`` the
        parameters' gradients as they stand at the end of each backward, DDP's and FSDP's reductions included: the
        gradient the optimizer steps with; the last backward of a step wins), and the weights before the step."""
        self._collect = Collect(self.histograms)
        self._full = Engine(self.model, self.names, listener=self._collect, keep=False, grads=True,
                            param_grads=bool(self.params))
        self._full.__enter__()
        for name, p in self.params.items():
            self._before[name] = _ranks.local(p).detach().clone()

    def _param_grad_sq(self, grads: dict[tuple[str, str], float], name: str) -> float | None:
        """The squared norm of the gradient of parameter ``name`` at the end of the step's last backward (this
        rank's shard), as the engine told it; None when no backward reached it."""
        return grads.get(self._param_keys[name])

    def _disarm(self) -> None:
        if self._full is not None:
            full, self._full = self._full, None
            full.__exit__(None, None, None)

    def _empty_record(self, step: int) -> dict[str, Any]:
        return {"step": step, "time": time.time(), "layers": {}, "params": {}, "histograms": {}, "alerts": []}

    def _finish_record(self, step: int) -> dict[str, Any]:
        collect = self._collect
        assert self._full is not None  # noqa: S101 - armed implies an engine
        assert collect is not None  # noqa: S101 - armed implies collected
        grads = collect.param_sq  # {(layer, parameter): squared norm of its gradient}
        self._disarm()
        record = self._empty_record(step)
        assert collect is not None  # noqa: S101 - armed implies collected
        red = _ranks.Reduction(data_parallel=self._data_parallel)
        layers = [(name.removeprefix("module."), collect.sums.get(name), collect.grad_sq.get(name))
                  for name in self.names]
        for _, acc, grad in layers:
            red.add_layer(acc, grad)
        record["histograms"].update(collect.hists)
        params = []
        with torch.no_grad():
            for name, p in self.params.items():
                w = _ranks.local(p.detach())
                before = self._before.pop(name, None)
                # w - before in w's dtype: rounds each difference once (2**-24 relative in float32), far below what
                # an update ratio is read for; the norm is accumulated in float64 without a float64 copy of w
                params.append((name, red.add_param(p, sq_norm(w), None if before is None else sq_norm(w - before),
                                                   self._param_grad_sq(grads, name))))
                if self.histograms:  # this rank's shard where the parameter is a DTensor
                    record["histograms"][f"{name}/weight"] = sample(w)
                    if p.grad is not None:
                        record["histograms"][f"{name}/grad"] = sample(_ranks.local(p.grad.detach()))
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


