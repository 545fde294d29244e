"""Pictures of a conv layer's feature maps: ``feature_grid()`` makes one, ``save_feature_grid()`` writes it as a PNG.

    with hookkit.capture(model, ["conv1"]) as cap:
        model(x)
    hookkit.save_feature_grid(cap["conv1"], "conv1.png")

Each channel of one sample becomes a tile, scaled to [0, 1] by its own min / max, and the tiles are laid out by
``torchvision.utils.make_grid``. torchvision is optional for hookkit (``pip install 'hookkit[torchvision]'``): it is
imported when a grid is drawn, so ``import hookkit`` works without it.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, NamedTuple

import torch

from hookkit._errors import ArgumentError, ArgumentTypeError

__all__ = ["feature_grid", "save_feature_grid"]

Channels = None | int | Sequence[int] | torch.Tensor
Normalize = Literal["channel", "global"]
Cmap = Literal["gray", "viridis", None]

_SHAPES = "[N, C, H, W] (a batch of feature maps, as a conv layer returns) or [C, H, W] (one sample)"
_PAD_VALUE = 1.0  # white lines between tiles, so that dark tiles (constant channels) stay visible as tiles

# matplotlib's viridis at 9 evenly spaced points; interpolated linearly in between.
_VIRIDIS = (
    (0x44, 0x01, 0x54), (0x47, 0x2D, 0x7B), (0x3B, 0x52, 0x8B), (0x2C, 0x72, 0x8E), (0x21, 0x91, 0x8C),
    (0x28, 0xAE, 0x80), (0x5E, 0xC9, 0x62), (0xAD, 0xDC, 0x30), (0xFD, 0xE7, 0x25),
)


def _torchvision_utils() -> ModuleType:
    """``torchvision.utils``, imported on first use; a missing torchvision says what to install."""
    try:
        import torchvision.utils
    except ImportError as e:
        raise ImportError(
            f"hookkit's feature grids need torchvision, which could not be imported ({e}). Install it with "
            "`pip install 'hookkit[torchvision]'` (or `pip install torchvision` matching your torch)."
        ) from e
    return torchvision.utils


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{what} must be an int, got the bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{what} must be an int, got {type(value).__name__} {value!r}.") from None


def _check_activation(activation: Any) -> torch.Tensor:
    if not isinstance(activation, torch.Tensor):
        hint = ""
        if isinstance(activation, (tuple, list, dict)):
            hint = " This layer returned several values: pass the feature-map tensor itself, e.g. cap[name][0]."
        raise ArgumentTypeError(f"feature_grid: activation= takes a tensor {_SHAPES}; got "
                                f"{type(activation).__name__}.{hint}")
    if activation.dim() not in (3, 4):
        hint = ""
        if activation.dim() == 2:
            hint = " A [N, features] output (Linear, pooled features) has no spatial maps to draw."
        raise ArgumentError(
            f"feature_grid: activation= takes a tensor {_SHAPES}; got shape {tuple(activation.shape)} "
            f"({activation.dim()}-D).{hint}"
        )
    if activation.is_complex():
        raise ArgumentTypeError(f"feature_grid draws real values; activation= is a {activation.dtype} tensor.")
    if activation.is_meta:
        raise ArgumentError("feature_grid needs values to draw; activation= is a meta tensor (shape only, no data).")
    return activation


def _pick_sample(activation: torch.Tensor, sample: Any) -> torch.Tensor:
    i = _index(sample, "sample")
    if activation.dim() == 3:
        if i not in (0, -1):
            raise ArgumentError(
                f"sample={i} is out of range: a [C, H, W] tensor (shape {tuple(activation.shape)}) holds one "
                "sample; use sample=0, or pass the whole batch [N, C, H, W]."
            )
        return activation
    n = activation.shape[0]
    if not -n <= i < n:
        valid = f"0..{n - 1}" if n else "none: the batch is empty"
        raise ArgumentError(
            f"sample={i} is out of range for a batch of {n} (shape {tuple(activation.shape)} is [N, C, H, W]); "
            f"valid samples: {valid}."
        )
    return activation[i]


def _pick_channels(maps: torch.Tensor, channels: Channels) -> tuple[torch.Tensor, list[int]]:
    """The maps of ``channels`` and their channel numbers."""
    c = maps.shape[0]
    if c == 0 or maps.shape[1] == 0 or maps.shape[2] == 0:
        raise ArgumentError(f"nothing to draw: the sample's feature maps [C, H, W] have shape {tuple(maps.shape)}.")
    if channels is None:
        return maps, list(range(c))
    if isinstance(channels, torch.Tensor):
        if channels.dim() != 1 or channels.is_floating_point() or channels.is_complex():
            raise ArgumentTypeError(f"channels as a tensor must be a 1-D tensor of ints, got {channels.dtype} of shape "
                                    f"{tuple(channels.shape)}.")
        channels = channels.tolist()
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        try:
            n = _index(channels, "channels")
        except TypeError:
            raise ArgumentTypeError(
                f"channels must be None (all), an int (the first n) or a list of channel indices, got "
                f"{type(channels).__name__} {channels!r}."
            ) from None
        if n < 1:
            raise ArgumentError(f"channels={n}: ask for at least one channel (or channels=None for all {c}).")
        return maps[: min(n, c)], list(range(min(n, c)))
    if len(channels) == 0:
        raise ArgumentError("channels=[] selects nothing: give at least one channel index (or channels=None for all).")
    indices = [_index(i, "each channel index") for i in channels]
    bad = [i for i in indices if not -c <= i < c]
    if bad:
        raise ArgumentError(
            f"channel index {bad[0]} is out of range: the sample has {c} channels (feature maps [C, H, W] of shape "
            f"{tuple(maps.shape)}); valid indices: 0..{c - 1}."
        )
    return maps[torch.tensor(indices, device=maps.device)], [i % c for i in indices]


def _scale(maps: torch.Tensor, normalize: str) -> tuple[torch.Tensor, int]:
    """Each map (or all, with ``"global"``) to [0, 1] by its finite min / max; non-finite and constant -> 0."""
    x = maps.float()
    finite = torch.isfinite(x)
    n_bad = int(finite.numel() - finite.sum().item())
    dims = (1, 2) if normalize == "channel" else (0, 1, 2)
    inf = torch.tensor(math.inf, device=x.device)
    lo = torch.where(finite, x, inf).amin(dim=dims, keepdim=True)
    hi = torch.where(finite, x, -inf).amax(dim=dims, keepdim=True)
    # Halved so that a range wider than the largest float (-3e38..3e38) does not overflow to inf.
    span = hi / 2 - lo / 2
    scaled = (x / 2 - lo / 2) / span
    ok = finite & (span > 0) & torch.isfinite(span)  # span > 0 excludes constant and all-non-finite maps
    return torch.where(ok, scaled, torch.zeros((), device=x.device)).clamp_(0, 1), n_bad


def _colour(scaled: torch.Tensor, cmap: str | None) -> torch.Tensor:
    """[K, H, W] in [0, 1] -> [K, 3, H, W] in [0, 1]."""
    if cmap is None or cmap == "gray":
        return scaled.unsqueeze(1).expand(-1, 3, -1, -1)
    lut = torch.tensor(_VIRIDIS, dtype=torch.float32, device=scaled.device) / 255  # [9, 3]
    pos = scaled * (len(_VIRIDIS) - 1)
    low = pos.floor().long().clamp_(max=len(_VIRIDIS) - 2)
    frac = (pos - low).unsqueeze(-1)
    rgb = lut[low] * (1 - frac) + lut[low + 1] * frac  # [K, H, W, 3]
    return rgb.permute(0, 3, 1, 2).clamp_(0, 1)


class _Tiles(NamedTuple):
    """What a grid shows: ``tiles`` [K, 3, H, W] in [0, 1], ``nrow`` per row, their channel numbers, and where
    they come from (for the title of a saved grid)."""

    tiles: torch.Tensor
    nrow: int
    channels: list[int]
    total: int  # the channels the sample has
    sample: int
    normalize: str


def _tiles(
    activation: Any, *, sample: Any, channels: Channels, nrow: Any, normalize: Any, cmap: Any, stacklevel: int,
) -> _Tiles:
    activation = _check_activation(activation)
    if normalize not in ("channel", "global"):
        raise ArgumentError(f"normalize={normalize!r}: choose 'channel' (each map by its own min / max) or 'global' "
                            "(one min / max for all the maps shown).")
    if cmap not in (None, "gray", "viridis"):
        raise ArgumentError(f"cmap={cmap!r}: choose None or 'gray' (grayscale) or 'viridis'.")
    with torch.no_grad():
        one = _pick_sample(activation.detach(), sample)
        maps, picked = _pick_channels(one, channels)
        k = maps.shape[0]
        if nrow is None:
            nrow = math.ceil(math.sqrt(k))
        nrow = _index(nrow, "nrow")
        if nrow < 1:
            raise ArgumentError(f"nrow={nrow}: the number of tiles per row must be at least 1.")
        scaled, n_bad = _scale(maps, normalize)
        if n_bad:
            warnings.warn(
                f"feature_grid: {n_bad} of {maps.numel()} values in the {k} channel(s) drawn are NaN or Inf; "
                "they are drawn as 0 and left out of the min / max. hookkit.check_finite(model) finds the layer "
                "that first produced them.",
                RuntimeWarning,
                stacklevel=stacklevel + 1,
            )
        which = _index(sample, "sample") % activation.shape[0] if activation.dim() == 4 else 0
        return _Tiles(_colour(scaled, cmap), nrow, picked, one.shape[0], which, normalize)


def _padding(padding: Any) -> int:
    padding = _index(padding, "padding")
    if padding < 0:
        raise ArgumentError(f"padding={padding}: the gap between tiles in pixels must be 0 or more.")
    return padding


def _render(
    activation: Any, *, sample: Any, channels: Channels, nrow: Any, padding: Any, normalize: Any, cmap: Any,
    stacklevel: int,
) -> torch.Tensor:
    pad = _padding(padding)
    t = _tiles(activation, sample=sample, channels=channels, nrow=nrow, normalize=normalize, cmap=cmap,
               stacklevel=stacklevel)
    return _torchvision_utils().make_grid(t.tiles, nrow=t.nrow, padding=pad, pad_value=_PAD_VALUE)


def feature_grid(
    activation: torch.Tensor,
    *,
    sample: int = 0,
    channels: Channels = None,
    nrow: int | None = None,
    padding: int = 1,
    normalize: Normalize = "channel",
    cmap: Cmap = None,
) -> torch.Tensor:
    """A picture of a conv layer's feature maps: one tile per channel of one sample, as an RGB image tensor.

    Examples:
        >>> import torch, torchvision, hookkit
        >>> from hookkit import feature_grid
        >>> model = torchvision.models.resnet18().eval()
        >>> with hookkit.capture(model, ["conv1"]) as cap:
        ...     _ = model(torch.randn(1, 3, 64, 64))
        >>> cap["conv1"].shape
        torch.Size([1, 64, 32, 32])
        >>> feature_grid(cap["conv1"], channels=16).shape  # 16 tiles of 32 x 32, 4 per row, 1 pixel apart
        torch.Size([3, 133, 133])

    Args:
        activation: feature maps ``[N, C, H, W]`` (or ``[C, H, W]`` for one sample), on any device, with or
            without grad (it is detached).
        sample: which sample of the batch to draw (default ``0``; negative counts from the end).
        channels: which channels get a tile: ``None`` (default) all, an int ``n`` the first ``n`` (all, if the
            layer has fewer), or a list / 1-D tensor of channel indices, drawn in the order given.
        nrow: tiles per row (default ``ceil(sqrt(number of tiles))``, a square-ish grid).
        padding: pixels of white between tiles and around the grid (default ``1``).
        normalize: ``"channel"`` (default) scales each map to [0, 1] by its own min and max, so every tile uses
            the full range; ``"global"`` uses one min and max for all the tiles, so brightness compares across
            channels. A constant map is drawn as 0.
        cmap: ``None`` or ``"gray"`` (default) draws grayscale; ``"viridis"`` maps 0..1 from dark purple to yellow.

    Returns:
        A float32 tensor ``[3, H', W']`` with values in [0, 1], on the activation's device, laid out by
        ``torchvision.utils.make_grid(tiles, nrow=nrow, padding=padding)``: ``ceil(k / nrow)`` rows of
        ``min(nrow, k)`` tiles for ``k`` tiles. As in ``make_grid``, a single tile comes back alone, without
        padding.

    Raises:
        TypeError: ``activation`` is not a tensor (or is complex); an index is not an int.
        ValueError: ``activation`` is not 3-D or 4-D or is empty; ``sample`` or a channel index is out of range;
            an option is not one of its choices.

    Warns:
        RuntimeWarning: some drawn values are NaN or Inf (they are drawn as 0 and counted in the message).
    """
    return _render(activation, sample=sample, channels=channels, nrow=nrow, padding=padding, normalize=normalize,
                   cmap=cmap, stacklevel=3)


def save_feature_grid(
    activation: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    sample: int = 0,
    channels: Channels = None,
    nrow: int | None = None,
    padding: int = 1,
    normalize: Normalize = "channel",
    cmap: Cmap = None,
    title: str | None = None,
    annotate: bool = True,
) -> Path:
    """Write ``feature_grid(activation, ...)`` to a PNG file, with a title and each tile's channel number;
    creating its folder; return the path written.

    Examples:
        >>> import tempfile, torch
        >>> from hookkit import save_feature_grid
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_feature_grid(torch.randn(1, 8, 16, 16), f"{tmp}/maps/layer1.png", nrow=4)
        ...     print(path.name, path.exists())
        layer1.png True

    The picture has a title line saying what it shows (``"layer1: 16 of 64 channels of sample 0, each scaled to
    its own min / max"``) and the channel number above each tile. Tiles smaller than 48 pixels are enlarged by a
    whole factor (each value a square of pixels) so that their numbers fit; tiles are at least 2 pixels apart.

    Args:
        activation: feature maps ``[N, C, H, W]`` or ``[C, H, W]``, as for ``feature_grid``.
        path: where to write; must end in ``.png``. Missing parent folders are created; an existing file is
            overwritten.
        sample: as for ``feature_grid``.
        channels: as for ``feature_grid``.
        nrow: as for ``feature_grid``.
        padding: as for ``feature_grid``.
        normalize: as for ``feature_grid``.
        cmap: as for ``feature_grid``.
        title: what the maps are, usually the layer's name (default ``None``: the title only says which channels
            of which sample, and how they are scaled).
        annotate: ``True`` (default) draws the title and the channel numbers; ``False`` writes
            ``feature_grid(...)`` as it is, pixel for pixel (``title`` is then unused).

    Returns:
        The ``Path`` written.

    Raises:
        ValueError: ``path`` does not end in ``.png``; and what ``feature_grid`` raises, before anything is written.
        TypeError: ``path`` is not a string or path, ``title`` not a string or ``None``, ``annotate`` not a bool.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a str or pathlib.Path ending in .png, got {type(path).__name__} "
                                f"{path!r}.")
    if title is not None and not isinstance(title, str):
        raise ArgumentTypeError(f"title must be a str (e.g. the layer's name) or None, got {type(title).__name__}.")
    if not isinstance(annotate, bool):
        raise ArgumentTypeError(f"annotate must be True or False, got {type(annotate).__name__} {annotate!r}.")
    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        found = f"suffix {out.suffix!r}" if out.suffix else "no suffix"
        raise ArgumentError(f"save_feature_grid writes PNG files; path={str(path)!r} has {found}. Use a name ending "
                            "in .png.")
    pad = _padding(padding)
    t = _tiles(activation, sample=sample, channels=channels, nrow=nrow, normalize=normalize, cmap=cmap,
               stacklevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    utils = _torchvision_utils()
    if not annotate:
        utils.save_image(utils.make_grid(t.tiles, nrow=t.nrow, padding=pad, pad_value=_PAD_VALUE), out, format="PNG")
    else:
        _annotated(t, pad, title).save(out, format="PNG")
    return out


# -- the annotated picture ---------------------------------------------------------------------------------------------
_MIN_TILE = 48  # pixels: a smaller tile is enlarged by a whole factor, so that its channel number fits


def _describe(t: _Tiles, title: str | None) -> str:
    k = len(t.channels)
    which = f"all {k} channels" if k == t.total and t.channels == list(range(k)) else f"{k} of {t.total} channels"
    scale = "each scaled to its own min / max" if t.normalize == "channel" else "one scale for all tiles"
    text = f"{which} of sample {t.sample}, {scale}"
    return f"{title}: {text}" if title else text[0].upper() + text[1:]


def _annotated(t: _Tiles, padding: int, title: str | None) -> Any:
    """The tiles laid out as ``make_grid`` lays them out, with a wrapped title on top and each tile's channel
    number in a strip above it; returns a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    k, _, h, w = t.tiles.shape
    zoom = max(1, math.ceil(_MIN_TILE / max(h, w)))
    tiles = t.tiles.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3) if zoom > 1 else t.tiles
    th, tw = h * zoom, w * zoom
    cols, rows = min(t.nrow, k), math.ceil(k / t.nrow)
    gap = max(padding, 2)
    label_px = min(16, max(10, tw // 6))  # the channel numbers' font size: readable, and no larger than a tile
    title_px = min(22, max(12, (cols * (tw + gap)) // 40))
    label_font = ImageFont.load_default(size=label_px)
    title_font = ImageFont.load_default(size=title_px)
    strip = label_px + 4
    width = gap + cols * (tw + gap)
    lines = _wrap(_describe(t, title), title_font, max(width - 2 * gap, 200))
    top = gap + len(lines) * (title_px + 4) + 4
    picture = Image.new("RGB", (max(width, 200 + 2 * gap), top + rows * (strip + th + gap)), "white")
    draw = ImageDraw.Draw(picture)
    for i, line in enumerate(lines):
        draw.text((gap, gap + i * (title_px + 4)), line, fill="black", font=title_font)
    pixels = tiles.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, channel in enumerate(t.channels):
        x = gap + (i % t.nrow) * (tw + gap)
        y = top + (i // t.nrow) * (strip + th + gap)
        draw.text((x, y + 1), str(channel), fill=(60, 60, 60), font=label_font)
        picture.paste(Image.fromarray(pixels[i]), (x, y + strip))
    return picture


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels in ``font`` (a word longer than that gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines
