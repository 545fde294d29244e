"""Where ``hookkit.monitor()``'s records go: a JSON Lines file (the default), TensorBoard, Weights & Biases, or a
callable of the user's.

``monitoring.monitor.monitor`` calls ``make_sinks(log, sinks)`` once, on entering its context (every bad item raises
there, before any file or run is created), then hands each sink ONE record per recorded step (``sink.write(record)``)
and calls ``sink.close()`` on every sink in ``finally``. A sink never sees the model, only records; it neither computes
statistics nor decides which steps are recorded. ``close()`` is idempotent.

The record (a plain dict; built by ``monitoring.monitor``)::

    {"step": 100, "time": 1764150000.0,
     "layers": {"layer1": {"act_mean": float, "act_std": float, "act_absmax": float, "zero_frac": float,
                           "nan": int, "inf": int, "grad_norm": float | None}},
     "params": {"layer1.0.conv1.weight": {"grad_norm": float | None, "weight_norm": float,
                                          "update_ratio": float | None}},
     "histograms": {"layer1/activation": np.ndarray, "layer1.0.conv1.weight/grad": np.ndarray},  # or {}
     "alerts": [{"kind": "nonfinite", "step": 100, "rank": 0, "where": "layer1", "op": None,
                 "what": "activation", "message": str}]}

``alerts[i]["where"]`` is the layer; ``"op"`` is None, or with ``monitor(..., ops=True)`` the op inside that layer's
``forward`` that made the first non-finite value, as its node name and label: ``"layer1.0.add (Tensor.add_)"``.
``"rank"`` is the ``torch.distributed`` rank whose data made it (0 in one process); under ``torch.distributed`` the
record holds the alert of every rank that saw a non-finite value in that step, in rank order, and the message names
the rank.

The JSON Lines schema (``monitor.jsonl``, read back by ``read_jsonl``) is the record itself, one per line, with:

- **Non-finite floats as strings**: NaN, +Inf and -Inf are written ``"nan"``, ``"inf"`` and ``"-inf"`` (JSON has no
  such numbers, and Python's ``NaN`` literal is not JSON other readers accept). ``read_jsonl`` turns them back into
  floats inside ``layers`` and ``params`` (the statistics); anywhere else (a message, a layer name) a string stays a
  string. ``None`` (no backward ran, no previous step) is ``null``.
- **Histograms as bins**: each array becomes ``{"edges": [31 floats], "counts": [30 ints], "nonfinite": int}``
  (``np.histogram`` of its finite values, 30 bins; ``nonfinite`` counts the NaN/Inf values left out). With no finite
  value, ``edges`` and ``counts`` are ``[]``.
- numpy scalars and arrays outside ``histograms`` become plain numbers and lists.

Durability: each line is encoded whole first, then written by one ``os.write`` to a file opened with ``O_APPEND``
and ``os.fsync``ed before ``write`` returns. A process killed (even ``kill -9``) leaves the file complete up to the
last recorded step: a write to a local file is not cut short by a signal. Only a torn write at power loss (or a full
disk) can leave a partial last line; ``read_jsonl`` skips a partial last line, and ``JsonlSink`` cuts one off before
appending. The file is appended to: a second run with the same ``log`` folder continues it (``step`` tells the runs
apart); use a new folder per run, as with TensorBoard.

TensorBoard and W&B are optional extras (``pip install 'hookkit[tensorboard]'``, ``'hookkit[wandb]'``), imported
only when such a sink is made.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hookkit._errors import ArgumentError, ArgumentTypeError
from hookkit.core.fs import NEW_FILE_MODE, sync_folder

__all__ = [
    "Sink",
    "JsonlSink",
    "TensorBoardSink",
    "WandbSink",
    "CallableSink",
    "make_sinks",
    "read_jsonl",
    "BadLine",
    "JSONL_NAME",
    "HISTOGRAM_BINS",
]

Record = dict[str, Any]

#: The file ``make_sinks`` writes in the ``log`` folder.
JSONL_NAME = "monitor.jsonl"
#: Bins of the histograms in the JSON Lines file.
HISTOGRAM_BINS = 30

_SINK_NAMES = ("jsonl", "tensorboard", "wandb")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@runtime_checkable
class Sink(Protocol):
    """Receives ``hookkit.monitor()``'s records: ``write`` once per recorded step, ``close`` once or more."""

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


def _finite_values(values: Any) -> tuple[np.ndarray, int]:
    """The finite values of ``values`` as a flat float64 array, and how many were NaN/Inf."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(array)
    return array[finite], int(array.size - finite.sum())


def _histogram_json(values: Any) -> dict[str, Any]:
    finite, nonfinite = _finite_values(values)
    if finite.size == 0:
        return {"edges": [], "counts": [], "nonfinite": nonfinite}
    counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "nonfinite": nonfinite}


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as strings and numpy values as plain ones (see the module docstring)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    raise TypeError(
        f"a monitor record holds a {type(value).__name__} ({value!r:.80}); expected numbers, strings, None, "
        "lists and dicts (numpy arrays only under 'histograms'). Convert it before handing the record to a sink."
    )


def _encode(record: Record) -> bytes:
    plain = {key: value for key, value in record.items() if key != "histograms"}
    line = _jsonable(plain)
    line["histograms"] = {name: _histogram_json(values) for name, values in (record.get("histograms") or {}).items()}
    return (json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n").encode()


def _decode(record: Record) -> Record:
    for section in ("layers", "params"):
        for stats in (record.get(section) or {}).values():
            for key, value in stats.items():
                if isinstance(value, str) and value in _NONFINITE:
                    stats[key] = _NONFINITE[value]
    return record


class BadLine(ValueError):
    """A line of a JSON Lines file that is not a record, other than a torn last one: ``number``, ``text``, and the
    ``reason``: the parser's, or (``json_ok``: the line is a JSON object) which field of the record has the wrong
    shape."""

    def __init__(self, path: str | os.PathLike[str], number: int, text: str, reason: str, *,
                 json_ok: bool = False) -> None:
        what = "a monitor record" if json_ok else "a JSON record"
        super().__init__(f"{path}, line {number}: not {what} ({reason}); expected one JSON object per line, "
                         "as hookkit's JsonlSink writes. Is this a monitor.jsonl file?")
        self.number, self.text, self.reason, self.json_ok = number, text, reason, json_ok


def _kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "list"), (str, "string"), (int, "integer"),
                       (float, "number")):
        if isinstance(value, kind):
            return f"a JSON {name}"
    return "null" if value is None else type(value).__name__


def _is_stat(value: Any) -> bool:
    """A statistic as the file holds it: a number, null (not recorded), or "nan" / "inf" / "-inf"."""
    if isinstance(value, str):
        return value in _NONFINITE
    return value is None or _is_number(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shape_problem(record: Record) -> str | None:
    """What in ``record`` (a JSON object) is not shaped as the schema of the module docstring says, else None.
    Only ``step`` is required (a record hand-written with less is still read); every field present is checked."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return (f'"step" is {_kind(step)}, expected an integer' if "step" in record
                else 'it has no "step", expected an integer')
    if record.get("time") is not None and not _is_number(record["time"]):
        return f'"time" is {_kind(record["time"])}, expected a number'
    for section in ("layers", "params"):
        stats_of = record.get(section)
        if stats_of is None:
            continue
        if not isinstance(stats_of, dict):
            return f'"{section}" is {_kind(stats_of)}, expected an object {{name: {{statistic: number}}}}'
        for name, stats in stats_of.items():
            if not isinstance(stats, dict):
                return f'"{section}" {name!r} is {_kind(stats)}, expected an object {{statistic: number}}'
            for stat, value in stats.items():
                if not _is_stat(value):
                    return (f'"{section}" {name!r} statistic {stat!r} is {_kind(value)} ({json.dumps(value)[:30]}), '
                            'expected a number, null, "nan", "inf" or "-inf"')
    alerts = record.get("alerts")
    if alerts is not None:
        if not isinstance(alerts, list):
            return f'"alerts" is {_kind(alerts)}, expected a list of objects'
        for i, alert in enumerate(alerts):
            if not isinstance(alert, dict):
                return f'"alerts" item {i} is {_kind(alert)}, expected an object'
            if alert.get("step") is not None and not (_is_number(alert["step"]) and isinstance(alert["step"], int)):
                return f'"alerts" item {i} "step" is {_kind(alert["step"])}, expected an integer'
    histograms = record.get("histograms")
    if histograms is not None:
        if not isinstance(histograms, dict):
            return f'"histograms" is {_kind(histograms)}, expected an object {{name: {{"edges", "counts"}}}}'
        for name, hist in histograms.items():
            if not isinstance(hist, dict):
                return f'"histograms" {name!r} is {_kind(hist)}, expected an object {{"edges", "counts", "nonfinite"}}'
    return None


def read_jsonl(path: str | os.PathLike[str], *, torn: Callable[[int, str], None] | None = None) -> list[Record]:
    """The records of a ``JsonlSink`` file, non-finite statistics as floats again; a partial last line is skipped.

    Args:
        path: the file (``<log>/monitor.jsonl`` for ``hookkit.monitor(..., log=<log>)``).
        torn: called with the line number and the parser's reason when a partial last line is skipped.

    Returns:
        One dict per complete line, in file order. Histograms stay ``{"edges", "counts", "nonfinite"}``.

    Raises:
        BadLine (a ValueError): a line other than an unterminated last one is not a JSON object, or is one whose
            fields are not shaped as a record's (no integer ``step``; ``layers`` or ``params`` not an object of
            objects of numbers; ``alerts`` not a list of objects...): the file is not a ``JsonlSink`` file.
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines):  # no newline after it: the torn last write of a crash
                if torn is not None:
                    torn(number, str(exc))
                break
            raise BadLine(path, number, line.decode("utf-8", "replace"), str(exc)) from None
        if not isinstance(record, dict):
            raise BadLine(path, number, line.decode("utf-8", "replace"), f"{_kind(record)}, not an object")
        problem = _shape_problem(record)
        if problem is not None:
            raise BadLine(path, number, line.decode("utf-8", "replace"), problem, json_ok=True)
        records.append(_decode(record))
    return records


class JsonlSink:
    """Appends each record as one JSON line to ``path``, flushed and fsynced before ``write`` returns.

    The schema and the durability guarantee are in ``hookkit._sinks``' module docstring. The parent folder is
    created. ``close()`` is idempotent; ``write`` after it raises ``ValueError``.
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
        os.fsync(fd)

    def write(self, record: Record) -> None:
        if self._fd is None:
            raise ValueError(f"JsonlSink({str(self.path)!r}) is closed; records can only be written before close()")
        view = memoryview(_encode(record))
        while view:  # one write for a local file; the loop only guards the unusual short write
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

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
            raise ValueError(f"TensorBoardSink({str(self.logdir)!r}) is closed; write records before close()")
        step, walltime = int(record["step"]), record.get("time")
        for tag, value in _scalars(record):
            self._writer.add_scalar(tag, value, step, walltime=walltime)
        for name, values in (record.get("histograms") or {}).items():
            finite, _ = _finite_values(values)
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
            raise TypeError(
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
            raise ValueError("WandbSink is closed; records can only be written before close()")
        data: dict[str, Any] = dict(_scalars(record))
        for name, values in (record.get("histograms") or {}).items():
            finite, _ = _finite_values(values)
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
            raise TypeError(f"CallableSink expects a callable fn(record); got {type(fn).__name__} ({fn!r:.80})")
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
