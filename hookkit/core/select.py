"""The one reader of layer arguments: names, globs, classes, module objects, predicates, lists of these, and op /
repeated-call node names (FX's: ``"layer1.0.add"``, ``"relu_1"``) -> a ``Selection``, with helpful not-found errors.

Every public function that takes ``layers`` reads it through ``select()``: ``capture``, ``trace``, ``check_finite``,
``summary``, ``extract``, ``monitor``, ``hooks`` / ``edits`` and ``patching_sweep``; the engine
(``core/engine.py``) takes the ``Selection`` as it is. ``layers=None`` means one thing everywhere: functions that
only look (``trace``, ``check_finite``, ``summary``, ``monitor``) take every submodule, modules only; functions that
keep or change values per layer need the layers named, and refuse ``None`` naming ``hookkit.layer_names(model)``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError, ArgumentTypeError, LayerNotFoundError, UnsupportedModelError
from hookkit.core.compat import is_compiled_in_place

__all__ = ["LayerSpec", "Layers", "Selection", "select", "layers_needed", "layer_names", "resolve", "resolve_nodes",
           "check_model", "unwrap"]

LayerSpec = str | type | nn.Module | Callable[[str, nn.Module], bool]
Layers = LayerSpec | Iterable[LayerSpec]

_GLOB_CHARS = re.compile(r"[*?\[]")


def layer_names(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> list[str]:
    """Every name that the functions taking ``layers`` accept for ``model`` (``capture``, ``trace``,
    ``check_finite``, ``extract``, ``monitor``, ``hooks``, ``edits``, ``patching_sweep``; ``summary`` takes the
    module names).

    Without example inputs: the module names, in ``named_modules`` order. With them, the model runs once (under
    ``no_grad``; every module's train / eval flag, the buffers and the RNG state restored afterwards) and the list
    holds, in execution order, the modules that ran, the op nodes (``"relu"``, ``"layer1.0.add"``, ``"flatten"``) and
    repeated calls of leaf modules (``"layer1.0.relu_1"``), named as torchvision's ``get_graph_node_names`` names
    them: ``capture`` reads ``"layer1.0.relu"`` as that module's first call in the last forward, ``"layer1.0.relu_1"``
    as its second.

    A module registered under several names (a shared submodule) is listed under each of them. For a model
    wrapped in DataParallel or DistributedDataParallel, the names are the wrapped model's (``"layer1"``; hookkit
    also accepts ``"module.layer1"``).

    Examples:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, hookkit
        >>> hookkit.layer_names(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        ['0', '1']
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return F.relu(self.fc(x) + x).flatten(1)
        >>> hookkit.layer_names(Net(), torch.randn(2, 4))
        ['fc', 'add', 'relu', 'flatten']
    """
    _require_module(model)
    model, _ = unwrap(model)
    if not example_args and not example_kwargs:
        return [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    check_model(model)
    from hookkit.core.ops import discover  # the op machinery loads only when a forward is asked for

    return discover(model, example_args, example_kwargs)


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model inside DataParallel / DistributedDataParallel wrappers, and whether there was one."""
    wrapped = False
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model, wrapped = model.module, True
    return model, wrapped


def _require_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"model= must be a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}. "
            "Pass the model object itself (not its output, state_dict or a function)."
        )


def check_model(model: Any, named: list[tuple[str, nn.Module]] | None = None) -> None:
    """Refuse models whose module hooks torch would not run, before anything is registered."""
    _require_module(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a TorchScript module: torch does not run Python module hooks on "
            "scripted or traced modules. Capture on the eager nn.Module you scripted instead."
        )
    for name, module in named if named is not None else model.named_modules():
        where = f"the submodule {name!r}" if name else "the model"
        if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
            raise UnsupportedModelError(
                f"{where} is compiled with torch.compile: hooks added after compiling are skipped by the "
                "compiled code (torch does not guard on hook dicts by default), so hookkit would see nothing. "
                "Capture on the eager module (`compiled._orig_mod`), or register the capture before compiling."
            )
        if is_compiled_in_place(module):
            raise UnsupportedModelError(
                f"{where} was compiled in place with Module.compile(): hooks added afterwards are skipped by the "
                "compiled code, so hookkit would see nothing. Capture on an uncompiled copy of the model, or "
                "register the capture before calling .compile()."
            )
        if isinstance(module, torch.jit.ScriptModule) and name:
            raise UnsupportedModelError(
                f"{where} is a TorchScript module: torch does not run Python hooks inside it. "
                "Replace it with its eager nn.Module to capture inside it."
            )


def _glob_regex(pattern: str, param: str = "layers") -> re.Pattern[str]:
    """``*`` matches inside one dotted component, ``**`` across components, ``?`` one character, ``[..]`` a set.
    A pattern that is no valid set (``"a[z-a]"``) is an ``ArgumentError`` naming ``param`` (the option it came in)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body in ("", "!"):
                    raise ArgumentError(f"{param}: the pattern {pattern!r} is not a valid glob: its set "
                                        f"'[{body}]' lists no character. Write e.g. 'layer[1-4]'.")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as exc:  # only a [..] set reaches the regex unescaped: its body is what is wrong
        raise ArgumentError(f"{param}: the pattern {pattern!r} is not a valid glob ({exc.msg} in its [...] set). A "
                            "set lists characters or ranges low-high, e.g. 'layer[1-4]'; '[!...]' excludes them.",
                            ) from None


def _describe(spec: Any) -> str:
    if isinstance(spec, type):
        return f"class {spec.__module__}.{spec.__qualname__}"
    if isinstance(spec, nn.Module):
        return f"module object {type(spec).__name__}"
    if isinstance(spec, str):
        return repr(spec)
    return f"predicate {getattr(spec, '__qualname__', repr(spec))}"


def _not_found(model: nn.Module, spec: Any, names: list[str]) -> LayerNotFoundError:
    model_name = type(model).__name__
    hint = ("See hookkit.layer_names(model) (or `hookkit layers MODEL`) for every valid name, and "
            "hookkit.layer_names(model, example_input) (`hookkit layers MODEL --input-shape ...`) for op nodes.")
    if isinstance(spec, str):
        kind = "pattern" if _GLOB_CHARS.search(spec) else "layer"
        close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
        ops = not close and not _GLOB_CHARS.search(spec)
        if ops:  # names of torch functions, which this model's forward may never call: said so
            close = _close_ops(model, names, spec)
        if not close and _GLOB_CHARS.search(spec):
            literal = _GLOB_CHARS.sub("", spec)
            close = difflib.get_close_matches(literal, names, n=5, cutoff=0.4)
        what, whether = "", ""
        if ops:
            one = len(close) == 1
            what = "the op node " if one else "one of the op nodes "
            whether = f" (a node only if the forward calls {'that torch function' if one else 'those torch functions'})"
        did_you_mean = f" Did you mean {what}{', '.join(repr(c) for c in close)}{whether}?" if close else ""
        glob_help = " (in patterns `*` matches inside one dotted part, `**` across parts)" if kind == "pattern" else ""
        return LayerNotFoundError(f"no {kind} {spec!r} in {model_name}{glob_help}.{did_you_mean} {hint}")
    if isinstance(spec, type):
        present = sorted({type(m).__name__ for m in model.modules()})
        shown = ", ".join(present[:15]) + (", ..." if len(present) > 15 else "")
        return LayerNotFoundError(
            f"no module of {_describe(spec)} in {model_name}; its module classes are: {shown}. {hint}"
        )
    return LayerNotFoundError(f"{_describe(spec)} matched no module of {model_name}. {hint}")


def _close_ops(model: nn.Module, names: list[str], spec: str) -> list[str]:
    """Op node names close to ``spec`` in the same scope (``"layer1.0.ad"`` -> ``"layer1.0.add"``)."""
    from hookkit.core.ops import known_op_names, split_node_name

    scope, base, k = split_node_name(spec)
    if scope and scope not in names:
        return []
    close = difflib.get_close_matches(base, sorted(known_op_names()), n=3, cutoff=0.75)
    suffix = f"_{k}" if k else ""
    return [f"{scope}.{c}{suffix}" if scope else f"{c}{suffix}" for c in close]


def _as_list(layers: Any) -> list[Any]:
    if isinstance(layers, (str, type, nn.Module)) or callable(layers):
        return [layers]
    try:
        specs = list(layers)
    except TypeError:
        raise ArgumentTypeError(
            f"layers must be a name, glob, module class, module, predicate (name, module) -> bool, or a list of "
            f"these; got {type(layers).__name__}."
        ) from None
    if not specs:
        raise ArgumentError("layers is empty: name at least one layer (see hookkit.layer_names(model)).")
    return specs


class Selection:
    """A layer argument, read: the selected modules with the names they go by (``named_modules`` order), and the op /
    repeated-call nodes with the path of the module whose forward names each. ``walked`` is the (unwrapped) model's
    ``named_modules(remove_duplicate=False)``, so that the engine need not walk it again. Made by ``select()``,
    handed to the engine as it is; short-lived (it holds modules)."""

    __slots__ = ("modules", "nodes", "walked")

    def __init__(self, modules: dict[nn.Module, list[str]], nodes: dict[str, str],
                 walked: list[tuple[str, nn.Module]]) -> None:
        self.modules = modules
        self.nodes = nodes
        self.walked = walked

    @property
    def names(self) -> list[str]:
        """Every selected name: the modules' (``named_modules`` order), then the nodes' (as given)."""
        return [n for ns in self.modules.values() for n in ns] + list(self.nodes)


def select(model: nn.Module, layers: Any, *, caller: str, every_if_none: bool = False,
           no_nodes: str | None = None, param: str = "layers") -> Selection:
    """Read a layer argument: the one rule every public function follows.

    ``layers=None``: with ``every_if_none``, every named submodule of the (unwrapped) model, modules only, or the
    model itself when it has no submodule (a bare ``nn.Linear``); else an ``ArgumentError`` saying that ``caller``
    needs the layers named (``param``: what the argument is called there). ``no_nodes``: why ``caller`` cannot act
    on op / repeated-call nodes (then a node name is an ``ArgumentError`` saying so); None: nodes are selected as
    capture selects them.

    Raises ``LayerNotFoundError`` for any spec that matches nothing, before the caller changes anything.
    """
    if isinstance(layers, Selection):
        return layers
    every = layers is None
    if every and not every_if_none:
        raise layers_needed(caller, param)
    walked: list[tuple[str, nn.Module]] = []
    modules, nodes = resolve_nodes(model, _every_submodule if every else layers, walked)
    if every and not modules:  # a model without submodules (a bare nn.Linear): the model itself
        modules = {walked[0][1]: [""]}
    if nodes and no_nodes is not None:
        name = next(iter(nodes))
        raise ArgumentError(f"{caller}: {name!r} is an op or repeated-call node, and {no_nodes}. Give module names "
                            "here (hookkit.layer_names(model) lists them).")
    return Selection(modules, nodes, walked)


def layers_needed(caller: str, param: str = "layers") -> ArgumentError:
    """The error for ``layers=None`` given to a function that keeps or changes values per layer."""
    return ArgumentError(
        f"{caller}: {param} is None, but {caller} keeps or changes values per layer, so it needs the layers named: "
        "a name, a glob ('layer*.0.conv1'), a module class (nn.Linear), a module object, a predicate "
        "(name, module) -> bool, or a list of these. hookkit.layer_names(model) lists the names (and "
        "hookkit.layer_names(model, example_input) the op nodes).")


def _every_submodule(name: str, module: nn.Module) -> bool:
    """``layers=None`` where a function takes every submodule (the predicate never sees the root)."""
    return True


def resolve(model: nn.Module, layers: Any) -> dict[nn.Module, list[str]]:
    """Map each selected module to the selected names it goes by, in ``named_modules`` order (module names only).

    Raises ``LayerNotFoundError`` for any spec that matches nothing, and ``ArgumentError`` for an op node, before
    the caller changes anything.
    """
    return select(model, layers, caller="hookkit", no_nodes="only modules are taken here").modules


def resolve_nodes(model: nn.Module, layers: Any, walked: list[tuple[str, nn.Module]] | None = None,
                  ) -> tuple[dict[nn.Module, list[str]], dict[str, str]]:
    """``resolve``, plus the names that are op or repeated-call nodes (``"layer1.0.add"``, ``"layer1.0.relu_1"``):
    ``{node name: the path of the module whose forward names it}``, checked as far as can be before a forward.
    ``walked``, if given, receives the (unwrapped) model's ``named_modules(remove_duplicate=False)``. ``layers``
    may be a ``Selection`` (``select()``'s), taken as it is.

    Raises ``LayerNotFoundError`` for any spec that matches nothing, before the caller changes anything.
    """
    if isinstance(layers, Selection):
        if walked is not None:
            walked.extend(layers.walked)
        return dict(layers.modules), dict(layers.nodes)
    _require_module(model)
    model, wrapped = unwrap(model)
    named = list(model.named_modules(remove_duplicate=False))
    if walked is not None:
        walked.extend(named)
    check_model(model, named)
    if layers is None:
        raise ArgumentError("layers=None: name the layers (see hookkit.layer_names(model)).")
    specs = _as_list(layers)
    if wrapped:  # "module.layer1" and "layer1" both name the wrapped model's layer1
        specs = [s[len("module."):] if isinstance(s, str) and s.startswith("module.") else s for s in specs]
    names = [n for n, _ in named if n]
    every_name = {n for n, _ in named}  # with the model's own "" (a bare Linear is traced by that name)
    chosen: set[str] = set()
    nodes: dict[str, str] = {}
    for spec in specs:
        if isinstance(spec, str):
            if _GLOB_CHARS.search(spec):
                rx = _glob_regex(spec)
                hits = [n for n in names if rx.match(n)]
            else:
                hits = [spec] if spec in every_name else []
                if not hits:
                    scope = _node_scope(model, dict(named), spec)
                    if scope is not None:
                        nodes[spec] = scope
                        continue
        elif isinstance(spec, type):
            hits = [n for n, m in named if n and isinstance(m, spec)]
        elif isinstance(spec, nn.Module):
            hits = [n for n, m in named if m is spec]
        elif callable(spec):
            hits = [n for n, m in named if n and spec(n, m)]
        else:
            raise ArgumentTypeError(
                f"cannot select layers with {type(spec).__name__} {spec!r}: use a name, a glob, a module class, "
                "a module object or a predicate (name, module) -> bool."
            )
        if not hits and spec is not _every_submodule:
            raise _not_found(model, spec, names)
        chosen.update(hits)
    selected: dict[nn.Module, list[str]] = {}
    for n, m in named:
        if n in chosen:
            selected.setdefault(m, []).append(n)
    return selected, nodes


def _node_scope(model: nn.Module, modules: dict[str, nn.Module], spec: str) -> str | None:
    """The scope of an op or repeated-call node name, or None when ``spec`` cannot be one."""
    from hookkit.core.ops import is_leaf, known_op_names, split_node_name

    scope, base, k = split_node_name(spec)
    owner = modules.get(scope)
    if owner is None:
        return None
    child = f"{scope}.{base}" if scope else base
    repeated = k >= 1 and child in modules and is_leaf(modules[child])
    if not repeated and base not in known_op_names():
        return None
    if is_leaf(owner):
        where = f"{scope!r}" if scope else "the model"
        raise LayerNotFoundError(
            f"{spec!r} names an op inside {where}, a {type(owner).__name__}: ops inside torch's own modules (and "
            "torchvision.ops') are not nodes, as in torchvision's FX extractor. Capture the module itself. See "
            "hookkit.layer_names(model, example_input) for every node name.")
    return scope
