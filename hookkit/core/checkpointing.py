"""Which call is this, under activation checkpointing: one module that every part of hookkit asks.

``torch.utils.checkpoint`` runs a region's forward again during backward, and torch calls its modules' hooks again.
Two questions follow, both answered here from what ``core.compat`` reads of torch:

- ``recomputing()``: is the forward running now a recomputation? The engine (``core/engine.py``, ``core/fastpath.py``)
  and the op taps (``core/ops.py``) ask it at every hook and skip a recomputation: it is not a new call, and what
  it computes was recorded the first time. It is one C call (autograd's graph-task id: -1 outside backward).
- ``CallNumbers``: which call does it repeat? Edits (``intervene/edits.py``) must give a recomputed call the same
  edit as the call it repeats, else the gradients belong to another output than the forward's. That needs the
  region itself, in both runs: ``core.compat.checkpoint_regions`` finds it by walking the stack, which costs more
  than a hook of the engine may, so only edits pay it. A call whose region is recomputing is a repetition here.
  ``inside_checkpoint()`` answers whether any region is running (``intervene/hooks.py`` refuses an op node's edit
  there).

The two tests agree on every checkpointed forward (its recomputation runs inside backward, with its region on the
stack); they differ only for a forward that a backward runs outside any region (a module called from a custom
``autograd.Function.backward``), which the engine skips and an edit numbers as a new call.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from hookkit.core.compat import checkpoint_regions, current_graph_task_id

__all__ = ["recomputing", "CallNumbers", "inside_checkpoint"]


def recomputing() -> bool:
    """Whether a forward running now runs inside a backward pass: activation checkpointing recomputing it, which is
    not a new call. (``core.fastpath.fast_hook`` inlines this test: it runs on every call.)"""
    return current_graph_task_id() != -1


def inside_checkpoint() -> bool:
    """Whether a region of ``torch.utils.checkpoint`` whose recomputation would miss an edit made now is running:
    with grad enabled (a backward may follow), or a ``use_reentrant=True`` region (its first run is always without
    grad, whatever its caller had)."""
    regions = checkpoint_regions()
    return bool(regions) and (torch.is_grad_enabled() or any(reentrant for _, _, reentrant in regions))


class CallNumbers:
    """Numbers one layer's forward calls since the block began, as the user's forwards made them; a call that
    ``torch.utils.checkpoint`` makes again while backward recomputes a region gets the number of the call it
    repeats (``core.compat.checkpoint_regions`` names the region in both runs, and a recomputation replays the
    region's calls in their order), or None where the region ran before the block (nothing to repeat)."""

    def __init__(self) -> None:
        self.count = 0
        # region -> the numbers of the calls made inside it; region -> {graph task: calls replayed so far}. Weak:
        # a region lives as long as the autograd graph that can recompute it.
        self._made: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()
        self._replayed: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()

    def next(self) -> tuple[int | None, bool]:
        """``(number of this call, whether it is a recomputation)``."""
        regions = checkpoint_regions()
        again = next((i for i, (recomputing, _, _) in enumerate(regions) if recomputing), None)
        call: int | None
        if again is None:
            call = self.count
            self.count += 1
            inside = regions
        else:
            region = regions[again][1]
            sessions = self._replayed.setdefault(region, {})
            task = current_graph_task_id()
            k = sessions.get(task, 0)
            sessions[task] = k + 1
            made = self._made.get(region, ())
            call = made[k] if k < len(made) else None
            inside = regions[:again]  # regions entered again inside the recomputation (nested checkpoints)
        if call is not None:
            for _, region, _ in inside:
                self._made.setdefault(region, []).append(call)
        return call, again is not None
