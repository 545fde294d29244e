"""Cheap statistics of tensors and nested values, as numbers and as one short line of text.

Computed under ``no_grad`` on detached tensors, so they never change a model's results or keep a graph alive, and
they never crash: empty, meta, integer, boolean and complex tensors each get what makes sense for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from hookkit.core import tree as _tree

__all__ = ["TensorStats", "tensor_stats", "describe", "fmt_num", "fmt_bytes", "dtype_short", "nonfinite_words",
           "shape_str", "shorten_name"]

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool", torch.complex64: "c64", torch.complex128: "c128",
}


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """Shape, dtype and summary numbers of one tensor (``None`` where a number does not apply)."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    numel: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    nan: int = 0
    inf: int = 0

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0

    def nonfinite_text(self) -> str:
        """E.g. ``"3 NaN and 1 Inf of 4096 values"``; empty when everything is finite."""
        parts = nonfinite_words(self.nan, self.inf)
        return f"{' and '.join(parts)} of {self.numel} values" if parts else ""


def shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def fmt_num(x: float | None) -> str:
    """Three significant digits, ``nan`` / ``inf`` spelled out, ``-0`` shown as ``0``."""
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def nonfinite_words(nan: int, inf: int) -> list[str]:
    """``["3 NaN", "1 Inf"]``, leaving out a zero count: the one wording of non-finite counts."""
    return [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n]


def dtype_short(dtype: torch.dtype) -> str:
    """``f32``, ``bf16``, ``i64``...: the one short spelling of a dtype in hookkit's output."""
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", ""))


def fmt_bytes(n: float, *, si: bool = False) -> str:
    """A byte count for people: ``'512 B'``, ``'1.5 KiB'``, ``'3.6 PiB'`` (steps of 1024); ``si=True`` gives
    ``'1.5 KB'`` (steps of 1000, as torchinfo writes model sizes).

    Examples:
        >>> fmt_bytes(1536), fmt_bytes(1500, si=True), fmt_bytes(7)
        ('1.5 KiB', '1.5 KB', '7 B')
    """
    step, units = (1000, ("B", "KB", "MB", "GB", "TB", "PB", "EB")) if si else (
        1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"))
    for unit in units:
        if n < step or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= step
    raise AssertionError("unreachable")  # pragma: no cover


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """Statistics of ``t``; never raises and never records autograd history."""
    dtype = dtype_short(t.dtype)
    base: dict[str, Any] = dict(shape=tuple(t.shape), dtype=dtype, device=str(t.device), numel=t.numel())
    if t.numel() == 0 or t.device.type == "meta" or t.layout != torch.strided:
        return TensorStats(**base)
    with torch.no_grad():
        x = t.detach()
        if x.is_complex():
            x = x.abs()
        if x.dtype == torch.bool:
            return TensorStats(**base, mean=x.float().mean().item(), min=float(x.min()), max=float(x.max()))
        if not x.is_floating_point():
            xf = x.double()
            return TensorStats(**base, mean=xf.mean().item(), std=_std(xf), min=xf.min().item(), max=xf.max().item())
        nan_mask = torch.isnan(x)
        inf_mask = torch.isinf(x)
        nan, inf = int(nan_mask.sum()), int(inf_mask.sum())
        if nan or inf:
            finite = x[~(nan_mask | inf_mask)].float()
        else:
            finite = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if finite.numel() == 0:
            return TensorStats(**base, nan=nan, inf=inf)
        return TensorStats(**base, mean=finite.mean().item(), std=_std(finite), min=finite.min().item(),
                           max=finite.max().item(), nan=nan, inf=inf)


def _std(x: torch.Tensor) -> float | None:
    return x.std().item() if x.numel() > 1 else None


def describe(value: Any, *, stats: bool = True) -> str:
    """One line for any value a module takes or returns: tensors with shape, dtype and statistics; tuples, lists,
    dicts and dataclasses as such; ``None`` as ``None``.

    Examples:
        >>> import torch
        >>> describe((torch.ones(2, 3), None))
        '(f32[2, 3] μ=1 σ=0 [1, 1], None)'
    """
    if isinstance(value, torch.Tensor):
        return _describe_tensor(value, stats)
    if value is None:
        return "None"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        inner = ", ".join(f"{k}={describe(v, stats=stats)}" for k, v in zip(value._fields, value, strict=True))
        return f"{type(value).__name__}({inner})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v, stats=stats) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}: {describe(v, stats=stats)}" for k, v in value.items())
        name = "" if type(value) is dict else type(value).__name__
        return f"{name}{{{inner}}}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(f"{f.name}={describe(getattr(value, f.name), stats=stats)}"
                          for f in dataclasses.fields(value))
        return f"{type(value).__name__}({inner})"
    if _tree.is_container(value):  # pragma: no cover - covered by the branches above
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 20 else type(value).__name__


def _describe_tensor(t: torch.Tensor, stats: bool) -> str:
    s = tensor_stats(t)
    head = f"{s.dtype}{shape_str(s.shape)}"
    if s.device != "cpu":
        head += f" {s.device}"
    if not stats or s.mean is None and s.finite:
        return head
    parts = [head]
    if s.mean is not None:
        parts.append(f"μ={fmt_num(s.mean)}")
        if s.std is not None:
            parts.append(f"σ={fmt_num(s.std)}")
        parts.append(f"[{fmt_num(s.min)}, {fmt_num(s.max)}]")
    if s.nan:
        parts.append(f"NaN={s.nan}")
    if s.inf:
        parts.append(f"Inf={s.inf}")
    return " ".join(parts)


def shorten_name(name: str, limit: int = 40) -> str:
    """``name`` if it fits in ``limit`` characters, else its last dotted parts with ``…`` for what was left out.

    The first part stays when it fits alongside at least the last two parts.

    Examples:
        >>> shorten_name("encoder.layer.11.attention.output.dense", 30)
        'encoder.….output.dense'
        >>> shorten_name("model.encoder.layers.11.self_attn.out_proj", 30)
        'model.….11.self_attn.out_proj'
        >>> shorten_name("encoder.layers.0.self_attention_block.0", 26)
        '….0.self_attention_block.0'
    """
    if len(name) <= limit:
        return name
    parts = name.split(".")

    def tail_fitting(head: list[str]) -> list[str]:
        tail: list[str] = []
        for part in reversed(parts[len(head) - 1:]):
            if len(".".join([*head, part, *tail])) > limit:
                break
            tail.insert(0, part)
        return tail

    if len(parts) > 3:
        tail = tail_fitting([parts[0], "…"])
        if len(tail) >= 2:
            return ".".join([parts[0], "…", *tail])
    tail = tail_fitting(["…"])
    if tail:
        return ".".join(["…", *tail])
    return "…" + name[-(limit - 1):] if limit > 1 else "…"
