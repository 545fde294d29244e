"""The options of ``extract()`` that are checked before anything runs or is written, one function each, shared with
the command line (``hookkit extract``), which calls them with its own option names.

``checked_options`` (``pool``, ``dtype``, ``dataset_id``, ``mask``), ``check_select`` (``select`` against the layers),
``torch_dtype`` (a storage dtype a ``.npy`` can hold) and ``check_out_folder`` (``out``: a folder that exists or can be
created, on a writable file system, checked without writing). ``POOLS`` are the pool names ``extract`` knows.
Each raises a hookkit error naming the option, the value and the fix.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hookkit._errors import ArgumentError, ArgumentTypeError, ExtractError

__all__ = ["Pool", "Select", "Mask", "POOLS", "checked_options", "torch_dtype", "check_select", "check_out_folder"]

Pool = None | str | Callable[[torch.Tensor], torch.Tensor]
Select = None | int | str | Callable[[Any], torch.Tensor] | Mapping[str, Any]
Mask = None | bool | str | Callable[[Any], torch.Tensor]
POOLS = (None, "avg", "max", "flatten", "cls")


def checked_options(pool: Pool, dtype: Any, dataset_id: Any, mask: Any) -> torch.dtype | None:
    """The options that need no model: ``pool``, ``dtype`` (returned as a torch dtype), ``dataset_id``, ``mask``."""
    if not (mask is None or mask is False or isinstance(mask, str) or (callable(mask) and mask is not True)):
        raise ArgumentTypeError(f"mask={mask!r}: use None (a dict batch's 'attention_mask', if any), a key of dict "
                                "batches, a callable that returns the batch's [N, T] mask, or False for no mask.")
    if not callable(pool) and not any(pool is p or pool == p for p in POOLS):
        raise ArgumentError(f"pool={pool!r}: use None, 'avg', 'max', 'flatten', 'cls' or a callable.")
    storage = torch_dtype(dtype)
    if dataset_id is not None and not isinstance(dataset_id, str):
        raise ArgumentTypeError(f"dataset_id={dataset_id!r}: use a string that names your data, e.g. "
                                "'imagenet-val@v2'.")
    return storage


def torch_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` (a torch dtype, a numpy dtype or its name; None: the layer's own) as the torch dtype rows are
    stored in, refused unless numpy (and so a ``.npy`` file) can hold it; bfloat16 (``torch.bfloat16`` or
    ``"bfloat16"``), which numpy has no type for, is stored as its raw 2-byte values (``extraction.dtypes``)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.removeprefix("torch.") == "bfloat16":
        return torch.bfloat16
    if dtype is torch.bfloat16:
        return dtype
    if isinstance(dtype, torch.dtype):
        result = dtype
    else:
        try:
            result = getattr(torch, np.dtype(dtype).name)
        except (TypeError, AttributeError):
            result = None
    if result is not None:
        try:
            torch.empty(0, dtype=result).numpy()
        except TypeError:
            result = None
    if result is None:
        raise ArgumentError(f"dtype={dtype!r} is not a dtype a .npy file can hold; use e.g. torch.bfloat16 or "
                            "torch.float16 (half the size) or torch.float32.")
    return result


def check_select(select: Select, names: list[str]) -> None:
    """Types and layer keys of ``select``, before anything runs (what it picks is seen on the first batch)."""
    if isinstance(select, Mapping):
        for key, choice in select.items():
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ArgumentError(f"select has a key {key!r} that is not one of the extracted layers "
                                    f"({', '.join(map(repr, names))}); key it by layer name.{hint}")
            _check_choice(choice, f"select[{key!r}]")
    else:
        _check_choice(select, "select")


def _check_choice(choice: Any, where: str) -> None:
    if choice is None or callable(choice) or (isinstance(choice, (int, str)) and not isinstance(choice, bool)):
        return
    raise ArgumentTypeError(f"{where}={choice!r}: use an index (int), a key (str), a callable, or a "
                            "{layer: choice} dict.")



def check_out_folder(out: str | os.PathLike | None, *, option: str = "out") -> None:
    """``out`` (None: nothing to check) is a folder that exists or can be created, on a writable file system;
    checked without writing anything. ``option`` names it in the message: ``"out"`` reads ``out='x'``, a
    command-line option such as ``"--out"`` reads ``--out 'x'``. Raises ``ExtractError``."""
    if out is None:
        return
    text = os.fspath(out)
    shown = f"{option} {str(text)!r}" if option.startswith("-") else f"{option}={str(text)!r}"
    path = Path(text)
    nearest = path  # the folder itself, or the nearest ancestor that exists: where mkdir would start
    while not nearest.is_dir():
        if os.path.lexists(nearest):
            what = ("a file" if nearest.is_file() else "a broken symbolic link" if nearest.is_symlink()
                    else "a special file")
            if nearest == path:
                raise ExtractError(f"{shown} is {what}, not a folder; pass a folder (it is created if missing), e.g. "
                                   "a new name next to it.")
            raise ExtractError(f"{shown} lies below {str(nearest)!r}, which is {what} and so cannot hold the "
                               "folder; pass a path outside it.")
        if nearest.parent == nearest:
            break
        nearest = nearest.parent
    where = "" if nearest == path else f" ({str(nearest)!r}, where it would be created, cannot be written)"
    if hasattr(os, "statvfs") and os.statvfs(nearest).f_flag & os.ST_RDONLY:
        raise ExtractError(f"{shown} is on a read-only file system{where}; choose a writable folder.")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ExtractError(f"{shown} is not writable: no permission to create files in {str(nearest)!r}; choose a "
                           "writable folder.")
