"""Where ``extract()`` puts its rows: one interface (``RowStore``), two stores, and ``Features``, what both hand back.

``extraction.extract.extract()`` opens one store per call (``MemoryRows(names)`` here without ``out``,
``extraction.npyfolder.NpyFolder`` with it) and uses it as a context manager: ``resume()`` (a finished folder's
``Features``, else None), ``done_rows()`` (the mask of rows already written, handed to the share of
``extraction.shards``), ``first_sample()`` (the data check), then ``write(at, rows, batch=)`` for every batch this rank
computes (``at``: the row of each of its samples), and ``finish(batches, rows)``, which returns the ``Features``.
``RowShapes`` and ``layout_mismatch`` refuse rows whose shape changes from batch to batch, for both stores.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hookkit._errors import ArgumentError, ArgumentTypeError, ExtractError, NotRecordedError, SampleIndexError
from hookkit.extraction.tokens import TokenRows

__all__ = ["Features", "RowStore", "MemoryRows", "TokenRows", "Rows", "RowShapes", "row_layout", "layout_mismatch"]

Rows = np.ndarray | TokenRows  # a batch's rows of one layer: one per sample, or ragged tokens


class Features(Mapping[str, np.ndarray]):
    """What ``extract()`` returns: ``feats[layer]`` is an N-row array in dataset order (a read-only memmap of
    the layer's file when ``out`` was given; ``feats.path(layer)`` names it). A ragged layer (token outputs of
    masked batches, ``pool=None``) holds every sample's valid tokens, flat: ``feats[layer]`` is [total tokens, ...],
    ``feats.offsets(layer)`` the N + 1 offsets, ``feats.tokens(layer, i)`` sample i's tokens."""

    def __init__(self, arrays: dict[str, np.ndarray], out: Path | None, manifest: dict[str, Any] | None,
                 offsets: dict[str, np.ndarray] | None = None) -> None:
        self._arrays = arrays
        self._offsets = offsets or {}
        self.out = out
        self.manifest = manifest

    def __getitem__(self, layer: str) -> np.ndarray:
        if not isinstance(layer, str):
            raise ArgumentTypeError(f"layer names are strings, got {type(layer).__name__} {layer!r}.")
        try:
            return self._arrays[layer]
        except KeyError:
            raise NotRecordedError(f"{layer!r} was not extracted; layers: {', '.join(self._arrays)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def offsets(self, layer: str) -> np.ndarray:
        """A ragged layer's N + 1 offsets (int64): sample i's tokens are ``feats[layer][offsets[i]:offsets[i + 1]]``
        (on disk: ``<layer>.offsets.npy`` beside ``<layer>.npy``)."""
        self[layer]  # a clear KeyError for a layer that was not extracted
        if layer not in self._offsets:
            raise ArgumentError(f"{layer!r} has one row per sample, not ragged tokens: feats[{layer!r}][i] is sample "
                                "i's row.")
        return self._offsets[layer]

    def tokens(self, layer: str, i: int) -> np.ndarray:
        """Sample ``i``'s valid tokens of a ragged layer, [T_i, ...]."""
        offsets = self.offsets(layer)
        n = len(offsets) - 1
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ArgumentTypeError(f"Features.tokens: i= takes a sample index (int), got {type(i).__name__} {i!r}.")
        if not -n <= i < n:
            raise SampleIndexError(f"sample {i!r} of {layer!r}: there are {n} samples (0 to {n - 1}).")
        i = int(i) % n
        return self._arrays[layer][int(offsets[i]):int(offsets[i + 1])]

    def path(self, layer: str) -> Path:
        """The ``.npy`` file of ``layer`` (its name, or a cleaned name with a hash when the layer name is not a
        plain file name, e.g. holds ``/``)."""
        if self.out is None or self.manifest is None:
            raise ArgumentError("these features are in memory: extract(..., out=DIR) writes files.")
        self[layer]  # a clear KeyError for a layer that was not extracted
        return self.out / self.manifest["files"][layer]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape} {v.dtype}" + (f" tokens of {len(self._offsets[k]) - 1} samples"
                                                          if k in self._offsets else "")
                           for k, v in self._arrays.items())
        return f"<hookkit.Features {shapes}{f' in {self.out}' if self.out else ''}>"


# -- the interface ----------------------------------------------------------------------------------------------------

def row_layout(rows: Rows) -> tuple[list[int], bool]:
    """(the shape of one row, or of one token of a ragged layer; whether it is ragged)."""
    if isinstance(rows, TokenRows):
        return list(rows.flat.shape[1:]), True
    return list(rows.shape[1:]), False


def layout_mismatch(name: str, batch: int, got: tuple[list[int], bool], where: str,
                    before: tuple[list[int], bool]) -> ExtractError:
    """The error for rows that cannot go into the file ``where`` started with ``before``'s layout."""
    (shape, ragged), (shape0, ragged0) = got, before
    if ragged != ragged0:
        kinds = ("the valid tokens of each sample (a mask applied)", "one row per sample (no mask)")
        return ExtractError(
            f"{name!r}: batch {batch} gave {kinds[not ragged]}, but {where} gave {kinds[not ragged0]}. Give every "
            "batch the same mask (an attention_mask in each dict batch, or mask=), or pass mask=False.")
    what = "tokens" if ragged else "rows"
    return ExtractError(
        f"{name!r}: batch {batch} gave {what} of shape {tuple(shape)}, but {where} gave {tuple(shape0)}, and a .npy "
        "file holds rows of one shape. Reduce them to a fixed size with pool= (e.g. pool='avg'); for the token "
        "outputs of padded batches, give each batch an attention_mask (or pass mask=) to store only the valid "
        "tokens; or feed inputs of one size.")


class RowShapes:
    """Each layer's row shape and kind (ragged or not), as first seen (and where): rows of another layout are
    refused before any is written."""

    def __init__(self, known: dict[str, tuple[tuple[list[int], bool], str]]) -> None:
        self.known = known

    def check(self, rows: dict[str, Rows], batch: int) -> None:
        for name, arr in rows.items():
            got = row_layout(arr)
            before, where = self.known.setdefault(name, (got, f"batch {batch}"))
            if got != before:
                raise layout_mismatch(name, batch, got, where, before)

    def recorded(self) -> dict[str, list[int]]:
        return {k: s for k, ((s, _), _) in self.known.items()}

    def ragged(self) -> list[str]:
        return [k for k, ((_, r), _) in self.known.items() if r]


class RowStore:
    """Rows of every layer by their place in the dataset. Used as ``with store:``; ``close()`` (also on error)
    keeps what was written."""

    background = False  # whether extract() should write from a background thread (worth it for disk writes)

    def resume(self) -> Features | None:
        """Check what the store already holds against this call: the ``Features`` of a finished run, else None."""
        return None

    def done_rows(self) -> np.ndarray:
        """The rows already written by any rank (a boolean mask; rows past its end are not): not computed again."""
        return np.zeros(0, dtype=bool)

    def first_sample(self, args: tuple, kwargs: dict, n: int, valid: Any = None, *, at: int = 0) -> None:
        """The batch holding row 0 (as model input, ``n`` samples, row 0's at position ``at``; ``valid``: its
        [N, T] mask of valid tokens, if any), seen before any row is written."""

    def write(self, at: np.ndarray, rows: dict[str, Rows], *, batch: int) -> None:
        """Each layer's rows of batch number ``batch``: sample j's at row ``at[j]`` (int64, any order). Called from
        one thread at a time (``extraction.writer.Background``'s), after ``first_sample``."""
        raise NotImplementedError

    def finish(self, batches: int, rows: int) -> Features:
        """Every rank is done and the data held ``batches`` batches and ``rows`` rows: the features."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MemoryRows(RowStore):
    """In memory, one process: each layer's batches of rows as they come, put in row order at the end."""

    def __init__(self, names: list[str]) -> None:
        self.arrays: dict[str, list[tuple[np.ndarray, Rows]]] = {n: [] for n in names}
        self.shapes = RowShapes({})

    def write(self, at: np.ndarray, rows: dict[str, Rows], *, batch: int) -> None:
        self.shapes.check(rows, batch)
        for name, arr in rows.items():
            self.arrays[name].append((at, arr))

    def finish(self, batches: int, rows: int) -> Features:
        arrays, offsets = {}, {}
        for name, parts in self.arrays.items():
            at = [a for a, _ in parts]
            tokens = [p for _, p in parts if isinstance(p, TokenRows)]
            if tokens:
                arrays[name], offsets[name] = _placed_tokens(at, tokens, rows)
            else:
                arrays[name] = _placed_rows(at, [p for _, p in parts if isinstance(p, np.ndarray)], rows)
        return Features(arrays, None, None, offsets)


def _in_order(at: list[np.ndarray], rows: int) -> bool:
    """Whether the batches' rows are 0..rows-1 in the order written (the data's own order)."""
    if not at:
        return rows == 0
    joined = np.concatenate(at)
    return len(joined) == rows and bool((joined == np.arange(rows)).all())


def _placed_rows(at: list[np.ndarray], parts: list[np.ndarray], rows: int) -> np.ndarray:
    """The batches' rows, row ``at[k][j]`` from ``parts[k][j]``."""
    if _in_order(at, rows):
        return np.concatenate(parts)
    out = np.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for where, part in zip(at, parts, strict=True):
        out[where] = part
    return out


def _placed_tokens(at: list[np.ndarray], parts: list[TokenRows], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A ragged layer's tokens in row order, and its ``rows + 1`` offsets."""
    counts = np.zeros(rows, dtype=np.int64)
    for where, part in zip(at, parts, strict=True):
        counts[where] = part.counts
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if _in_order(at, rows):
        return np.concatenate([p.flat for p in parts]), offsets
    flat = np.empty((int(offsets[-1]), *parts[0].flat.shape[1:]), dtype=parts[0].flat.dtype)
    for where, part in zip(at, parts, strict=True):
        part_counts = part.counts.astype(np.int64)
        starts_here = np.cumsum(part_counts) - part_counts  # where each sample's tokens start in the batch
        shift = np.repeat(offsets[where] - starts_here, part_counts)
        flat[np.arange(len(part.flat)) + shift] = part.flat
    return flat, offsets
