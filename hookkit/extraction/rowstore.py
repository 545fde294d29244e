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
from torch import Tensor

from hookkit._errors import ArgumentError, ArgumentTypeError, ExtractError, NotRecordedError, SampleIndexError
from hookkit.extraction.dtypes import BFLOAT16, as_tensor
from hookkit.extraction.loader import RowLoader, row_loader
from hookkit.extraction.tokens import TokenRows

__all__ = ["Features", "RowStore", "MemoryRows", "TokenRows", "Rows", "RowShapes", "row_layout", "layout_mismatch"]

Rows = np.ndarray | TokenRows  # a batch's rows of one layer: one per sample, or ragged tokens


class Features(Mapping[str, np.ndarray]):
    """What ``extract()`` (and ``load_features``) return: ``feats[layer]`` is an N-row array in dataset order (a
    read-only memmap of the layer's file when ``out`` was given; ``feats.path(layer)`` names it), ``feats.torch(layer)``
    the same rows as a torch tensor (without copying the file into memory). A ragged layer (token outputs of masked
    batches, ``pool=None``) holds every sample's valid tokens, flat: ``feats[layer]`` is [total tokens, ...],
    ``feats.offsets(layer)`` the N + 1 offsets, ``feats.tokens(layer, i)`` sample i's tokens.

    A bfloat16 layer (``extract(..., dtype=torch.bfloat16)``) has no numpy type: ``feats[layer]`` raises an
    ``ArgumentError`` (so do ``feats.values()`` and ``feats.items()``) instead of handing out its raw bits as if
    they were numbers; ``feats.torch(layer)`` gives its values, ``feats.tokens(layer, i)`` a bfloat16 tensor, and
    ``numpy.load(feats.path(layer))`` the raw bits (uint16). ``len``, iteration, ``in``, ``path`` and ``offsets``
    work for every layer."""

    def __init__(self, arrays: dict[str, np.ndarray], out: Path | None, manifest: dict[str, Any] | None,
                 offsets: dict[str, np.ndarray] | None = None, torch_dtypes: Mapping[str, str] | None = None) -> None:
        self._arrays = arrays
        self._offsets = offsets or {}
        self.out = out
        self.manifest = manifest
        # torch's name of each layer's stored dtype where numpy has none (bfloat16, held as uint16)
        known = torch_dtypes if torch_dtypes is not None else (manifest or {}).get("torch_dtypes", {})
        self._bfloat16 = {n for n, d in known.items() if d == BFLOAT16 and n in arrays}
        self._tensors: dict[str, Tensor] = {}  # bfloat16 layers' tensors, for tokens()

    def __getitem__(self, layer: str) -> np.ndarray:
        self._check(layer)
        if layer in self._bfloat16:
            bits = (f"numpy.load(feats.path({layer!r})) its raw bits (uint16)" if self.out is not None
                    else f"feats.torch({layer!r}).view(torch.int16).numpy() its raw bits")
            raise ArgumentError(f"{layer!r} is stored in bfloat16, which numpy has no type for: feats.torch({layer!r}) "
                                f"gives its values (a torch.bfloat16 tensor), {bits}.")
        return self._arrays[layer]

    def _check(self, layer: Any) -> None:
        """A clear error for a layer that was not extracted."""
        if not isinstance(layer, str):
            raise ArgumentTypeError(f"layer names are strings, got {type(layer).__name__} {layer!r}.")
        if layer not in self._arrays:
            raise NotRecordedError(f"{layer!r} was not extracted; layers: {', '.join(self._arrays)}")

    def __contains__(self, layer: object) -> bool:
        return layer in self._arrays

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def torch(self, layer: str) -> Tensor:
        """``layer``'s rows (a ragged layer's flat tokens) as a torch tensor in their stored dtype (bfloat16 for a
        bfloat16 layer), without copying: with ``out``, a copy-on-write memory map of the file (pages are read as
        they are used; writing into the tensor changes this tensor only, never the file); in memory, a view of the
        held array (writing into it changes ``feats[layer]`` too)."""
        self._check(layer)
        # mmap_mode="c": a private, writable map (torch.from_numpy warns about a read-only array)
        array = self._arrays[layer] if self.out is None else np.load(self.path(layer), mmap_mode="c")
        return as_tensor(array, BFLOAT16 if layer in self._bfloat16 else None)

    def offsets(self, layer: str) -> np.ndarray:
        """A ragged layer's N + 1 offsets (int64): sample i's tokens are ``feats[layer][offsets[i]:offsets[i + 1]]``
        (on disk: ``<layer>.offsets.npy`` beside ``<layer>.npy``)."""
        self._check(layer)
        if layer not in self._offsets:
            raise ArgumentError(f"{layer!r} has one row per sample, not ragged tokens: feats[{layer!r}][i] is sample "
                                "i's row.")
        return self._offsets[layer]

    def tokens(self, layer: str, i: int) -> np.ndarray | Tensor:
        """Sample ``i``'s valid tokens of a ragged layer, [T_i, ...]: a numpy array, or a bfloat16 torch tensor for a
        bfloat16 layer (a view of ``feats.torch(layer)``)."""
        offsets = self.offsets(layer)
        n = len(offsets) - 1
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ArgumentTypeError(f"Features.tokens: i= takes a sample index (int), got {type(i).__name__} {i!r}.")
        if not -n <= i < n:
            raise SampleIndexError(f"sample {i!r} of {layer!r}: there are {n} samples (0 to {n - 1}).")
        i = int(i) % n
        rows: np.ndarray | Tensor = self._arrays[layer]
        if layer in self._bfloat16:  # one map of the file for every sample's tokens, made on first use
            if layer not in self._tensors:
                self._tensors[layer] = self.torch(layer)
            rows = self._tensors[layer]
        return rows[int(offsets[i]):int(offsets[i + 1])]

    def path(self, layer: str) -> Path:
        """The ``.npy`` file of ``layer`` (its name, or a cleaned name with a hash when the layer name is not a
        plain file name, e.g. holds ``/``)."""
        if self.out is None or self.manifest is None:
            raise ArgumentError("these features are in memory: extract(..., out=DIR) writes files.")
        self._check(layer)
        return self.out / self.manifest["files"][layer]

    def loader(self, layer: str, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
               drop_last: bool = False, start: int = 0, rank: int | None = None,
               world: int | None = None) -> RowLoader:
        """The rows of ``layer`` (its tokens, for a ragged layer) in batches for training: each row once per epoch,
        in an order fixed by ``(seed, epoch)``, read from the file in large sequential blocks.

        Examples:
            >>> import torch, torch.nn as nn, hookkit
            >>> data = [torch.randn(5, 4) for _ in range(2)]  # 10 samples
            >>> feats = hookkit.extract(nn.Sequential(nn.Linear(4, 3)), ["0"], data, progress=False)
            >>> loader = feats.loader("0", batch_size=4, epoch=0)  # a new epoch= for each epoch
            >>> len(loader), [tuple(b.shape) for b in loader]
            (3, [(4, 3), (4, 3), (2, 3)])
            >>> sorted(loader.rows().tolist()) == list(range(10))  # the rows of the batches, e.g. for labels
            True

        The order: the rows are cut into blocks of contiguous rows (about 1 MiB, at least one row); the blocks are
        shuffled, taken in windows of about 32 MiB (at least one block), and the rows of each window shuffled in
        memory. That is one permutation of all rows, the same for every number of ranks. Each block is read with one
        contiguous copy, and memory holds about two windows, not the layer. Rows of one batch come from one or two
        windows: this mixes less than ``DataLoader(TensorDataset(rows), shuffle=True)`` over the rows held in
        memory, which draws each batch from all rows, and much more than file order once the file spans many
        windows. It is also much faster than that ``DataLoader``, which fetches and collates row by row:
        ``benchmarks/bench_loader.py`` (200,000 rows of 384 float32 in the page cache, batches of 4,096, 2 CPU threads,
        two runs) measured a shuffled pass at 11-12x its rows per second, as fast as gathering batches from a random
        permutation of the rows held in memory (1.0x), and 0.41-0.47x the speed of reading the file front to back
        with numpy (shuffling the rows in memory is the difference; 2.7M rows/s, about 3.9 GB/s).

        Under ``torch.distributed`` (or with ``rank=`` and ``world=``), rank ``r`` takes a contiguous share of the
        permutation and reads only the windows it touches (about ``1 / world`` of the file):

        * ``drop_last=True``: every rank yields ``N // (batch_size * world)`` full batches; the last ``N % (batch_size
          * world)`` rows of the permutation are skipped this epoch (other rows in another epoch).
        * ``drop_last=False``: rank ``r`` gets ``N // world`` rows, plus one for the first ``N % world`` ranks, each
          yielded once, in batches of ``batch_size`` and a shorter last batch. Every rank yields the same number of
          batches except where no split can do it without repeating rows (``N % world != 0`` and ``N // world`` a
          multiple of ``batch_size``: then the first ``N % world`` ranks yield one more batch, of one row). Under
          DDP, which hangs when ranks disagree, use ``drop_last=True``.

        Args:
            layer: an extracted layer.
            batch_size: rows per batch (per rank), at least 1.
            shuffle: ``False`` yields the rows in file order (the rank shares as above).
            seed: the order's seed, an int >= 0; the same ``(seed, epoch)`` gives the same batches.
            epoch: the epoch's number (int >= 0): each epoch has its own order.
            drop_last: see above.
            start: skip this rank's first ``start`` batches of the epoch (to resume a run from a step): the loader
                yields ``list(full)[start:]`` of the loader with ``start=0``, without reading the windows before.
            rank: this process's rank; default: the initialized process group's, else 0. Give ``rank`` and
                ``world`` both or neither.
            world: the number of ranks; default: the initialized process group's, else 1.

        Returns:
            A ``RowLoader``: iterable (again and again, the same batches) of tensors [rows, ...] in the stored
            dtype, each contiguous and owning its memory; ``len()`` is the number of batches this rank yields;
            ``rows()`` the file's row numbers of those rows, in order.

        Raises:
            NotRecordedError: a layer that was not extracted.
            ArgumentTypeError / ArgumentError: an argument of the wrong type or out of range (``start`` past the
                epoch's batches, ``rank`` not below ``world``).
        """
        self._check(layer)
        return row_loader(self, layer, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last,
                          start=start, rank=rank, world=world)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape} {BFLOAT16 if k in self._bfloat16 else v.dtype}"
                           + (f" tokens of {len(self._offsets[k]) - 1} samples" if k in self._offsets else "")
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

    def __init__(self, names: list[str], *, bfloat16: bool = False) -> None:
        self.arrays: dict[str, list[tuple[np.ndarray, Rows]]] = {n: [] for n in names}
        self.shapes = RowShapes({})
        self.bfloat16 = bfloat16  # rows are bfloat16's raw bits (uint16): extract(..., dtype=torch.bfloat16)

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
        return Features(arrays, None, None, offsets, {n: BFLOAT16 for n in arrays} if self.bfloat16 else None)


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
