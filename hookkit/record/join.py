"""Joining recorded values: ``concat`` puts several values of one structure together tensor by tensor, along one
dimension. ``concat_calls`` (the calls of one layer) and ``hookkit.merge`` (captures of several batches, in
``record.merge``) both use it, with the one default ``DIM = 0``: the first dimension, as ``torch.cat``'s own default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hookkit._errors import ArgumentError
from hookkit.core import check as _check
from hookkit.core import tree as _tree

__all__ = ["DIM", "concat", "concat_calls"]

DIM = 0  # the default dimension of every join: the first one (the batch), as torch.cat


def concat(values: Sequence[Any], dim: int = DIM, *, caller: str, where: str) -> Any:
    """``values`` (at least one, of one nested structure) joined tensor by tensor along ``dim``; ``None`` and other
    non-tensors are taken from the first. ``caller`` and ``where`` (``"the calls in values="``) begin and place the
    messages of the ``ArgumentError`` raised when the values hold different numbers of tensors, when ``dim`` is not
    a dimension of a tensor, or when torch cannot concatenate them (other shapes)."""
    per_value = [_tree.leaves(v) for v in values]
    n = len(per_value[0])
    if any(len(p) != n for p in per_value):
        raise ArgumentError(f"{caller}: {where} hold different numbers of tensors, so they cannot be joined tensor "
                            "by tensor.")
    joined = []
    for i, tensors in enumerate(zip(*per_value, strict=True)):
        ndim = tensors[0].dim()
        if not -ndim <= dim < ndim:
            raise ArgumentError(f"{caller}: dim={dim} is not a dim of tensor {i} of {where}, a {ndim}-D tensor "
                                f"(shape {tuple(tensors[0].shape)}); give a dim from {-ndim} to {ndim - 1}.")
        try:
            joined.append(torch.cat(tensors, dim=dim))
        except (RuntimeError, IndexError) as exc:
            raise ArgumentError(f"{caller}: cannot concatenate tensor {i} of {where} along dim={dim}: {exc}") \
                from exc
    return _tree.fill(_tree.skeleton(values[0]), joined)


def concat_calls(values: list[Any], dim: int = DIM) -> Any:
    """Join the calls of one layer into one value, along ``dim`` (default 0, as ``torch.cat`` and ``hookkit.merge``).

    Examples:
        >>> import torch
        >>> steps = [torch.zeros(1, 5, 8), torch.ones(1, 1, 8), torch.ones(1, 1, 8)]  # prompt, then 2 tokens
        >>> concat_calls(steps, dim=1).shape
        torch.Size([1, 7, 8])

    The steps of ``model.generate()`` with a KV cache, where a block sees the prompt first and then one new token
    per call, join along the sequence dimension: ``concat_calls(cap.calls("transformer.h.0"), dim=1)``. Calls of a
    layer run once per batch join along the batch dimension, the default. Nested values (tuples, dicts,
    ModelOutput) are joined tensor by tensor; ``None`` and other non-tensors are taken from the first call.

    Raises:
        ArgumentError: no calls, calls whose structures differ, a ``dim`` the tensors lack, or shapes that do not
            fit together.
        ArgumentTypeError: ``values`` is not a list or tuple, or ``dim`` not an int.
    """
    _check.instance("hookkit.concat_calls", "values", values, (list, tuple), "a list of calls (cap.calls(name))")
    _check.whole("hookkit.concat_calls", "dim", dim)
    if not values:
        raise ArgumentError("hookkit.concat_calls: values= holds no call; did the layer run inside the capture block?")
    return concat(values, dim, caller="hookkit.concat_calls", where="the calls in values=")
