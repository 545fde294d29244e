"""``length_batches``: a fixed batch sampler that puts samples of similar length together, so that padded batches
of text (or any sequences) waste few slots.

A user hands it to ``DataLoader(dataset, batch_sampler=..., collate_fn=...)``; ``hookkit.extract`` reads that
DataLoader's batch sampler (``hookkit.extraction.shards``) and writes each row at the sample index the sampler gave,
so rows stay in dataset order. ``hookkit extract --text`` (``hookkit.cli.extract``) builds one from the documents'
token counts. The argument checks are ``hookkit.core.check``'s, with the lengths' own below.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from hookkit._errors import ArgumentError, ArgumentTypeError
from hookkit.core import check as _check

__all__ = ["LengthBatches", "length_batches"]

_WHERE = "hookkit.length_batches"


class LengthBatches(Sampler[list[int]]):
    """Lists of sample indices, grouped by length, the same lists on every pass: what ``length_batches`` returns (see
    there); a ``batch_sampler`` for a ``torch.utils.data.DataLoader``."""

    def __init__(self, lengths: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int | None = None, *,
                 max_tokens: int | None = None) -> None:
        super().__init__()
        _check.whole(_WHERE, "batch_size", batch_size, minimum=1, none=True, meaning=" (samples per batch)")
        _check.whole(_WHERE, "max_tokens", max_tokens, minimum=1, none=True,
                     meaning=" (padded token slots per batch: samples x the longest length)")
        if batch_size is None and max_tokens is None:
            raise ArgumentError(f"{_WHERE}: give batch_size= (samples per batch), max_tokens= (padded token slots "
                                "per batch), or both; neither was given.")
        sizes = _lengths(lengths)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.lengths = sizes
        order = np.argsort(-sizes, kind="stable")  # longest first; equal lengths in index order
        bounds = [0]
        while bounds[-1] < len(order):
            start = bounds[-1]
            n = len(order) - start if batch_size is None else batch_size
            if max_tokens is not None:  # the batch's first sample is its longest: it sets the padded width
                n = min(n, max(1, max_tokens // max(int(sizes[order[start]]), 1)))
            bounds.append(min(start + n, len(order)))
        for a, b in zip(bounds, bounds[1:], strict=False):
            order[a:b].sort()  # each batch lists its indices in increasing order
        self._order, self._bounds = order, bounds

    def __iter__(self) -> Iterator[list[int]]:
        for a, b in zip(self._bounds, self._bounds[1:], strict=False):
            yield self._order[a:b].tolist()

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __repr__(self) -> str:
        limits = ", ".join(f"{k}={v}" for k, v in (("batch_size", self.batch_size), ("max_tokens", self.max_tokens))
                           if v is not None)
        return f"LengthBatches({len(self.lengths)} samples in {len(self)} batches, {limits}, longest first)"


def length_batches(lengths: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int | None = None, *,
                   max_tokens: int | None = None) -> LengthBatches:
    """A batch sampler that groups samples of similar length, so that padding each batch to its longest sample
    wastes few slots; the same batches on every pass, so ``hookkit.extract`` still writes row i for sample i.

        >>> batches = length_batches([5, 1, 9, 2, 8, 1], 2)
        >>> list(batches)
        [[2, 4], [0, 3], [1, 5]]
        >>> list(length_batches([5, 1, 9, 2, 8, 1], max_tokens=16))  # 2 x 9 > 16: the longest goes alone
        [[2], [0, 4], [1, 3, 5]]

    Use it as ``DataLoader(dataset, batch_sampler=length_batches(lengths, 32), collate_fn=...)``. Samples are
    sorted by length, longest first (ties in index order), and cut into batches in that order, so the batch of the
    longest samples comes first: one that does not fit in memory fails at once, not at the end of a run (as
    sentence-transformers does). Each batch lists its indices in increasing order; every index from 0 to
    ``len(lengths) - 1`` is in exactly one batch.

    Args:
        lengths: each sample's length (e.g. its number of tokens): a sequence of ints, a 1-D integer numpy array
            or tensor, one per sample of the dataset.
        batch_size: at most this many samples per batch. None: only ``max_tokens`` limits a batch.
        max_tokens: at most this many padded slots per batch, counted as the number of samples times the longest
            length in the batch (what a padded ``[N, T]`` batch holds; a length of 0 counts as 1). A sample longer
            than ``max_tokens`` gets a batch of its own, of its own length. With both limits, a batch keeps both.

    Returns:
        A ``LengthBatches`` (a ``torch.utils.data.Sampler`` of index lists, with ``len()`` its number of batches).

    Raises:
        ArgumentTypeError: ``lengths`` is not a sequence of ints (floats, bools, strings, a float array or tensor);
            ``batch_size`` or ``max_tokens`` is not an int.
        ArgumentError: ``lengths`` is empty, not 1-D or holds a negative length; ``batch_size`` or ``max_tokens``
            is below 1; neither is given.
    """
    return LengthBatches(lengths, batch_size, max_tokens=max_tokens)


def _lengths(lengths: Any) -> np.ndarray:
    """``lengths`` as a 1-D int64 array, refused with the reason and the fix where it cannot be one."""
    fix = "; pass one whole number (e.g. a token count) per sample, as a list, a numpy array or a 1-D tensor"
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    if isinstance(lengths, np.ndarray):
        if lengths.dtype.kind not in "iu":
            raise ArgumentTypeError(f"{_WHERE}: lengths= holds {lengths.dtype} values, not integers{fix} (e.g. "
                                    "lengths.astype(int) once they are whole numbers).")
        array = lengths
    elif isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise ArgumentTypeError(f"{_WHERE}: lengths= takes a sequence of ints, got {_check.shown(lengths)}{fix}.")
    else:
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise ArgumentTypeError(f"{_WHERE}: lengths[{i}] is {_check.shown(n)}, not an int{fix}.")
        array = np.array([int(n) for n in lengths], dtype=object)
    if array.ndim != 1:
        raise ArgumentError(f"{_WHERE}: lengths= has shape {tuple(array.shape)}, not one length per sample{fix}.")
    if len(array) == 0:
        raise ArgumentError(f"{_WHERE}: lengths= is empty: there are no samples to batch{fix}.")
    negative = np.flatnonzero(array < 0)
    if len(negative):
        i = int(negative[0])
        raise ArgumentError(f"{_WHERE}: lengths[{i}] is {array[i]}, a negative length{fix}.")
    if array.max() > np.iinfo(np.int64).max:
        raise ArgumentError(f"{_WHERE}: lengths= holds {array.max()}, over the int64 range{fix}.")
    return array.astype(np.int64)
