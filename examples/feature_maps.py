"""What a ResNet-18's first layers "see": feature maps of conv1 and layer1, saved as PNG grids.

The input is a made-up landscape drawn from code (sky, sun, hills, a house, a fence, a tiled path), so the example
needs no download. The network has random weights (``weights=None``): even so, conv1's filters respond to edges,
stripes and flat regions, and each tile shows the scene filtered a different way. Runs on CPU in a few seconds:

    python examples/feature_maps.py          # writes examples/out/feature_maps/{input,conv1,layer1}.png
    python examples/feature_maps.py --out examples/out/fm_viridis --cmap viridis

tests/test_grid.py runs it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torchvision
from torchvision.utils import save_image

import hookkit
from hookkit import save_feature_grid

# Where the example writes by default: under examples/out/ (git-ignored), wherever it is run from.
OUT = Path(__file__).resolve().parent / "out" / "feature_maps"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def landscape(size: int = 224, seed: int = 0) -> torch.Tensor:
    """A deterministic picture [3, size, size] in [0, 1]: smooth gradients, a round sun, curved hills, a house
    with a tiled roof and windows, a striped fence and a checkerboard path, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")

    def paint(img: torch.Tensor, mask: torch.Tensor, rgb: tuple[float, float, float] | torch.Tensor) -> None:
        colour = torch.as_tensor(rgb, dtype=torch.float32)
        colour = colour.view(3, 1, 1) if colour.dim() == 1 else colour
        img.copy_(torch.where(mask, colour.expand_as(img), img))

    # Sky: deep blue at the top to pale near the horizon.
    t = ys.clamp(0, 0.6) / 0.6
    img = torch.stack([0.25 + 0.55 * t, 0.45 + 0.4 * t, 0.85 + 0.1 * t])
    # Sun with a soft glow.
    r = ((xs - 0.78) ** 2 + (ys - 0.2) ** 2).sqrt()
    glow = (1 - r / 0.25).clamp(0, 1) ** 2
    img = img + 0.35 * glow * torch.tensor([1.0, 0.8, 0.3]).view(3, 1, 1)
    paint(img, r < 0.08, (1.0, 0.93, 0.55))
    # Two rows of hills, the far one darker and bluer.
    far = ys > 0.52 + 0.06 * torch.sin(xs * 2 * math.pi * 1.3 + 0.5)
    near = ys > 0.62 + 0.05 * torch.sin(xs * 2 * math.pi * 0.8 + 2.0)
    paint(img, far, torch.stack([0.25 + 0.1 * ys, 0.45 + 0.1 * ys, 0.4 + 0.05 * ys]))
    grass = 0.5 + 0.15 * torch.sin(xs * 90) * torch.sin(ys * 70)  # a fine texture
    paint(img, near, torch.stack([0.3 * grass, 0.75 * grass + 0.1, 0.2 * grass]))
    # A house: walls, a roof made of a triangle with diagonal tiles, a door and a 2 x 2 grid of windows.
    walls = (xs > 0.12) & (xs < 0.38) & (ys > 0.5) & (ys < 0.72)
    paint(img, walls, (0.9, 0.85, 0.7))
    roof = (ys > 0.36) & (ys < 0.5) & ((xs - 0.25).abs() < (ys - 0.36) * 1.1)
    tiles = (torch.sin((xs + ys) * 120) > 0).float()
    paint(img, roof, torch.stack([0.6 + 0.15 * tiles, 0.15 + 0.05 * tiles, 0.1 + 0 * tiles]))
    paint(img, (xs > 0.22) & (xs < 0.28) & (ys > 0.6) & (ys < 0.72), (0.35, 0.2, 0.1))
    for cx in (0.16, 0.31):
        for cy in (0.53, 0.6):
            paint(img, (xs > cx) & (xs < cx + 0.05) & (ys > cy) & (ys < cy + 0.04), (0.3, 0.5, 0.8))
    # A fence of vertical stripes in front of the hills.
    fence = (ys > 0.74) & (ys < 0.84) & (xs > 0.45) & (torch.sin(xs * 2 * math.pi * 28) > 0.2)
    paint(img, fence, (0.95, 0.95, 0.92))
    # A checkerboard path that narrows towards the horizon.
    path = (ys > 0.72) & ((xs - 0.25).abs() < (ys - 0.72) * 0.9)
    checks = ((xs * 24).floor() + (ys * 24).floor()) % 2
    paint(img, path, torch.stack([0.2 + 0.6 * checks, 0.2 + 0.6 * checks, 0.2 + 0.6 * checks]))
    img = img + 0.02 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs "
                        "(default: examples/out/feature_maps/)")
    parser.add_argument("--cmap", choices=["gray", "viridis"], default="gray", help="tile colours (default: gray)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the picture's noise and the random weights")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    image = landscape(seed=args.seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = ((image - mean) / std).unsqueeze(0)  # [1, 3, 224, 224], as ImageNet models expect

    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad(), hookkit.capture(model, ["conv1", "layer1"]) as cap:
        model(x)

    args.out.mkdir(parents=True, exist_ok=True)
    save_image(image, args.out / "input.png")
    print(f"input   {tuple(image.shape)} -> {args.out / 'input.png'}")
    for name in ("conv1", "layer1"):
        act = cap[name]
        path = save_feature_grid(act, args.out / f"{name}.png", cmap=args.cmap, title=name)
        print(f"{name:<7} {tuple(act.shape)} -> {path} ({act.shape[1]} channels, each scaled to its own min/max)")


if __name__ == "__main__":
    main()
