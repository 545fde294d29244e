"""``merge()``: captures of several batches (or runs) joined into one ``Capture``, call by call.

Each call's values are compared first (``record.encode.Encoder`` with a signature per tensor: the same containers,
dtypes and ranks, equal non-tensor values), then joined by ``record.join.concat``, the one concatenation
(``concat_calls`` uses it too), into new ``Call`` records (``record.decode.new_call``) of a new ``Recording``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from hookkit._errors import ArgumentError, ArgumentTypeError
from hookkit.core import check as _check
from hookkit.core.engine import Call, Recording
from hookkit.core.snapshot import check_guards
from hookkit.record.decode import new_call
from hookkit.record.encode import Encoder, dtype_name, holes, place
from hookkit.record.join import DIM, concat
from hookkit.record.recording import Capture

__all__ = ["merge"]


def _signature(t: torch.Tensor, key: str, where: str) -> dict[str, Any]:
    return {"type": "tensor", "dtype": dtype_name(t.dtype), "ndim": t.dim()}


def _describe(node: Any) -> str:
    if isinstance(node, dict) and "type" in node:
        kind = node["type"]
        if kind == "tensor":
            return f"a {node['dtype']} tensor of {node['ndim']} dim(s)"
        if kind == "enum":
            return str(node["repr"])
        name = node.get("qualname", kind)
        if "items" in node:
            return f"a {name} of {len(node['items'])} item(s)"
        if "fields" in node:
            return f"a {name} with fields {sorted(node['fields'])}"
        return f"a {kind} {node.get('value', node.get('class', ''))}"
    return "None" if node is None else repr(node)


def _difference(a: Any, b: Any, path: str) -> str | None:
    """Where two signatures first differ, in words; None when they are equal."""
    if a == b:
        return None
    same_container = (isinstance(a, dict) and isinstance(b, dict) and a.get("type") == b.get("type")
                      and a.get("qualname") == b.get("qualname")
                      and a.get("type") in ("tuple", "list", "namedtuple", "dict", "dataclass"))
    if same_container and a["type"] == "dataclass" and list(a["fields"]) == list(b["fields"]):
        for k in a["fields"]:
            found = _difference(a["fields"][k], b["fields"][k], f"{path}.{k}")
            if found:
                return found
    elif same_container and "items" in a and len(a["items"]) == len(b["items"]):
        for i, (x, y) in enumerate(zip(a["items"], b["items"], strict=True)):
            if a["type"] == "dict":
                if x[0] != y[0]:
                    return f"{path}: key {_describe(x[0])} vs {_describe(y[0])}"
                found = _difference(x[1], y[1], f"{path}[{_describe(x[0])}]")
            else:
                found = _difference(x, y, f"{path}[{i}]")
            if found:
                return found
    return f"{path}: {_describe(a)} vs {_describe(b)}"


def _call_values(rec: Recording, call: Call) -> dict[str, Any]:
    """The parts of one call to compare and join: values holding tensors, and what is kept from the first."""
    values: dict[str, Any] = {"outputs": call.output}
    if rec.want_inputs:
        values["inputs"], values["kwargs"] = call.args, call.kwargs
    if rec.want_grads:
        values["grads"] = call.grad_out
        values["grads error"] = call.grad_out_error
        values["grad_inputs"] = call.grad_in
        values["grad_inputs structure"] = None if call.grad_in_skel is None else holes(call.grad_in_skel)
        values["grad_inputs error"] = call.grad_in_error
    return values


def merge(captures: Iterable[Capture], *, dim: int = DIM) -> Capture:
    """Join captures of several batches (or runs) into one: every call's tensors concatenated along ``dim``.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
        >>> caps = []
        >>> for batch in torch.randn(3, 2, 4):  # three batches of 2
        ...     with hookkit.capture(model, ["0", "1"]) as cap:
        ...         _ = model(batch)
        ...     caps.append(cap)
        >>> merged = hookkit.merge(caps)
        >>> merged["1"].shape
        torch.Size([6, 8])

    The captures must have the same layers, each run as often, with values of the same structure (the same
    containers, tensors of the same dtypes in the same places, equal non-tensor values); the result has the first
    capture's non-tensor values. Gradients are concatenated like values (a per-batch mean loss stays per batch).
    ``param_grads`` are not per sample, so they are left out (with a warning): add them up yourself if that is what
    your loss means. Typical use: ``hookkit.merge(caps).save(path)``.

    Args:
        captures: captures (live, loaded or merged ones), in batch order.
        dim: the batch dimension (default 0, the default of ``concat_calls`` too, which joins the calls of one
            layer instead).

    Returns:
        A ``Capture`` (the class ``capture()`` fills; without hooks).

    Raises:
        ArgumentError: no captures, captures that differ (the message names the first layer and call that does), or
            tensors that do not concatenate along ``dim``.
        ArgumentTypeError: ``captures`` is not a list of captures, or ``dim`` not an int.
        ModifiedInPlaceError: a stored tensor was changed in place after capture.
    """
    if not isinstance(captures, Iterable) or isinstance(captures, (str, bytes, Capture)):
        raise ArgumentTypeError(f"hookkit.merge: captures= takes a list of captures, got {_check.shown(captures)}.")
    _check.whole("hookkit.merge", "dim", dim)
    caps = list(captures)
    if not caps:
        raise ArgumentError("hookkit.merge: captures= is empty; it needs at least one capture.")
    for i, c in enumerate(caps):
        if not isinstance(c, Capture):
            raise ArgumentTypeError(f"hookkit.merge: captures item {i} is a {type(c).__name__}, not a capture "
                                    "(hookkit.capture(...) or hookkit.load(...)).")
    recs = [c.recording for c in caps]
    _check_alike(recs)
    first = recs[0]
    if any(rec.param_grads for rec in recs):
        warnings.warn("hookkit.merge leaves param_grads out: a parameter's gradient is not per sample, so it cannot "
                      "be concatenated along the batch dimension; add the captures' param_grads up yourself if your "
                      "loss was a sum.", stacklevel=2)
    done: dict[int, list[Call]] = {}  # a module captured under several names keeps one list of calls
    records: dict[str, list[Call]] = {}
    for name, calls in first.records.items():
        if id(calls) not in done:
            done[id(calls)] = _merge_layer(name, [rec.records.get(name, []) for rec in recs], recs, dim)
        records[name] = done[id(calls)]
    merged = Recording.from_calls(records, order=list(first.order), selected_names=list(first.selected_names),
                                  want_inputs=first.want_inputs, want_grads=first.want_grads,
                                  wrapped=any(r.wrapped for r in recs))
    return Capture(merged, source=f"merged from {len(caps)} captures")


def _check_alike(recs: list[Recording]) -> None:
    """Captures made with the same options, of the same layers in the same order of first call."""
    first = recs[0]
    for j, rec in enumerate(recs[1:], 1):
        for flag, what in (("want_inputs", "inputs"), ("want_grads", "grads")):
            if getattr(rec, flag) != getattr(first, flag):
                raise ArgumentError(f"hookkit.merge: capture {j} was made with {what}={getattr(rec, flag)}, capture 0 "
                                    f"with {what}={getattr(first, flag)}.")
        if rec.order != first.order:
            k = next(k for k in range(max(len(rec.order), len(first.order)))
                     if k >= len(rec.order) or k >= len(first.order) or rec.order[k] != first.order[k])
            a = repr(first.order[k]) if k < len(first.order) else "nothing"
            b = repr(rec.order[k]) if k < len(rec.order) else "nothing"
            raise ArgumentError(f"hookkit.merge: capture {j} has other layers than capture 0: layer {k} (in order of "
                                f"first call) is {b} there and {a} in capture 0.")


def _merge_layer(name: str, per_capture: list[list[Call]], recs: list[Recording], dim: int) -> list[Call]:
    n = len(per_capture[0])
    for j, calls in enumerate(per_capture[1:], 1):
        if len(calls) != n:
            raise ArgumentError(f"hookkit.merge: {name!r} ran {n} time(s) in capture 0 but {len(calls)} time(s) in "
                                f"capture {j}; merge joins captures call by call.")
    merged: list[Call] = []
    enc = Encoder(_signature)
    for i in range(n):
        parts = []
        for rec, calls in zip(recs, per_capture, strict=True):
            call = calls[i]
            check_guards(call.uncopied("output"), place(name, "outputs", i, n))
            if rec.want_inputs:
                check_guards(call.in_guards, place(name, "inputs", i, n))
            parts.append(_call_values(rec, call))
        signatures = [{k: enc.encode(v, "", "") for k, v in p.items()} for p in parts]
        for j, sig in enumerate(signatures[1:], 1):
            for field, node in signatures[0].items():
                found = _difference(node, sig[field], "")
                if found:
                    raise ArgumentError(f"hookkit.merge: capture {j} differs from capture 0 at calls({name!r})[{i}], "
                                        f"in {field}{found}.")
        merged.append(_joined(name, i, n, parts, per_capture[0][i], recs[0], dim))
    return merged


def _joined(name: str, i: int, n: int, parts: list[dict[str, Any]], source: Call, first: Recording, dim: int) -> Call:
    """Call ``i`` of ``name``: the captures' values (``parts``) joined; the first capture's ``source`` call gives
    what is not joined (its forward, gradient structure and errors)."""
    def join(kind: str) -> Any:
        return concat([p[kind] for p in parts], dim, caller="hookkit.merge", where=place(name, kind, i, n))

    fields: dict[str, Any] = {}
    if first.want_inputs:
        fields.update(args=join("inputs"), kwargs=join("kwargs"))
    if first.want_grads:
        fields.update(grad_out=None if source.grad_out is None else join("grads"),
                      grad_in=None if source.grad_in is None else join("grad_inputs"),
                      grad_in_skel=source.grad_in_skel, grad_out_error=source.grad_out_error,
                      grad_in_error=source.grad_in_error)
    return new_call(join("outputs"), source.forward, **fields)
