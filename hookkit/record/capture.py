"""``capture()``: record what modules produced (and took in, and got as gradients), keyed by name.

``capture()`` returns a ``CaptureBlock``, the ``with`` block: it owns a hook engine (``core.engine.Engine``) for the
time the block is open and fills a ``Capture`` (``record.recording``), the one result type, which its ``__enter__``
returns. The capture stays readable after the block; the block's hooks are gone.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from hookkit.core import check as _check
from hookkit.core.engine import Engine
from hookkit.core.select import Layers, select
from hookkit.core.snapshot import To
from hookkit.record.recording import Capture, Store

__all__ = ["capture", "CaptureBlock", "Capture", "Store"]  # Capture and Store re-exported for older imports


class CaptureBlock:
    """The ``with`` block of ``capture()``: registers the hooks on entry, removes them (in ``finally``) on exit, and
    fills the ``Capture`` that ``__enter__`` returns (``capture``). Entered once.

    The block reads as its capture (``block[name]``, ``block.calls(name)``, ``block.inputs``, ``block.save(path)``
    ...: every attribute of ``Capture``), so ``block = hookkit.capture(...)``, ``with block: ...``, then
    ``block[name]`` works as ``with ... as cap`` does. ``selected`` is known before the block runs.
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
        # the capture holds the engine, not this block: no reference cycle, so a finished block is freed at once
        self.capture = Capture(self._engine.recording, source="captured", hooks=self._engine)

    def __enter__(self) -> Capture:
        self._engine.__enter__()
        return self.capture

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        swallowed = self._engine.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._engine.warn_if_compiled_code_skipped_hooks("hookkit.capture")
        return swallowed

    @property
    def active(self) -> bool:
        """Whether the hooks are in place (inside the ``with`` block)."""
        return self._engine.active

    # -- the block reads as its capture (copies, remove(), save(), ...) ------------------------------------------
    def __getattr__(self, name: str) -> Any:  # only reached for what the block itself lacks
        if name.startswith("__") or name in ("_engine", "capture"):
            raise AttributeError(name)
        return getattr(self.capture, name)

    def __getitem__(self, name: str) -> Any:
        return self.capture[name]

    def __contains__(self, name: object) -> bool:
        return name in self.capture

    def __iter__(self) -> Any:
        return iter(self.capture)

    def __len__(self) -> int:
        return len(self.capture)

    def __repr__(self) -> str:
        state = "open" if self._engine.active else "closed"
        return f"<hookkit.CaptureBlock ({state}) filling {self.capture!r}>"


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
) -> CaptureBlock:
    """Record what the selected layers produce while the ``with`` block is open; remove every hook on exit.

    Examples:
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
        A ``CaptureBlock``: its ``with`` gives the ``Capture`` it fills, which reads ``cap[name]`` (the value of the
        node FX names ``name``, in the last forward of the model: a module's last call, or its first in the last forward
        when it runs several times in one forward, where ``name_1`` is its second), ``cap.calls(name)`` (every call),
        ``list(cap)`` (layers that ran, in order of first call), and the stores ``cap.inputs``, ``cap.kwargs``,
        ``cap.grads``, ``cap.grad_inputs`` (read the same way). The block reads as that capture too (``block =
        capture(...)``; ``with block: ...``; ``block[name]``), and ``block.remove()`` removes its hooks without a
        ``with``.

    Raises:
        LayerNotFoundError: a spec matched no module (before any hook is registered).
        ArgumentError: ``layers=None``.
        ArgumentTypeError: ``model`` is not an ``nn.Module``, or an option is of the wrong type.
        UnsupportedModelError: TorchScript or compiled modules, whose hooks torch would not run.
    """
    return CaptureBlock(model, layers, inputs=inputs, grads=grads, detach=detach, clone=clone, to=to, stop=stop,
                   param_grads=param_grads)
