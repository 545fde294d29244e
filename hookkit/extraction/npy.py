""".npy files written row by row, from several processes at once, readable by plain numpy at every stage.

The header has a fixed size (``HEADER_BYTES``), so the data always starts at the same offset: rows can be written at
their final place with ``os.pwrite`` before the number of rows is known, by any process, and the header is
written last. While a run is unfinished the file is named ``<layer>.npy.partial``; it is renamed to
``<layer>.npy`` only once every row is in place and the header says how many there are.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from hookkit._errors import ExtractError
from hookkit.core import fs

__all__ = ["HEADER_BYTES", "RowFile", "header_bytes", "finish_file", "npy_bytes"]

HEADER_BYTES = 512  # 64-byte aligned; room for any realistic shape
_MAGIC = b"\x93NUMPY\x01\x00"


def npy_bytes(dtype: np.dtype, shape: tuple[int, ...] | list[int]) -> int:
    """The exact size of a finished .npy of ``dtype`` and ``shape`` (a fixed header, then the rows)."""
    return HEADER_BYTES + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header for ``dtype`` and ``shape``, padded to exactly ``HEADER_BYTES``."""
    body = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    room = HEADER_BYTES - len(_MAGIC) - 2
    if len(body) + 1 > room:
        raise ExtractError(f"rows of shape {tuple(shape)[1:]} have too many dimensions for hookkit's .npy files "
                           f"(their header holds {HEADER_BYTES} bytes); reduce them with pool= (e.g. pool='flatten').")
    body = body + " " * (room - len(body) - 1) + "\n"
    return _MAGIC + struct.pack("<H", room) + body.encode("latin1")


def finish_file(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Make ``path`` exactly a .npy of ``shape``: the final header, and nothing past the last row (a file that
    once held more rows is cut)."""
    size = npy_bytes(dtype, shape)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, header_bytes(dtype, shape), 0)
        os.ftruncate(fd, size)
        fs.sync(fd)
    finally:
        os.close(fd)


class RowFile:
    """One layer's rows: ``write(at, array)`` puts rows at their place; opened without truncating, so
    several processes (and a resumed run) share the file."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, fs.NEW_FILE_MODE)
        try:
            if os.fstat(self._fd).st_size < HEADER_BYTES:
                # A provisional header (0 rows) so that even a partial file is a valid, empty .npy.
                os.pwrite(self._fd, header_bytes(self.dtype, (0, *self.row_shape)), 0)
        except BaseException:  # e.g. a full disk: do not leak the descriptor
            self.close()
            raise

    def held(self) -> int:
        """How many whole rows the file holds now (a cut file holds fewer than were written)."""
        size = os.fstat(self._fd).st_size - HEADER_BYTES
        return max(size, 0) // self.row_bytes if self.row_bytes else 0

    def read(self, first_row: int, count: int) -> np.ndarray:
        """Rows ``[first_row, first_row + count)`` as they are in the file (zeros where nothing was written)."""
        want = count * self.row_bytes
        data = os.pread(self._fd, want, HEADER_BYTES + first_row * self.row_bytes)
        data += bytes(want - len(data))
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.row_shape)

    def sync(self) -> None:
        fs.sync(self._fd)

    def write(self, at: int | np.ndarray, rows: np.ndarray) -> None:
        """``rows`` at their places: from row ``at`` on (an int), or row ``at[j]`` for ``rows[j]`` (an index array,
        in any order: sorted, each run of consecutive rows is one ``pwrite``)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.shape[1:] != self.row_shape:  # extract() checks shapes first: this is a guard against bugs
            raise AssertionError(f"hookkit bug: rows of shape {data.shape[1:]} reached {self.path.name}, whose rows "
                                 f"are {self.row_shape}")
        if data.size == 0:
            return
        if isinstance(at, (int, np.integer)):
            self._put(data, int(at))
            return
        where = np.asarray(at, dtype=np.int64)
        if len(where) > 1 and not (np.diff(where) > 0).all():
            order = np.argsort(where, kind="stable")
            where, data = where[order], data[order]
        breaks = (np.flatnonzero(np.diff(where) != 1) + 1).tolist()
        for a, b in zip([0, *breaks], [*breaks, len(where)], strict=True):
            self._put(data[a:b], int(where[a]))

    def _put(self, data: np.ndarray, first_row: int) -> None:
        view = data.data.cast("B")
        offset = HEADER_BYTES + first_row * self.row_bytes
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
