"""What ops are called and what they write: the naming half of the op taps (``core/ops.py``), with no hook in it.

Naming (torchvision's ``get_graph_node_names``): an op is named after the innermost non-leaf module whose
``forward`` runs it (its *scope*) plus the op (``op_name``: ``"layer1.0.add"``; no prefix at the root), with ``_1``,
``_2`` ... for repeats (``call_name``) counted per full name within one forward of the model. Leaf modules
(``is_leaf``) are FX's (classes of ``torch.nn``, except ``nn.Sequential``) and torchvision's defaults (every module
class of ``torchvision.ops``); ops inside them are not nodes. ``written`` says which tensors an op writes into (its
first argument for in-place ops, ``out=``), ``writes_in_place`` / ``writer_roots`` which modules' forwards may write
at all (copy-on-write watches inside those only), and ``keeps_written`` / ``write_into`` how a hook's replacement
of an in-place op's argument or output reaches the model. ``core.select`` reads the names (``split_node_name``,
``known_op_names``) to resolve a node name before any forward.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import sys
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from hookkit._errors import EditError

__all__ = ["OpSite", "Node", "op_name", "op_label", "is_leaf", "writes_in_place", "writer_roots", "written",
           "known_op_names", "split_node_name", "call_name", "own_class", "keeps_written", "write_into"]


class OpSite(NamedTuple):
    """Where an op ran, for a listener: the op's function, and the module whose ``forward`` called it."""

    func: Any
    scope: str
    scope_cls: str

    @property
    def label(self) -> str:
        """``torch.sqrt``, ``Tensor.add_``, ``F.relu``: the op as a user would write it."""
        return op_label(self.func)


# -- leaves and writers ----------------------------------------------------------------------------------------------
def is_leaf(module: nn.Module) -> bool:
    """FX's leaf rule (``torch.fx.Tracer.is_leaf_module``) plus torchvision's default leaf modules (every module class
    in ``torchvision.ops``): ops inside a leaf are not nodes. A module that ``fully_shard`` (or composable
    ``replicate``) gave a class of its own (``FSDPLinear``, of ``FSDPModule`` and ``nn.Linear``) is judged by the
    class it had."""
    if own_class(type(module)).__module__.startswith(("torch.nn", "torch.ao.nn")):
        return not isinstance(module, nn.Sequential)
    return isinstance(module, _torchvision_leaves())


def own_class(cls: type) -> type:
    """The class a module had before the parallel machinery put a class of its own in front of it (torch.distributed's
    ``FSDP<name>`` / ``DDP<name>``): the first in its MRO from outside torch.distributed, unless that is
    ``nn.Module`` itself (a wrapper module of torch.distributed's, such as ``CheckpointWrapper``, is its own)."""
    if not cls.__module__.startswith("torch.distributed."):
        return cls
    own = next((c for c in cls.__mro__ if not c.__module__.startswith("torch.distributed.")), nn.Module)
    return cls if own is nn.Module else own


def _torchvision_leaves() -> tuple[type, ...]:
    """torchvision's ``_get_leaf_modules_for_ops()``: the nn.Module classes ``torchvision.ops`` exports (if loaded)."""
    tv = sys.modules.get("torchvision.ops")
    if tv is None:
        return ()
    return tuple(c for c in vars(tv).values() if isinstance(c, type) and issubclass(c, nn.Module))


def writes_in_place(module: nn.Module) -> bool:
    """Whether ``module``'s own ``forward`` may write into a tensor it did not make: any ``forward`` that is not
    torch.nn's own (a user's or a library's code), and torch.nn modules built with ``inplace=True``. (Reads the
    module's dict: ``getattr`` of a missing attribute goes through ``Module.__getattr__``, several times slower.)"""
    cls = type(module)
    own = _CLASS_WRITES.get(cls)
    if own is None:
        forward = getattr(cls, "forward", None)
        own = _CLASS_WRITES[cls] = not getattr(forward, "__module__", "torch.nn").startswith(
            ("torch.nn.", "torch.ao.nn."))
    d = module.__dict__
    return own or d.get("inplace") is True or "forward" in d


_CLASS_WRITES: dict[type, bool] = {}


def writer_roots(named: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The outermost modules whose forward may write in place, from ``named_modules(remove_duplicate=False)`` (in
    its pre-order, a module's descendants follow it and share its name as prefix): copy-on-write watches inside
    these only. Runs at every block's entry, on the walk the layer lookup already made."""
    found: dict[int, nn.Module] = {}
    inside = None  # the name prefix of the last root found
    for name, m in named:
        if inside is not None and name.startswith(inside):
            continue
        if writes_in_place(m):
            if not name:
                return [m]  # the model itself
            found[id(m)] = m
            inside = name + "."
    return list(found.values())


# -- what an op writes ---------------------------------------------------------------------------------------------
_INPLACE_DUNDERS = frozenset(f"__i{n}__" for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                                                   "or", "xor", "lshift", "rshift", "matmul", "div"))
_WRITES: dict[Any, int] = {}  # func -> 0 (writes nothing), 1 (writes its first argument), 2 + i (inplace= at i)


def _classify(func: Any) -> int:
    name = getattr(func, "__name__", "")
    if name == "__setitem__" or name in _INPLACE_DUNDERS:
        kind = 1
    elif name.endswith("_") and not name.endswith("__"):
        kind = 1  # add_, relu_, copy_, zero_, index_put_, torch.nn.init.uniform_ ...
    elif getattr(func, "__module__", None) == "torch.nn.functional":
        try:
            params = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            params = []
        kind = 2 + params.index("inplace") if "inplace" in params else 0
    else:
        kind = 0
    with contextlib.suppress(TypeError):  # an unhashable callable: classified again next time
        _WRITES[func] = kind
    return kind


def written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors that ``func(*args, **kwargs)`` will write into: its first argument for in-place ops (``add_``,
    ``+=``, ``x[i] = v``, ``F.relu(x, inplace=True)``), and ``out=``."""
    try:
        kind = _WRITES.get(func)
    except TypeError:
        kind = None
    if kind is None:
        kind = _classify(func)
    out: list[torch.Tensor] = []
    if kind:
        if kind >= 2:
            i = kind - 2
            on = kwargs["inplace"] if "inplace" in kwargs else (args[i] if len(args) > i else False)
            kind = 1 if on is True else 0
        if kind:
            first = args[0] if args else kwargs.get("input", kwargs.get("self"))
            if isinstance(first, torch.Tensor):
                out.append(first)
    if kwargs:
        o = kwargs.get("out")
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (tuple, list)):
            out.extend(t for t in o if isinstance(t, torch.Tensor))
    return out


# -- names -----------------------------------------------------------------------------------------------------------
# Python operators, named as FX names the ``operator`` function a Proxy records.
_OPERATORS = {
    "+": "add", "-": "sub", "*": "mul", "/": "truediv", "//": "floordiv", "%": "mod", "**": "pow", "@": "matmul",
    "&": "and_", "|": "or_", "^": "xor", "<<": "lshift", ">>": "rshift",
    "<": "lt", "<=": "le", "==": "eq", "!=": "ne", ">": "gt", ">=": "ge",
}
_UNARY = {"UNARY_NEGATIVE": "neg", "UNARY_INVERT": "invert", "UNARY_POSITIVE": "pos", "BINARY_SUBSCR": "getitem",
          "STORE_SUBSCR": "setitem"}
# Functions a Python operator can reach: only for these is the caller's bytecode read (``x / y`` -> "truediv",
# ``x.div(y)`` -> "div"; ``x += y`` -> "add", ``x.add_(y)`` -> "add_").
_OPERATOR_FUNCS = frozenset({
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "floor_divide", "remainder",
    "remainder_", "pow", "pow_", "matmul", "bitwise_and", "bitwise_and_", "bitwise_or", "bitwise_or_",
    "bitwise_xor", "bitwise_xor_", "bitwise_not", "bitwise_left_shift", "bitwise_right_shift", "neg", "positive",
    "eq", "ne", "lt", "le", "gt", "ge", "__getitem__", "__setitem__", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "__and__", "__or__", "__xor__", "__invert__", "__neg__", "__pos__", "__lshift__",
    "__rshift__", "__floordiv__", "__rfloordiv__", "__rsub__", "__radd__", "__rmul__", "__rtruediv__", "__rdiv__",
    "__rpow__", "__rmatmul__", "__rmod__", "__mod__", "__pow__", "__matmul__", "__truediv__", "__div__",
    "__rand__", "__ror__", "__rxor__", "__rlshift__", "__rrshift__", "__ilshift__", "__irshift__", "__iand__",
    "__ior__", "__ixor__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__imatmul__", "__abs__", "abs",
}) - {"abs"}
_DUNDER = {"__getitem__": "getitem", "__setitem__": "setitem", "__get__": "getattr", "__set__": "setattr",
           "__rsub__": "sub", "__radd__": "add", "__rmul__": "mul", "__rtruediv__": "truediv",
           "__rdiv__": "truediv", "__truediv__": "truediv", "__div__": "truediv", "__rfloordiv__": "floordiv",
           "__rpow__": "pow", "__rmatmul__": "matmul", "__rmod__": "mod", "__and__": "and_", "__or__": "or_",
           "__xor__": "xor", "__rand__": "and_", "__ror__": "or_", "__rxor__": "xor", "__rlshift__": "lshift",
           "__rrshift__": "rshift", "__invert__": "invert"}
_BYTECODE: dict[tuple[Any, int], str | None] = {}


def _operator_at(frame: Any) -> str | None:
    """The FX name of the Python operator that ``frame`` is executing (``+=`` -> "add"), or None for a call."""
    key = (frame.f_code, frame.f_lasti)
    try:
        return _BYTECODE[key]
    except KeyError:
        pass
    found: str | None = None
    for ins in dis.get_instructions(frame.f_code):
        if ins.offset == frame.f_lasti:
            rep = ins.argrepr
            if ins.opname == "COMPARE_OP":
                found = _OPERATORS.get(rep.removeprefix("bool(").removesuffix(")"))
            elif ins.opname == "BINARY_OP":  # "+", "+=" (in place: FX records the same operator), "[]" (3.14)
                found = "getitem" if rep == "[]" else _OPERATORS.get(rep[:-1] if rep.endswith("=") else rep)
            else:
                found = _UNARY.get(ins.opname)
            break
    _BYTECODE[key] = found
    return found


def op_name(func: Any, frame: Any = None) -> str:
    """The FX base name of an op (before the scope and the ``_1`` suffix): the Python operator that ran it, else the
    function's name (``torch.flatten`` and ``x.flatten()`` -> "flatten", ``x.shape`` -> "getattr")."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if frame is not None and name in _OPERATOR_FUNCS:
        found = _operator_at(frame)
        if found is not None:
            return found
    if name.startswith("__") and name.endswith("__"):
        if name in _INPLACE_DUNDERS:  # x.__iadd__(y): FX records x + y
            name = "__" + name[3:]
        return _DUNDER.get(name, name.strip("_"))
    return name


def op_label(func: Any) -> str:
    """``torch.sqrt``, ``Tensor.add_``, ``F.relu``: how a user would write the op."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return "Tensor attribute"
    qual = getattr(func, "__qualname__", name)
    mod = getattr(func, "__module__", None) or ""
    if qual.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + qual.split(".", 1)[1]
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + name
    if mod == "torch.nn.functional":
        return "F." + name
    if mod.startswith("torch._C._nn"):
        return "F." + name
    return f"{mod}.{qual}" if mod else qual


_KNOWN: set[str] | None = None


def known_op_names() -> set[str]:
    """Every base name an op can have (the functions torch's function mode can see, and Python's operators)."""
    global _KNOWN
    if _KNOWN is None:
        names = set(_OPERATORS.values()) | set(_UNARY.values()) | set(_DUNDER.values())
        for funcs in torch.overrides.get_overridable_functions().values():
            for f in funcs:
                names.add(op_name(f))
        names.update(n for n in dir(torch.Tensor) if not n.startswith("_"))
        _KNOWN = names
    return _KNOWN


def split_node_name(name: str) -> tuple[str, str, int]:
    """``"layer1.0.relu_2"`` -> ("layer1.0", "relu", 2); ``"add_"`` -> ("", "add_", 0)."""
    scope, _, leaf = name.rpartition(".")
    base, sep, k = leaf.rpartition("_")
    if sep and k.isdigit() and base and not k.startswith("0"):
        return scope, base, int(k)
    return scope, leaf, 0


def call_name(name: str, k: int) -> str:
    """The ``k``-th call (from 0) of ``name`` within one forward, named as FX names repeated calls (``relu``,
    ``relu_1``, ``relu_2``): how ``capture`` takes it, and how ``trace``, ``summary`` and errors show it."""
    return f"{name}_{k}" if k else name


def keeps_written(name: str, args: tuple, new_args: tuple, writes: tuple) -> None:
    """A forward-pre hook of an op that writes in place must not swap the tensor written into: the op would write
    into the stand-in, and the model, which goes on with its own tensor, would never see the op."""
    for i, a in enumerate(args):
        if any(a is w for w in writes) and (i >= len(new_args) or new_args[i] is not a):
            raise EditError(f"a forward_pre hook replaced argument {i} of {name!r}, the tensor this op writes into "
                            "in place: the op would change the replacement and the model would go on with its "
                            "own tensor, unchanged. Replace the other arguments, or edit the op's output with a "
                            "forward hook (it is written into the tensor).")


def write_into(name: str, output: Any, replaced: Any, writes: tuple) -> Any:
    """A hook replaced the output of an op that writes in place (``y.add_(1)``, ``out += identity``,
    ``torch.add(a, b, out=y)``). Such an op's result is the tensor it wrote into, and a model often drops the
    returned value (``y.add_(1)`` as a statement): the replacement is written into that tensor (``copy_``, in the
    autograd graph, as the same edit written by hand after the op), and the tensor itself is returned."""
    if not any(output is t for t in writes) or not isinstance(output, torch.Tensor):
        raise EditError(f"a hook replaced the output of {name!r}, an op that writes in place and returns "
                        f"{type(output).__name__}, not the tensor it wrote: the replacement would never reach "
                        "the model. Edit the tensor where it is read next (the next node or module).")
    if (not isinstance(replaced, torch.Tensor) or replaced.shape != output.shape
            or replaced.dtype != output.dtype or replaced.device != output.device):
        got = (f"a {replaced.dtype} tensor of shape {tuple(replaced.shape)} on {replaced.device}"
               if isinstance(replaced, torch.Tensor) else type(replaced).__name__)
        raise EditError(f"a hook replaced the output of {name!r}, an op that writes in place, by {got}: it is "
                        f"written into the tensor the op changed ({output.dtype}, shape {tuple(output.shape)}, "
                        f"on {output.device}), so it must have that shape, dtype and device.")
    output.copy_(replaced)
    return output


class Node(NamedTuple):
    """What a discovered name names: a module's first call (``what`` the module), the ``call``-th call of the leaf
    module at ``path`` (``what`` the module), or an op (``what`` its ``OpSite``, ``path`` its scope)."""

    kind: str  # "module", "call" or "op"
    what: Any
    path: str
    call: int
