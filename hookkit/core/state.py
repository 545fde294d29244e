"""The model's own state that a forward hookkit runs for the user must leave as it was: each module's ``training``
flag (a BatchNorm frozen in eval inside a training model stays in eval) and every buffer (a train-mode BatchNorm
updates its running statistics even under ``no_grad``).

``layer_names(model, x)`` (``core.ops.discover``) and ``summary`` run the model once: ``saved = save(model)`` before,
``restore(saved)`` in ``finally``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hookkit.core.compat import buffers_of

__all__ = ["Saved", "save", "restore"]

_Buffer = tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]


class Saved:
    """Each module's own ``training`` flag, and each buffer with a copy."""

    __slots__ = ("modes", "buffers")

    def __init__(self, modes: list[tuple[nn.Module, bool]], buffers: list[_Buffer]) -> None:
        self.modes = modes
        self.buffers = buffers


def save(model: nn.Module) -> Saved:
    """The flags and buffers of ``model`` and every submodule, to ``restore`` after a forward.

    Every buffer is copied: version counters cannot tell whether it changed, since batch norm updates its running
    statistics inside the kernel without bumping them.
    """
    modes = [(m, m.training) for m in model.modules()]  # not model.train(mode): that sets one flag everywhere
    buffers = []
    with torch.no_grad():
        for module in model.modules():
            for name, buf in buffers_of(module).items():
                if buf is None or nn.parameter.is_lazy(buf):
                    continue
                # An inference tensor cannot change in place outside inference mode: only its slot can change.
                buffers.append((module, name, buf, None if buf.is_inference() else buf.clone()))
    return Saved(modes, buffers)


def restore(saved: Saved) -> None:
    """Put back what ``save`` kept: each module's flag, each buffer object in its slot, and its values."""
    for module, mode in saved.modes:
        module.training = mode
    with torch.no_grad():
        for module, name, buf, copy in saved.buffers:
            own = buffers_of(module)
            if own.get(name) is not buf:
                own[name] = buf
            if copy is not None:
                buf.copy_(copy)
