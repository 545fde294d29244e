"""The one result type of a capture: ``Capture``, what ``capture()`` fills, ``load()`` reads from a file and
``merge()`` joins. Readable (by layer name, through ``Store``s), savable (``Capture.save``) and mergeable.

A ``Capture`` reads a ``Recording`` of ``Call`` records (``core.engine``): the live one a ``capture()`` block's engine
fills (``record.capture.CaptureBlock``), or one built from a file (``record.saved``) or from several captures
(``record.merge``). Reading checks snapshots for later in-place edits (``core.snapshot``). A loaded or merged capture
is the same class, with no hooks behind it. This module imports the file code (``record.saved``), never the other way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch

from hookkit._errors import ArgumentTypeError, GradientUnavailableError, NotRecordedError
from hookkit.core import check as _check
from hookkit.core import tree as _tree
from hookkit.core.engine import Call, Recording, count_slots
from hookkit.core.snapshot import check_guards, refuse_unstored
from hookkit.record import saved as _saved

__all__ = ["Capture", "Store", "load"]


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
        where = f"{name!r}" + (f" (calls({name!r})[{i}])" if len(calls) > 1 else "")
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


class _Hooks(Protocol):
    """What a live capture asks of the hooks that fill it (the engine of a ``record.capture.CaptureBlock``)."""

    @property
    def copies(self) -> int: ...

    @property
    def active(self) -> bool: ...

    def remove(self) -> None: ...


class Capture(Store):
    """What a capture recorded: the outputs by layer name (``cap[name]``, ``cap.calls(name)``, ``list(cap)``: the
    same as ``cap.outputs[name]`` ...), plus the stores ``inputs``, ``kwargs``, ``grads``, ``grad_inputs`` (read the
    same way) and ``param_grads``.

    ``with hookkit.capture(model, layers) as cap:`` gives one, filled while the block runs; ``hookkit.load(path)``
    and ``hookkit.merge(captures)`` give one too, the same class without hooks behind it. Every one reads, saves
    (``cap.save(path)``) and merges alike. Stays readable after the ``with`` block; holds neither the model nor
    (with ``detach=True``) any autograd graph.
    """

    def __init__(self, recording: Recording, *, source: str, hooks: _Hooks | None = None) -> None:
        super().__init__(recording, "outputs")
        self.outputs = Store(recording, "outputs")  # what cap[name] reads, as a store beside the other four
        self.inputs = Store(recording, "inputs")
        self.kwargs = Store(recording, "kwargs")
        self.grads = Store(recording, "grads")
        self.grad_inputs = Store(recording, "grad_inputs")
        # filled by backward passes inside a capture's block: param_grads[layer][param name]
        self.param_grads: dict[str, dict[str, torch.Tensor]] = recording.param_grads
        self.source = source  # "captured", "loaded from 'run.safetensors'", "merged from 3 captures"
        self._hooks = hooks

    @property
    def selected(self) -> list[str]:
        """The layer names the capture hooks, as the specs resolved: a shared module under each of its names, and
        also the layers that never ran."""
        return list(self._rec.selected_names)

    @property
    def copies(self) -> int:
        """How many stored tensors hookkit copied because an in-place op (``ReLU(inplace=True)``, ``+=``) was about
        to overwrite them (copy-on-write; 0 with ``clone=True``, which copies everything at hook time; 0 for a loaded
        or merged capture)."""
        return self._hooks.copies if self._hooks is not None else 0

    def remove(self) -> None:
        """Remove every hook that fills this capture (``with`` does this on exit); safe to call twice, and nothing
        to do for a loaded or merged capture."""
        if self._hooks is not None:
            self._hooks.remove()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write what this capture recorded to one ``.safetensors`` file, atomically; ``hookkit.load`` reads it back.

        Examples:
            >>> import os, tempfile, torch, torch.nn as nn, hookkit
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            >>> with hookkit.capture(model, ["1"]) as cap:
            ...     _ = model(torch.randn(2, 4))
            >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
            >>> cap.save(path)
            >>> torch.equal(hookkit.load(path)["1"], cap["1"])
            True

        Works inside the block too (what was recorded so far), and on loaded and merged captures. The file is
        written under a temporary name in the same folder, synced, then renamed over ``path``: a file already at
        ``path`` is replaced whole or left as it was, never half-written. Needs safetensors: ``pip install
        'hookkit[save]'``. The file format, and what is kept (nested structures, enum members, inputs, gradients,
        ``param_grads``), are described in ``hookkit.record.saved``.

        Raises:
            SavedCaptureError: the folder does not exist, ``path`` is a folder, a tensor cannot be saved (sparse,
                meta, a dtype safetensors lacks; the message names the layer), or the write failed (a file already
                at ``path`` is left as it was).
            ModifiedInPlaceError: a stored tensor was changed in place after capture.
            ArgumentTypeError: ``path`` is not a str or a path.
            ImportError: safetensors is not installed.
        """
        _check.path("Capture.save", "path", path)
        _saved.write(self._rec, path)

    def __repr__(self) -> str:
        state = self.source if self._hooks is None else "open" if self._hooks.active else "closed"
        return f"<hookkit.Capture ({state}) of {len(self)} layer(s) that ran: {', '.join(self.keys())}>"


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True,
         classes: Iterable[type] = ()) -> Capture:
    """Read a capture that ``Capture.save`` wrote: the same reading API, no model needed.

    Examples:
        >>> import os, tempfile, torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> with hookkit.capture(model, ["0", "1"], inputs=True) as cap:
        ...     _ = model(torch.randn(2, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
        >>> cap.save(path)
        >>> loaded = hookkit.load(path)
        >>> list(loaded), loaded["0"].shape, torch.equal(loaded.inputs["0"], cap.inputs["0"])
        (['0', '1'], torch.Size([2, 8]), True)

    Loading a file runs no code that the file names: it imports no module and calls no class's constructor. Nested
    values come back as their classes (namedtuples, dataclasses, dicts such as ``ModelOutput``, ``torch.return_types``)
    when the class is in ``classes`` or its module is already imported (in ``sys.modules``), and it is of the kind the
    file says (a namedtuple with those fields, a dataclass...); the instance is made without running the class's own
    ``__new__``, ``__init__`` or ``__setitem__``. Otherwise its values come back as plain tuples / lists / dicts, with a
    warning that names the class and why. An enum member comes back as the same member of its class, found the same way
    (else as a ``NotSaved`` placeholder, with the warning). Tensors come back contiguous (the strides of views are not
    kept), without autograd history; a tensor that was stored in several places comes back as one tensor in those
    places.

    Args:
        path: a file written by ``Capture.save`` (or a loaded or merged capture's ``save``).
        device: where to put the tensors (default ``"cpu"``; ``"meta"`` gives shapes and dtypes without values).
        verify: check each tensor's bytes against the SHA-256 the manifest holds (about 1.8 GB/s on one core), so
            a flipped bit in the data is an error rather than a wrong number. ``False`` skips it for a file you
            trust; the manifest's own checksum is always checked.
        classes: classes to rebuild even where their module is not imported (a class defined inside a function,
            too): ``load(path, classes=[MyOutput])``. Matched by module and qualified name.

    Returns:
        A ``Capture`` (the class ``capture()`` fills; without hooks): ``cap[name]``, ``cap.calls(name)``,
        ``list(cap)``, ``cap.inputs``, ``cap.kwargs``, ``cap.grads``, ``cap.grad_inputs``, ``cap.param_grads``.

    Raises:
        SavedCaptureError: no such file, not a safetensors file, truncated or corrupted (in its header, its manifest
            or a tensor's bytes), a manifest that is not what ``save`` writes (nested too deep, a node of the wrong
            type: the message says where), a safetensors file without a hookkit manifest, or one written by a newer
            hookkit; the message names the path (and the tensor). Nothing is built before the manifest is checked.
        ArgumentError: ``device`` is not a device, or not one this machine has.
        ArgumentTypeError: ``path``, ``device``, ``verify`` or ``classes`` is of a type ``load`` does not take.
        ImportError: safetensors is not installed (``pip install 'hookkit[save]'``).
    """
    rec, shown = _saved.read(path, device=device, verify=verify, classes=classes)
    return Capture(rec, source=f"loaded from {shown}")
