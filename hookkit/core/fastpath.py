"""Storing a call's output, and the fast path: the one forward hook of the default capture (outputs only, no option,
no listener), which runs on every call of every selected module and so is kept to the least work.

``core/engine.py`` registers ``fast_hook`` where it can; otherwise its own forward hook finishes a call through the
same ``store_output`` (and then tells its listener, hooks gradients through ``core/gradtaps.py``, and stops).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn as nn

from hookkit.core.calls import Call
from hookkit.core.compat import current_graph_task_id
from hookkit.core.snapshot import Snapshotter

__all__ = ["store_output", "fast_hook", "NOT_WATCHED", "Forwards"]


class _NotWatched:
    """Stands for ``Watch.outputs`` where nothing is watched: calls are appended without a test."""

    __slots__ = ()

    def append(self, call: Call) -> None:
        pass


NOT_WATCHED: Any = _NotWatched()


def store_output(call: Call, output: Any, names: list[str], calls: list[Call], order: list[str], snap: Snapshotter,
                 watched: Any) -> None:
    """Store ``output`` in ``call`` through ``snap``, append the call to ``calls`` (the layer's names join ``order``
    at its first call), and hand a call holding tensors that were not copied to ``watched`` (copy-on-write)."""
    if type(output) is torch.Tensor and not snap.custom:  # the common case, without building a guard list
        t = output.detach() if output.requires_grad else output  # no graph, nothing to detach
        if t.is_inference():
            call.output = t.clone()  # keeps no version counter: copy
        else:
            call.output, call.version = t, t._version
            watched.append(call)
    else:
        call.output, call.guards = snap(output)
        if call.guards:
            watched.append(call)
    if not calls:
        order.extend(names)
    calls.append(call)


class Forwards(threading.local):
    """Which forward of the model the running code belongs to, per thread (DataParallel runs its replicas in
    threads): ``current`` while ``depth`` (open calls of the model) is above 0, else 0; the engine's hooks on the
    model keep it."""

    def __init__(self) -> None:
        self.depth = 0
        self.current = 0


def fast_hook(names: list[str], calls: list[Call], order: list[str], snap: Snapshotter, watched: Any, fw: Forwards,
              ids: Any) -> Any:
    """The forward hook of the default case: a ``Call`` numbered with its forward, stored by ``store_output``."""

    def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if current_graph_task_id() != -1:
            return  # activation checkpointing recomputing a forward: not a new call
        store_output(Call(None, None, fw.current or next(ids)), output, names, calls, order, snap, watched)

    return forward_hook
