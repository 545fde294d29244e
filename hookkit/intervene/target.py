"""Where an edit lands in a layer's output: checking an edit's ``index`` / ``call`` / ``out``, picking the tensor
``out`` names in a nested output (``pick_tensor``), indexing it (``index_region``) and fitting a value to that
region (``fit_value``).

``intervene/edits.py`` calls these: ``Edit.__init__`` checks its arguments with ``check_edit_args`` before any hook
exists, and ``Edit._apply`` (run by a ``BoundEdit`` in the forward) picks, indexes and fits. Everything here raises
``EditError`` (in the forward) or ``ArgumentError`` / ``ArgumentTypeError`` (arguments), naming the layer and call
through the ``where`` text it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from typing import Any

import torch

from hookkit._errors import ArgumentError, ArgumentTypeError, EditError

__all__ = ["Index", "Out", "check_edit_args", "fmt_index", "shape_of", "pick_tensor", "index_region", "fit_value"]

Index = Any  # anything torch's tensor indexing takes: int, slice, Ellipsis, None, a tensor, a tuple of these
Out = int | str
_INDEX_ATOMS = (numbers.Integral, slice, type(Ellipsis), type(None), torch.Tensor)


# -- argument checks (all before any hook exists) -------------------------------------------------------------------
def _check_index(index: Index, what: str) -> None:
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if isinstance(item, list) and all(isinstance(v, int) for v in item):
            continue  # a list of positions, as torch takes it
        if not isinstance(item, _INDEX_ATOMS):
            raise ArgumentTypeError(f"{what}: index={index!r} holds a {type(item).__name__}; an index is what "
                                    "tensor[...] takes: an int, a slice, ..., None, a tensor, a list of ints, or a "
                                    "tuple of these (e.g. index=(slice(None), 5) for token position 5).")


def check_edit_args(what: str, index: Index, call: int | None, out: Out) -> None:
    _check_index(index, what)
    if call is not None and (isinstance(call, bool) or not isinstance(call, numbers.Integral)):
        raise ArgumentTypeError(f"{what}: call= takes None (every call) or an int (the k-th call, from 0), "
                                f"got {type(call).__name__} {call!r}.")
    if call is not None and call < 0:
        raise ArgumentError(f"{what}: call={call} is negative; calls count from 0 since the block began.")
    if isinstance(out, bool) or not isinstance(out, (int, str)):
        raise ArgumentTypeError(f"{what}: out= takes an int (position in a tuple output) or a str (key of a dict / "
                                f"ModelOutput output), got {type(out).__name__} {out!r}.")


def fmt_index(index: Index) -> str:
    def one(item: Any) -> str:
        if isinstance(item, slice):
            parts = ["" if v is None else str(v) for v in (item.start, item.stop, item.step)]
            return ":".join(parts[:2]) + (f":{parts[2]}" if item.step is not None else "")
        if item is Ellipsis:
            return "..."
        if isinstance(item, torch.Tensor):
            return f"<{item.dtype} tensor of shape {tuple(item.shape)}>"
        return repr(item)

    if index is None:
        return "[...]"
    items = index if isinstance(index, tuple) else (index,)
    return "[" + ", ".join(one(i) for i in items) + "]"


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# -- choosing the tensor to edit in a nested output -----------------------------------------------------------------
def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    return type(value).__name__


def pick_tensor(output: Any, out: Out, where: str) -> tuple[torch.Tensor, Any]:
    """The tensor that ``out`` names in ``output`` and a function that puts an edited tensor back in its place,
    rebuilding the structure (same type, other parts unchanged); a bare tensor output ignores ``out``."""
    if isinstance(output, torch.Tensor):
        return output, lambda new: new
    target: Any
    if isinstance(output, (tuple, list)):
        fields = getattr(output, "_fields", None) if isinstance(output, tuple) else None
        pos = fields.index(out) if isinstance(out, str) and fields and out in fields else out
        if not isinstance(pos, int) or not -len(output) <= pos < len(output):
            parts = ", ".join(_describe(v) for v in output)
            raise EditError(f"{where}: out={out!r} is not in the output, a {type(output).__name__} of "
                            f"{len(output)} ({parts}). Pass out= as the position of the tensor to edit"
                            + (f" or one of its fields {list(fields)}." if fields else "."))
        target = output[pos]
        pos %= len(output)

        def rebuild(new: torch.Tensor) -> Any:
            items = [new if i == pos else v for i, v in enumerate(output)]
            if fields is not None:
                return type(output)(*items)
            try:
                return type(output)(items)
            except TypeError:  # a subclass with another constructor (cf. _tree.map_leaves)
                return tuple(items) if isinstance(output, tuple) else items
    elif isinstance(output, dict):
        keys = list(output.keys())
        key = out if out in output else None
        if key is None and isinstance(out, int) and -len(keys) <= out < len(keys):
            key = keys[out]  # a position among the values, as ModelOutput's own output[i]
        if key is None:
            raise EditError(f"{where}: out={out!r} is not in the output, a {type(output).__name__} with keys "
                            f"{keys}. Pass out= as one of these keys (or a position among them).")
        target = output[key]

        def rebuild(new: torch.Tensor) -> Any:
            if type(output) is dict:
                return {**output, key: new}
            edited = copy.copy(output)  # OrderedDict, ModelOutput (whose attributes follow its keys)
            edited[key] = new
            return edited
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        names = [f.name for f in dataclasses.fields(output)]
        name = out if isinstance(out, str) else (names[out] if -len(names) <= out < len(names) else None)
        if name not in names:
            raise EditError(f"{where}: out={out!r} is not a field of the output, a {type(output).__name__} with "
                            f"fields {names}. Pass out= as one of them.")
        target = getattr(output, name)

        def rebuild(new: torch.Tensor) -> Any:
            edited = copy.copy(output)
            object.__setattr__(edited, name, new)
            return edited
    else:
        raise EditError(f"{where}: the output is a {type(output).__name__}, which an edit cannot look into (it "
                        "edits a tensor, or one tensor of a tuple, list, dict, ModelOutput or dataclass output).")
    if not isinstance(target, torch.Tensor):
        raise EditError(f"{where}: out={out!r} picks a {type(target).__name__} from the "
                        f"{type(output).__name__} output, not a tensor. Pass out= naming a tensor of it.")
    return target, rebuild


def index_region(target: torch.Tensor, index: Index, where: str, of: str = "the output") -> torch.Tensor:
    if index is None:
        return target
    try:
        return target[index]
    except (IndexError, RuntimeError, TypeError, ValueError) as e:
        raise EditError(f"{where}: index {fmt_index(index)} does not fit {of}, of shape {shape_of(target)}: "
                        f"{e}") from None


def fit_value(value: torch.Tensor, region: torch.Tensor, target: torch.Tensor, index: Index, where: str,
         what: str) -> torch.Tensor:
    """``value`` on the region's device and dtype, if it broadcasts to the region's shape; else ``EditError``."""
    try:
        fits = torch.broadcast_shapes(value.shape, region.shape) == region.shape
    except RuntimeError:
        fits = False
    if not fits:
        at = "the output" if index is None else f"output{fmt_index(index)}"
        raise EditError(
            f"{where}: {what} has shape {shape_of(value)}, which does not broadcast to {at} of shape "
            f"{shape_of(region)} (the output has shape {shape_of(target)}, index {fmt_index(index)}). Give a "
            f"{what.split()[-1]} of shape {shape_of(region)}, or one that broadcasts to it (e.g. "
            f"{shape_of(region)[-1:]}).")
    return value.to(device=region.device, dtype=region.dtype)

