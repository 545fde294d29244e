"""Grad-CAM on a ResNet-18: where in the picture does the top class's logit come from?

Grad-CAM (Selvaraju et al., 2017) needs two things from one layer, both recorded by one ``hookkit.capture``: the
layer's activation A [C, h, w] in the forward pass, and the gradient dy/dA of the class logit y in the backward
pass. Each channel gets a weight, its gradient averaged over the h x w positions; the map is
``relu(sum_c weight_c * A_c)``, upsampled to the input's size and scaled to [0, 1].

The network has random weights (``weights=None``) and the input is a picture drawn from code, so nothing is
downloaded; the heatmap is then not meaningful as an explanation, but every step is the real computation. Runs on
CPU in a few seconds:

    python examples/gradcam.py          # writes examples/out/gradcam/{input,heatmap,overlay}.png
    python examples/gradcam.py --out examples/out/gradcam_layer3 --layer layer3

tests/test_interventions.py runs it, and checks ``gradcam()`` against the same formula computed with raw torch hooks.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.utils import save_image

import hookkit

# Where the example writes by default: under examples/out/ (git-ignored), wherever it is run from.
OUT = Path(__file__).resolve().parent / "out" / "gradcam"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gradcam(model: torch.nn.Module, x: torch.Tensor, layer: str = "layer4", target: int | None = None) -> torch.Tensor:
    """The Grad-CAM heatmap [H, W] in [0, 1] of ``model`` for one image ``x`` ([1, 3, H, W] or [3, H, W]).

    ``layer`` is the layer whose activation and gradient are used; ``target`` the class whose logit is explained
    (default: the top class). Nothing is accumulated into the model's parameters' ``.grad``: the backward pass
    goes to a detached copy of the input only.
    """
    x = (x.unsqueeze(0) if x.dim() == 3 else x).detach().requires_grad_(True)
    if x.shape[0] != 1:
        raise ValueError(f"gradcam() explains one image; got a batch of {x.shape[0]}.")
    with torch.enable_grad(), hookkit.capture(model, [layer], grads=True) as cap:
        logits = model(x)
        cls = int(logits[0].argmax()) if target is None else int(target)
        logits[0, cls].backward(inputs=[x])  # hookkit records dy/dA on the way; parameters' .grad stay untouched
    act, grad = cap[layer][0], cap.grads[layer][0]  # [C, h, w] each
    weights = grad.mean(dim=(1, 2))  # one weight per channel: the gradient averaged over the h x w positions
    cam = F.relu((weights[:, None, None] * act).sum(dim=0))  # [h, w]
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    top = cam.max()
    return cam / top if top > 0 else cam  # all zero when no position has a positive contribution


def picture(size: int = 224, seed: int = 0) -> torch.Tensor:
    """A deterministic picture [3, size, size] in [0, 1]: a sky gradient, a sun, a striped hill and a checkered box."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([0.3 + 0.5 * ys, 0.5 + 0.3 * ys, 0.9 - 0.1 * ys])
    sun = ((xs - 0.75) ** 2 + (ys - 0.25) ** 2).sqrt() < 0.1
    img = torch.where(sun, torch.tensor([1.0, 0.9, 0.4]).view(3, 1, 1), img)
    hill = ys > 0.6 + 0.08 * torch.sin(xs * 2 * math.pi)
    stripes = 0.5 + 0.5 * (torch.sin(xs * 60 + ys * 20) > 0).float()
    img = torch.where(hill, torch.stack([0.2 * stripes, 0.6 * stripes, 0.2 * stripes]), img)
    box = (xs > 0.15) & (xs < 0.4) & (ys > 0.35) & (ys < 0.6)
    checks = (((xs * 32).floor() + (ys * 32).floor()) % 2).expand(3, size, size)
    img = torch.where(box, 0.1 + 0.8 * checks, img)
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def colourise(cam: torch.Tensor) -> torch.Tensor:
    """A [H, W] map in [0, 1] as an RGB image [3, H, W]: blue (0) through green to red (1)."""
    return torch.stack([cam.clamp(0.5, 1) * 2 - 1, 1 - (2 * cam - 1).abs(), 1 - cam.clamp(0, 0.5) * 2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs "
                        "(default: examples/out/gradcam/)")
    parser.add_argument("--layer", default="layer4", help="layer to explain from (default: layer4)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the picture's noise and the random weights")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    image = picture(seed=args.seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = ((image - mean) / std).unsqueeze(0)  # [1, 3, 224, 224], as ImageNet models expect
    model = torchvision.models.resnet18(weights=None).eval()

    with torch.no_grad():
        probs = model(x)[0].softmax(-1)
    top = int(probs.argmax())
    cam = gradcam(model, x, layer=args.layer, target=top)

    args.out.mkdir(parents=True, exist_ok=True)
    overlay = 0.5 * image + 0.5 * colourise(cam)
    save_image(image, args.out / "input.png")
    save_image(colourise(cam), args.out / "heatmap.png")
    save_image(overlay, args.out / "overlay.png")
    print(f"top class {top} (p = {probs[top]:.4f}; random weights, so the class means nothing)")
    print(f"cam from {args.layer}: shape {tuple(cam.shape)}, min {cam.min():.3f}, max {cam.max():.3f}, "
          f"mean {cam.mean():.3f}, {(cam > 0.5).float().mean():.1%} of pixels above 0.5")
    print(f"wrote {args.out / 'input.png'}, {args.out / 'heatmap.png'}, {args.out / 'overlay.png'}")


if __name__ == "__main__":
    main()
