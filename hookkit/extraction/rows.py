"""From a layer's output to rows, at hook time: which tensor (``selector``, ``first_tensor``), the batch's mask of valid
tokens (``batch_mask``), and the pooling (``masked`` over the valid tokens, ``pooled`` without a mask). Pure functions
of tensors, used by ``extraction.extract``'s listener for every selected layer of every batch; ``Tokens`` are a ragged
layer's rows (the valid tokens, flat, and each sample's count) before they reach the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from hookkit._errors import ExtractError
from hookkit.core import tree as _tree
from hookkit.extraction.options import Mask, Pool, Select
from hookkit.extraction.shards import Batch

__all__ = ["Tokens", "batch_mask", "masked", "pooled", "selector", "first_tensor"]


class Tokens(NamedTuple):
    """A ragged layer's rows of one batch, where the model made them: the valid tokens, flat, and how many each
    sample has."""

    flat: torch.Tensor
    counts: torch.Tensor


def batch_mask(option: Mask, batch: Batch, device: torch.device) -> torch.Tensor | None:
    """The batch's [N, T] mask of valid tokens (bool, on ``device``), as ``mask=`` says; None for no mask."""
    if option is False:
        return None
    where = f"mask={option!r}"
    if option is None:
        mask = batch.kwargs.get("attention_mask")
        if mask is None:
            return None
        where = "its 'attention_mask'"
    elif isinstance(option, str):
        if not isinstance(batch.raw, Mapping):
            raise ExtractError(f"mask={option!r} is a key of dict batches, but batch {batch.index} is a "
                               f"{type(batch.raw).__name__}: pass a callable that returns its [N, T] mask.")
        if option not in batch.kwargs:
            raise ExtractError(f"mask={option!r}: batch {batch.index} has no such key (it has "
                               f"{', '.join(map(repr, batch.kwargs))}); name the key of its [N, T] mask.")
        mask = batch.kwargs[option]
    else:
        mask = option(batch.raw)  # type: ignore[operator]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch.n:
        found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ExtractError(f"the mask of batch {batch.index} ({where}) is {found}; expected [N, T] with N = "
                           f"{batch.n} samples (nonzero = a valid token). Pass mask= a key or a callable that gives "
                           "one, or mask=False to use every token.")
    return (mask != 0).to(device, non_blocking=True)


def masked(t: torch.Tensor, pool: Pool, mask: torch.Tensor | None, layer: str,
            no_valid_token: Callable[[str], None]) -> torch.Tensor | Tokens | None:
    """``pool`` over the valid tokens of ``t`` when the mask applies (``t`` is [N, T, ...] with the mask's [N, T]),
    else None (pooled as if there were no mask). ``"avg"`` and ``"max"`` first call ``no_valid_token(layer)``, which
    refuses a sample whose mask is all zeros."""
    if mask is None or not (pool is None or pool == "avg" or pool == "max"):
        return None
    if t.dim() < 2 or t.shape[:2] != mask.shape:
        if t.dim() == 3 and pool is not None:
            raise ExtractError(
                f"{layer!r} gives tokens {tuple(t.shape)}, but the batch's mask is {tuple(mask.shape)}: pool={pool!r} "
                "cannot tell its padding. Pass mask= a callable that gives this layer's [N, T] mask, or mask=False "
                "to pool over every token.")
        return None
    if pool is None:
        return Tokens(t[mask], mask.sum(dim=1))  # a sample without valid tokens has none: well defined
    no_valid_token(layer)
    if pool == "avg":  # sentence-transformers' mean pooling, op for op
        expanded = mask.view(*mask.shape, *(1,) * (t.dim() - 2)).expand(t.shape).to(t.dtype)
        return torch.sum(t * expanded, 1) / torch.clamp(expanded.sum(1), min=1e-9)
    lowest = torch.finfo(t.dtype).min if t.is_floating_point() else torch.iinfo(t.dtype).min
    return t.masked_fill(~mask.view(*mask.shape, *(1,) * (t.dim() - 2)), lowest).amax(dim=1)


def pooled(t: torch.Tensor, pool: Pool, layer: str) -> torch.Tensor:
    if pool is None:
        return t
    if callable(pool):
        return pool(t)
    if pool == "flatten":
        return t.reshape(t.shape[0], -1)
    if t.dim() <= 2:
        if pool == "cls":
            raise ExtractError(f"pool='cls' needs token outputs [N, T, D]; {layer!r} gives {tuple(t.shape)}.")
        return t
    if pool == "cls":
        if t.dim() != 3:
            raise ExtractError(f"pool='cls' needs token outputs [N, T, D]; {layer!r} gives {tuple(t.shape)}.")
        return t[:, 0]
    # [N, T, D] tokens: reduce T; [N, C, *spatial]: reduce the spatial dims.
    dims = (1,) if t.dim() == 3 else tuple(range(2, t.dim()))
    return t.mean(dim=dims) if pool == "avg" else t.amax(dim=dims)


def selector(select: Select, layer: str) -> Callable[[Any], Any]:
    choice = select.get(layer) if isinstance(select, Mapping) else select
    if choice is None:
        return lambda out: out
    if callable(choice):
        return choice

    def pick(out: Any) -> Any:
        try:
            return out[choice]
        except (KeyError, IndexError, TypeError):
            if isinstance(choice, str) and hasattr(out, choice):
                return getattr(out, choice)
            raise ExtractError(f"select={choice!r} does not pick anything from {layer!r}'s output, a "
                               f"{type(out).__name__}.") from None
    return pick


def first_tensor(value: Any, layer: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    found = _tree.leaves(value)
    if not found:
        raise ExtractError(f"{layer!r} produced no tensor ({type(value).__name__}); pick one with select=.")
    return found[0]
