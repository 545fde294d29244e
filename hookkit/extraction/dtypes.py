"""Which dtype a layer's rows are stored in, for the dtype numpy has no type for: bfloat16.

A bfloat16 row is stored as its raw 2-byte values, a plain ``.npy`` of numpy dtype ``'<u2'`` (uint16) that any tool
reads, and the layer's true dtype is named in ``manifest.json`` (``"torch_dtypes": {layer: "bfloat16"}``). Only
``extract(..., dtype=torch.bfloat16)`` stores bfloat16: without ``dtype=`` a bfloat16 layer is stored as float32.

``extraction.extract`` turns each batch's rows into numpy with ``host_array`` (bfloat16 as its bits, never through
float32); ``extraction.npyfolder`` records ``torch_names`` in the finished manifest; ``extraction.rowstore.Features``
hands the values back as torch tensors with ``as_tensor`` (a view of the array: nothing is copied).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["BFLOAT16", "host_array", "torch_names", "as_tensor"]

BFLOAT16 = "bfloat16"  # the name manifest.json gives a bfloat16 layer's dtype


def host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy, sharing its memory: a bfloat16 tensor as its raw bits (uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def torch_names(layers: Iterable[str], numpy_dtypes: dict[str, str], storage: str | None) -> dict[str, str]:
    """Each layer's stored dtype by torch's name for it (``"float32"``, ``"bfloat16"``): from the numpy dtype of its
    file, except that every layer of a call with ``dtype=torch.bfloat16`` (``storage``, the settings' ``"dtype"``)
    is bfloat16, held as uint16."""
    if storage == str(torch.bfloat16):
        return {n: BFLOAT16 for n in layers}
    return {n: np.dtype(numpy_dtypes[n]).name for n in layers}


def as_tensor(array: np.ndarray, name: str | None) -> torch.Tensor:
    """``array`` as a torch tensor sharing its memory, in the stored dtype ``name`` (bfloat16: the uint16 bits
    viewed as bfloat16)."""
    if name == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
