"""``Listener``: what an engine tells as its hooks run. ``trace``, ``check_finite`` (``debug/trace.py``), ``extract``
(``extraction/extract.py``) and ``monitor`` (``monitoring/monitor.py``) hand the engine (``core/engine.py``) a
subclass at construction and override the events they need; the others do nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from hookkit.core.calls import Where

__all__ = ["Listener"]


class Listener:
    """Told of every hook event as it happens; each method does nothing unless a subclass overrides it.

    ``where`` is ``(layer name, module or op site, index of this call among the module's calls in its forward)``.
    """

    __slots__ = ()

    def forward_pre(self, where: Where, args: tuple, kwargs: dict) -> None:
        """A selected module (or op node) is about to run with these arguments."""

    def forward(self, where: Where, args: tuple, output: Any) -> None:
        """It ran and returned ``output``."""

    def grad(self, where: Where, which: str, i: int, n: int, grad: torch.Tensor) -> None:
        """A gradient arrived: w.r.t. output ``i`` of ``n`` (``which="output"``) or input ``i`` (``"input"``)."""

    def param_grad(self, layer: str, pname: str, grad: torch.Tensor) -> None:
        """With ``param_grads``: parameter ``pname`` of layer ``layer`` has ``grad`` (its ``.grad`` itself, not a
        copy: read it here) at the end of a backward, after DDP's and FSDP's reductions; told under every name of
        the layer, once per backward."""
