"""What the progress files of an extraction folder record as done, read the way hookkit reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hookkit.extraction.manifest import all_progress, read_done


def done_mask(out: Path, rank: int | None = None) -> np.ndarray:
    """The rows marked done by rank ``rank`` (every rank's when None)."""
    if rank is not None:
        return read_done(out / "progress" / f"rank-{rank}.rows")
    return all_progress(out)[0]


def done_ranges(out: Path, rank: int | None = None) -> list[list[int]]:
    """The done rows as sorted ``[start, stop)`` ranges."""
    mask = np.concatenate([[False], done_mask(out, rank), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(mask))
    return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2], strict=True)]
