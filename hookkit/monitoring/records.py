"""The monitor's record: its schema, the statistics it holds, and its JSON Lines form (written by
``monitoring.sinks.JsonlSink``, read back by ``read_jsonl`` here, which ``monitoring.plot`` reads runs with).

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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hookkit._errors import ArgumentTypeError

__all__ = ["Record", "LAYER_STATS", "PARAM_STATS", "JSONL_NAME", "HISTOGRAM_BINS", "BadLine", "read_jsonl", "encode",
           "finite_values"]

Record = dict[str, Any]

#: The statistics of each watched layer, and of each watched parameter, in a record.
LAYER_STATS = ("act_mean", "act_std", "act_absmax", "zero_frac", "nan", "inf", "grad_norm")
PARAM_STATS = ("grad_norm", "weight_norm", "update_ratio")
#: The file ``make_sinks`` writes in the ``log`` folder.
JSONL_NAME = "monitor.jsonl"
#: Bins of the histograms in the JSON Lines file.
HISTOGRAM_BINS = 30

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def finite_values(values: Any) -> tuple[np.ndarray, int]:
    """The finite values of ``values`` as a flat float64 array, and how many were NaN/Inf."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(array)
    return array[finite], int(array.size - finite.sum())


def _histogram_json(values: Any) -> dict[str, Any]:
    finite, nonfinite = finite_values(values)
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
    raise ArgumentTypeError(
        f"a monitor record holds a {type(value).__name__} ({value!r:.80}); expected numbers, strings, None, "
        "lists and dicts (numpy arrays only under 'histograms'). Convert it before handing the record to a sink."
    )


def encode(record: Record) -> bytes:
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
        BadLine (a ValueError): a line other than an unterminated last one is not a JSON object, or
            is one whose fields are not shaped as a record's (no integer ``step``; ``layers`` or ``params`` not an
            object of objects of numbers; ``alerts`` not a list of objects...): the file is not a ``JsonlSink`` file.
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

