"""``capture()``: record what modules produced (and took in, and got as gradients), keyed by name.

``Capture`` is a hook engine (``core.engine.Engine``) plus stores: read-only views by layer name over the engine's
``Recording``, which check snapshots for later in-place edits (``core.snapshot``) as they are read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import ArgumentError, ArgumentTypeError, GradientUnavailableError, NotRecordedError
from hookkit.core import check as _check
from hookkit.core import tree as _tree
from hookkit.core.engine import Call, Engine, Recording, count_slots
from hookkit.core.select import Layers, select
from hookkit.core.snapshot import To, check_guards, refuse_unstored

__all__ = ["capture", "Capture", "Recorded", "Store", "concat_calls"]


def _unwrap(args: Any) -> Any:
    return args[0] if isinstance(args, tuple) and len(args) == 1 else args


def _find(rec: Recording, name: str) -> list[Call] | None:
    calls = rec.records.get(name)
    if calls is None and rec.wrapped and name.startswith("module."):
        calls = rec.records.get(name[len("module."):])  # DataParallel / DDP: the prefix is optional
    return calls

def _calls_of(rec: Recording, name: str, kind: str) -> list[Call]:
    if not isinstance(name, str):
        raise ArgumentTypeError(f"layer names are strings, got {_check.shown(name)}.")
    calls = _find(rec, name)
    if calls is None:
        selected = rec.selected_names
        shown = ", ".join(repr(n) for n in selected[:10]) + (", ..." if len(selected) > 10 else "")
        raise NotRecordedError(f"{name!r} is not one of the captured layers ({shown}).")
    if not calls:
        raise NotRecordedError(
            f"{name!r} never ran inside the capture block: nothing was recorded for it. "
            "Call the model inside the `with` block (and check that this layer is on the forward path)."
        )
    if kind in ("inputs", "kwargs") and not rec.want_inputs:
        raise NotRecordedError(f"inputs were not recorded: pass inputs=True to capture() to read {kind}[{name!r}].")
    if kind in ("grads", "grad_inputs"):
        if not rec.want_grads:
            raise NotRecordedError(
                f"gradients were not recorded: pass grads=True to capture() to read {kind}[{name!r}].")
        if not _has(kind, calls):
            target = "output" if kind == "grads" else "input"
            raise NotRecordedError(
                f"no gradient w.r.t. the {target} of {name!r} was recorded: no backward() reached it inside the "
                "capture block (a backward after the block exits records nothing; the input or output may "
                "also not require grad)."
            )
    return calls


def _last_forward_first(calls: list[Call]) -> int:
    """The index of the call ``store[name]`` reads: the first of the calls made in the last forward that has any
    (FX's ``name``: a module run several times in one forward is ``name``, ``name_1``... there); for a module run
    once per forward, its last call. Calls of unknown forward (a file saved by an older hookkit) each count as one."""
    i = len(calls) - 1
    forward = calls[i].forward
    if forward is None:
        return i
    while i and calls[i - 1].forward == forward:
        i -= 1
    return i


def _has(kind: str, calls: list[Call]) -> bool:
    if not calls:
        return False
    if kind == "grads":
        return any(c.grad_out is not None or c.grad_out_error for c in calls)
    if kind == "grad_inputs":
        # Once backward reached a call's output, its input gradient is known: a tensor, or None where the
        # input needs no grad (the lecture's grad_input[0] for the first conv).
        return any(c.grad_in is not None or c.grad_in_error or c.grad_out is not None or c.grad_out_error
                   for c in calls)
    return True


class Store:
    """A read-only view of one kind of recorded value (outputs, inputs, kwargs, grads, grad_inputs), by layer name.

    ``store[name]`` is the value of the node FX names ``name`` in the last forward of the model: for a module run
    several times in one forward, its first call there (``"layer1.0.relu_1"``, from ``hookkit.layer_names(model,
    x)``, is the second); for a module run once per forward, its last call. ``store.calls(name)`` is every call in
    call order.
    """

    def __init__(self, recording: Recording, kind: str) -> None:
        self._rec = recording
        self._kind = kind

    @property
    def recording(self) -> Recording:
        """The calls this store reads (``hookkit.merge`` and ``Capture.save`` walk them); not for changing."""
        return self._rec

    # -- Mapping-like surface ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        calls = _calls_of(self._rec, name, self._kind)
        return self._read(name, calls, _last_forward_first(calls))

    def calls(self, name: str) -> list[Any]:
        """Every recorded call of layer ``name``, in call order (aligned across outputs, inputs and grads)."""
        calls = _calls_of(self._rec, name, self._kind)
        return [self._read(name, calls, i) for i in range(len(calls))]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        """Names of the layers with a value of this kind, in order of first call."""
        records = self._rec.records
        return [n for n in self._rec.order if _has(self._kind, records[n])]

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self[n]) for n in self.keys()]

    def values(self) -> list[Any]:
        return [self[n] for n in self.keys()]

    def __contains__(self, name: object) -> bool:
        calls = _find(self._rec, name) if isinstance(name, str) else None
        return calls is not None and _has(self._kind, calls)

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"<hookkit {self._kind} of {len(self)} layer(s): {', '.join(self.keys())}>"

    # -- internals -----------------------------------------------------------------------------------------------
    def _read(self, name: str, calls: list[Call], i: int) -> Any:
        call = calls[i]
        where = f"{name!r}" + (f" (call {i})" if len(calls) > 1 else "")
        kind = self._kind
        if kind == "outputs":
            if call.version is not None:
                check_guards(((call.output, call.version),), f"the output of {where}")
            check_guards(call.guards, f"the output of {where}")
            refuse_unstored(call.output, f"the output of {where}")
            return call.output
        if kind == "inputs":
            check_guards(call.in_guards, f"the input of {where}")
            refuse_unstored(_unwrap(call.args), f"the input of {where}")
            return _unwrap(call.args)
        if kind == "kwargs":
            check_guards(call.in_guards, f"a keyword input of {where}")
            return call.kwargs
        if kind == "grads":
            if call.grad_out_error:
                raise GradientUnavailableError(f"the gradient w.r.t. the output of {where} was not stored: "
                                               f"{call.grad_out_error}")
            if call.grad_out is None:
                return None
            return _tree.fill(_tree.skeleton(call.output), call.grad_out)
        # grad_inputs
        if call.grad_in_error:
            raise GradientUnavailableError(f"no gradient w.r.t. the input of {where}: {call.grad_in_error}")
        if call.grad_in is None:
            if call.grad_in_skel is None:
                return None
            return _unwrap(_tree.fill(call.grad_in_skel, [None] * count_slots(call.grad_in_skel)))
        return _unwrap(_tree.fill(call.grad_in_skel, call.grad_in))


class Recorded(Store):
    """The reading API of a capture over one ``Recording``: the outputs by layer name, plus ``inputs``, ``kwargs``,
    ``grads``, ``grad_inputs`` and ``param_grads``, ``selected`` and ``save()``. ``Capture`` (live) and
    ``hookkit._saved.ReadOnlyCapture`` (loaded or merged) are both this."""

    def __init__(self, recording: Recording) -> None:
        super().__init__(recording, "outputs")
        self.inputs = Store(recording, "inputs")
        self.kwargs = Store(recording, "kwargs")
        self.grads = Store(recording, "grads")
        self.grad_inputs = Store(recording, "grad_inputs")
        # filled by backward passes inside a capture's block: param_grads[layer][param name]
        self.param_grads: dict[str, dict[str, torch.Tensor]] = recording.param_grads

    @property
    def selected(self) -> list[str]:
        """The layer names the capture hooks, as the specs resolved: a shared module under each of its names, and
        also the layers that never ran."""
        return list(self._rec.selected_names)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write what this capture recorded to one ``.safetensors`` file, atomically; ``hookkit.load`` reads it back.

        Example:
            >>> import os, tempfile, torch, torch.nn as nn, hookkit
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            >>> with hookkit.capture(model, ["1"]) as cap:
            ...     _ = model(torch.randn(2, 4))
            >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
            >>> cap.save(path)
            >>> torch.equal(hookkit.load(path)["1"], cap["1"])
            True

        Works inside the block too (what was recorded so far). Needs safetensors: ``pip install 'hookkit[save]'``.
        The file format, and what is kept (nested structures, inputs, gradients, ``param_grads``), are described
        in ``hookkit._saved``.

        Raises:
            SavedCaptureError: the folder does not exist, a tensor cannot be saved (sparse, meta; the message names
                the layer), or the write failed (a file already at ``path`` is left as it was).
            ModifiedInPlaceError: a stored tensor was changed in place after capture.
            ImportError: safetensors is not installed.
        """
        from hookkit.record.saved import save  # _saved builds on this module

        _check.path("Capture.save", "path", path)
        save(self, path)


class Capture(Recorded):
    """What ``capture()`` yields: the outputs by layer name, plus ``inputs``, ``kwargs``, ``grads``, ``grad_inputs``
    and ``param_grads``.

    Stays readable after the ``with`` block; holds neither the model nor (with ``detach=True``) any autograd graph.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Layers,
        *,
        inputs: bool = False,
        grads: bool = False,
        detach: bool = True,
        clone: bool = False,
        to: To = None,
        stop: bool = False,
        param_grads: bool = False,
    ) -> None:
        _check.flag("hookkit.capture", inputs=inputs, grads=grads, detach=detach, clone=clone, stop=stop,
                    param_grads=param_grads)
        chosen = select(model, layers, caller="hookkit.capture")
        self._engine = Engine(model, chosen, inputs=inputs, grads=grads, detach=detach, clone=clone, to=to,
                              stop=stop, param_grads=param_grads)
        super().__init__(self._engine.recording)

    def __enter__(self) -> Capture:
        self._engine.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        swallowed = self._engine.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._engine.warn_if_compiled_code_skipped_hooks("hookkit.capture")
        return swallowed

    @property
    def copies(self) -> int:
        """How many stored tensors hookkit copied because an in-place op (``ReLU(inplace=True)``, ``+=``) was about
        to overwrite them (copy-on-write; 0 with ``clone=True``, which copies everything at hook time)."""
        return self._engine.copies

    def remove(self) -> None:
        """Remove every hook this capture made (``__exit__`` does this for you); safe to call twice."""
        self._engine.remove()

    def __repr__(self) -> str:
        state = "open" if self._engine.active else "closed"
        return f"<hookkit.Capture ({state}) of {len(self)} layer(s) that ran: {', '.join(self.keys())}>"


def capture(
    model: nn.Module,
    layers: Layers,
    *,
    inputs: bool = False,
    grads: bool = False,
    detach: bool = True,
    clone: bool = False,
    to: To = None,
    stop: bool = False,
    param_grads: bool = False,
) -> Capture:
    """Record what the selected layers produce while the ``with`` block is open; remove every hook on exit.

    Example:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> with hookkit.capture(model, ["0", "3"]) as cap:
        ...     _ = model(torch.randn(1, 3, 16, 16))
        >>> cap["0"].shape, cap["3"].shape
        (torch.Size([1, 8, 14, 14]), torch.Size([1, 10]))

    Args:
        model: the ``nn.Module`` to hook (not compiled, not TorchScript).
        layers: a name from ``hookkit.layer_names(model)``, a glob (``"layer*.0.conv1"``; ``*`` stays inside one
            dotted part, ``**`` crosses parts), a module class (``nn.Conv2d``), a module object, a predicate
            ``(name, module) -> bool``, an op or repeated-call node from ``hookkit.layer_names(model, x)``
            (``"layer1.0.add"``, ``"relu_1"``: FX's names), or a list of these. Required: ``None`` is an
            ``ArgumentError`` (the functions that keep or change values per layer need the layers named).
        inputs: also record each call's positional inputs (``cap.inputs``) and keyword inputs (``cap.kwargs``).
        grads: also record gradients w.r.t. each call's output (``cap.grads``) and inputs (``cap.grad_inputs``)
            for every backward that runs while the block is open. Uses tensor hooks, not
            ``register_full_backward_hook``, so in-place ops, dict outputs and reused modules work.
        detach: store tensors without their autograd graph (default ``True``).
        clone: store a copy of every tensor at hook time. By default tensors are stored without copying and a
            later in-place change is detected when you read the value (``ModifiedInPlaceError``).
        to: a device and/or dtype for stored values, e.g. ``"cpu"``, ``torch.float16`` or ``("cpu", torch.float16)``;
            the dtype applies to floating-point tensors only.
        stop: end the forward pass as soon as every selected layer has run once; the ``with`` block swallows the
            stop, so code after the model call inside the block does not run.
        param_grads: also keep, at the end of each backward inside the block, a copy of the accumulated ``.grad``
            of every parameter of each selected module: ``cap.param_grads[layer][param_name]`` (parameter names are
            relative to the layer, e.g. ``"weight"``, ``"0.bias"``). The copy is ``p.grad`` as the backward leaves
            it: under DDP the all-reduced average (the same on every rank; inside ``no_sync()`` the rank's own
            accumulated gradient, which the next synced backward averages), under FSDP2 the rank's shard (a
            DTensor: ``.full_tensor()`` gathers it).

    Returns:
        A ``Capture``: ``cap[name]`` (the value of the node FX names ``name``, in the last forward of the model: a
        module's last call, or its first in the last forward when it runs several times in one forward, where
        ``name_1`` is its second), ``cap.calls(name)`` (every call), ``list(cap)`` (layers that ran, in order of
        first call), and the stores ``cap.inputs``, ``cap.kwargs``, ``cap.grads``, ``cap.grad_inputs`` (read the
        same way).

    Raises:
        LayerNotFoundError: a spec matched no module (before any hook is registered).
        ArgumentError: ``layers=None``.
        TypeError: ``model`` is not an ``nn.Module``.
        UnsupportedModelError: TorchScript or compiled modules, whose hooks torch would not run.
    """
    return Capture(model, layers, inputs=inputs, grads=grads, detach=detach, clone=clone, to=to, stop=stop,
                   param_grads=param_grads)


def concat_calls(values: list[Any], dim: int = 1) -> Any:
    """Join the calls of one layer into one value: e.g. the steps of ``model.generate()`` with a KV cache, where a
    block sees the prompt first and then one new token per call, concatenated along the sequence dimension.

    Example:
        >>> import torch
        >>> steps = [torch.zeros(1, 5, 8), torch.ones(1, 1, 8), torch.ones(1, 1, 8)]  # prompt, then 2 tokens
        >>> concat_calls(steps, dim=1).shape
        torch.Size([1, 7, 8])

    Nested values (tuples, dicts, ModelOutput) are joined tensor by tensor; ``None`` and other non-tensors are
    taken from the first call. Typical use: ``concat_calls(cap.calls("transformer.h.0"), dim=1)``.

    Raises:
        ValueError: no calls, or calls whose structures differ.
    """
    _check.instance("hookkit.concat_calls", "values", values, (list, tuple), "a list of calls (cap.calls(name))")
    _check.whole("hookkit.concat_calls", "dim", dim)
    if not values:
        raise ArgumentError("concat_calls: values= holds no call; did the layer run inside the capture block?")
    per_call = [_tree.leaves(v) for v in values]
    if any(len(p) != len(per_call[0]) for p in per_call):
        raise ArgumentError("concat_calls: the calls in values= hold different numbers of tensors, so they cannot be "
                            "joined tensor by tensor.")
    for t in per_call[0]:
        if not -t.dim() <= dim < t.dim():
            raise ArgumentError(f"concat_calls: dim={dim} is not a dim of the calls' {t.dim()}-D tensors (shape "
                                f"{tuple(t.shape)}); give a dim from {-t.dim()} to {t.dim() - 1}.")
    joined = [torch.cat([p[i] for p in per_call], dim=dim) for i in range(len(per_call[0]))]
    return _tree.fill(_tree.skeleton(values[0]), joined)
