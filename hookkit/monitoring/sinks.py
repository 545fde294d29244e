"""Where ``hookkit.monitor()``'s records go: a JSON Lines file (the default), TensorBoard, Weights & Biases, or a
callable of the user's.

``monitoring.monitor.monitor`` calls ``make_sinks(log, sinks)`` once, on entering its context (every bad item raises
there, before any file or run is created), then hands each sink ONE record per recorded step (``sink.write(record)``)
and calls ``sink.close()`` on every sink in ``finally``. A sink never sees the model, only records; it neither computes
statistics nor decides which steps are recorded. ``close()`` is idempotent.

The record and its JSON Lines form are described in ``monitoring.records``.

Durability: each line is encoded whole first, then written by one ``os.write`` to a file opened with ``O_APPEND``
and synced (``core.fs.sync``) before ``write`` returns. A process killed (even ``kill -9``) leaves the file complete
up to the last recorded step: a write to a local file is not cut short by a signal. Only a torn write at power loss
(or a full disk) can leave a partial last line; ``read_jsonl`` skips a partial last line, and ``JsonlSink`` cuts one
off before appending. The file is appended to: a second run with the same ``log`` folder continues it (``step``
tells the runs apart); use a new folder per run, as with TensorBoard.

TensorBoard and W&B are optional extras (``pip install 'hookkit[tensorboard]'``, ``'hookkit[wandb]'``), imported
only when such a sink is made.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hookkit._errors import ArgumentError, ArgumentTypeError, UsageError
from hookkit.core.fs import NEW_FILE_MODE, sync, sync_folder
from hookkit.monitoring.records import HISTOGRAM_BINS, JSONL_NAME, Record, encode, finite_values

__all__ = ["Sink", "JsonlSink", "TensorBoardSink", "WandbSink", "CallableSink", "make_sinks"]

_SINK_NAMES = ("jsonl", "tensorboard", "wandb")


@runtime_checkable
class Sink(Protocol):
    """Receives ``hookkit.monitor()``'s records: ``write`` once per recorded step, ``close`` once or more."""

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends each record as one JSON line to ``path``, flushed and synced before ``write`` returns.

    The schema is in ``monitoring.records``' module docstring, the durability guarantee in this module's. The
    parent folder is created. ``close()`` is idempotent; ``write`` after it raises ``ValueError``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, NEW_FILE_MODE)
        self._cut_partial_last_line()
        if not existed:  # the new name itself must survive a power loss
            sync_folder(self.path.parent)

    def _cut_partial_last_line(self) -> None:
        fd = self._fd
        if fd is None:
            return
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        while True:  # find the last newline, reading backwards a MiB at a time
            tail = os.pread(fd, size - start, start)
            cut = tail.rfind(b"\n")
            if cut >= 0 or start == 0:
                break
            start = max(0, start - (1 << 20))
        os.ftruncate(fd, start + cut + 1 if cut >= 0 else 0)
        sync(fd)

    def write(self, record: Record) -> None:
        if self._fd is None:
            raise UsageError(f"JsonlSink({str(self.path)!r}) is closed; records can only be written before close()")
        view = memoryview(encode(record))
        while view:  # one write for a local file; the loop only guards the unusual short write
            view = view[os.write(self._fd, view) :]
        sync(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"


def _missing_extra(extra: str, module: str) -> ImportError:
    return ImportError(
        f"the {extra!r} sink of hookkit.monitor needs {module}, which is not installed (or failed to import); "
        f"install it with: pip install 'hookkit[{extra}]'"
    )


def _scalars(record: Record) -> Iterable[tuple[str, float]]:
    """``(f"{name}/{stat}", value)`` for every statistic of ``layers`` then ``params``, None values left out."""
    for section in ("layers", "params"):
        for name, stats in (record.get(section) or {}).items():
            for stat, value in stats.items():
                if value is not None:
                    yield f"{name}/{stat}", float(value)


def _alert_lines(record: Record) -> list[str]:
    return [str(alert.get("message", alert)) for alert in record.get("alerts") or []]


class TensorBoardSink:
    """Writes records as TensorBoard events in ``logdir`` (``torch.utils.tensorboard.SummaryWriter``).

    Scalars are tagged ``f"{name}/{stat}"`` (``layer1/act_mean``, ``layer1.0.conv1.weight/update_ratio``: one tag
    tree per layer or parameter), at ``record["step"]`` with ``record["time"]`` as wall time; None values are left
    out. Each histogram is ``add_histogram(name, finite values)`` under its own name (``layer1/activation``), left
    out when no value is finite. Alerts go to the text tag ``alerts``, one markdown line each. Flushed per record.

    Raises:
        ImportError: tensorboard is not installed (``pip install 'hookkit[tensorboard]'``).
    """

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing_extra("tensorboard", "tensorboard") from exc
        self.logdir = Path(logdir)
        self._writer: Any = SummaryWriter(log_dir=str(self.logdir))

    def write(self, record: Record) -> None:
        if self._writer is None:
            raise UsageError(f"TensorBoardSink({str(self.logdir)!r}) is closed; write records before close()")
        step, walltime = int(record["step"]), record.get("time")
        for tag, value in _scalars(record):
            self._writer.add_scalar(tag, value, step, walltime=walltime)
        for name, values in (record.get("histograms") or {}).items():
            finite, _ = finite_values(values)
            if finite.size:
                self._writer.add_histogram(name, finite, step, walltime=walltime)
        alerts = _alert_lines(record)
        if alerts:
            self._writer.add_text("alerts", "\n".join(f"- {line}" for line in alerts), step, walltime=walltime)
        self._writer.flush()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.logdir)!r})"


class WandbSink:
    """Logs records to a Weights & Biases run: ``run.log({f"{name}/{stat}": value, ...}, step=record["step"])``.

    The run is ``run`` if given, else the active run (``wandb.run``), else ``wandb.init(**init_kwargs)``; ``close()``
    finishes only a run this sink started. Histograms are ``wandb.Histogram`` of the finite values, in the same 30
    bins as the JSON Lines file (left out when none is finite); alerts are logged as the text ``alerts`` (one line
    each). W&B drops a ``log`` whose step is below the run's current step: if the training loop also calls
    ``wandb.log``, it must use the same step count.
    Works offline (``WANDB_MODE=offline`` or ``init_kwargs`` ``mode="offline"``).

    Raises:
        ImportError: wandb is not installed (``pip install 'hookkit[wandb]'``).
    """

    def __init__(self, run: Any = None, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise _missing_extra("wandb", "wandb") from exc
        if run is not None and init_kwargs:
            raise ArgumentTypeError(
                f"WandbSink got a run and wandb.init arguments ({', '.join(init_kwargs)}); expected one of them: "
                "pass run=... to log to an existing run, or the init arguments to start one"
            )
        self._wandb = wandb
        self._owns_run = False
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(**init_kwargs)
            self._owns_run = True
        self.run: Any = run
        self._closed = False

    def write(self, record: Record) -> None:
        if self._closed:
            raise UsageError("WandbSink is closed; records can only be written before close()")
        data: dict[str, Any] = dict(_scalars(record))
        for name, values in (record.get("histograms") or {}).items():
            finite, _ = finite_values(values)
            if finite.size:
                data[name] = self._wandb.Histogram(np_histogram=np.histogram(finite, bins=HISTOGRAM_BINS))
        alerts = _alert_lines(record)
        if alerts:
            data["alerts"] = "\n".join(alerts)
        self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_run:
            self.run.finish()

    def __repr__(self) -> str:
        return f"WandbSink(run={getattr(self.run, 'id', None)!r}, owns_run={self._owns_run})"


class CallableSink:
    """Hands each record to ``fn(record)``; ``close()`` does nothing. The record is the monitor's own dict: copy it
    to keep it past the call."""

    def __init__(self, fn: Callable[[Record], Any]) -> None:
        if not callable(fn):
            raise ArgumentTypeError(f"CallableSink expects a callable fn(record); got {type(fn).__name__} ({fn!r:.80})")
        self.fn = fn

    def write(self, record: Record) -> None:
        self.fn(record)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"CallableSink({self.fn!r})"


def _is_sink(item: object) -> bool:
    return callable(getattr(item, "write", None)) and callable(getattr(item, "close", None))


def make_sinks(log: str | os.PathLike[str] | None, sinks: Iterable[Any] | str | None = None) -> list[Sink]:
    """The sinks of ``hookkit.monitor(model, layers, log=..., sinks=...)``, all checked before any is made.

    Decisions: ``log`` (a folder) always gives ``JsonlSink(log / "monitor.jsonl")``, first; ``log=None`` writes no
    file. ``sinks`` adds to it: ``"jsonl"`` (already implied by ``log``, and needs it), ``"tensorboard"`` (event
    files in the same ``log`` folder, so ``tensorboard --logdir runs`` shows the run ``exp1`` of ``log="runs/exp1"``;
    needs ``log``), ``"wandb"`` (``WandbSink()``: the active run, else ``wandb.init()``; pass ``WandbSink(...)`` for
    options), any object with ``write(record)`` and ``close()`` (used as is), or any other callable (wrapped in
    ``CallableSink``). A single string is one item; a name given twice gives one sink.

    >>> make_sinks(None, [print])
    [CallableSink(<built-in function print>)]

    Raises:
        ArgumentTypeError (a TypeError): an item is none of these (or ``sinks`` is not an iterable).
        ArgumentError (a ValueError): an unknown name, or ``"jsonl"``/``"tensorboard"`` without a ``log`` folder.
        ImportError: ``"tensorboard"``/``"wandb"`` and that package is not installed (with the pip command).
    """
    if sinks is None:
        items: list[Any] = []
    elif isinstance(sinks, str) or _is_sink(sinks) or callable(sinks):
        items = [sinks]
    elif isinstance(sinks, Iterable):
        items = list(sinks)
    else:
        raise ArgumentTypeError(
            f"sinks must be a list of sink names {_SINK_NAMES}, Sink objects or callables; got {type(sinks).__name__}"
        )
    names: list[str] = ["jsonl"] if log is not None else []
    others: list[Any] = []
    for item in items:  # check everything before creating anything
        if isinstance(item, str):
            if item not in _SINK_NAMES:
                raise ArgumentError(
                    f"sinks=: unknown sink {item!r}; expected one of {', '.join(map(repr, _SINK_NAMES))}, a Sink "
                    "object (write(record) and close()) or a callable fn(record)"
                )
            if item in ("jsonl", "tensorboard") and log is None:
                raise ArgumentError(
                    f"sink {item!r} writes into the log folder, but log=None; pass log='runs/exp1' (a folder)"
                )
            if item in ("tensorboard", "wandb") and importlib.util.find_spec(item) is None:
                raise _missing_extra(item, item)
            if item not in names:
                names.append(item)
        elif _is_sink(item) or callable(item):
            others.append(item)
        else:
            raise ArgumentTypeError(
                f"sink item {item!r:.80} ({type(item).__name__}) is not a sink; expected one of "
                f"{', '.join(map(repr, _SINK_NAMES))}, an object with write(record) and close(), "
                "or a callable fn(record)"
            )
    folder = Path(log) if log is not None else Path()  # names holds "jsonl"/"tensorboard" only with a log folder
    made: list[Sink] = []
    try:
        for name in names:
            if name == "jsonl":
                made.append(JsonlSink(folder / JSONL_NAME))
            elif name == "tensorboard":
                made.append(TensorBoardSink(folder))
            else:
                made.append(WandbSink())
        made.extend(item if _is_sink(item) else CallableSink(item) for item in others)
    except BaseException:
        for sink in reversed(made):
            sink.close()
        raise
    return made
