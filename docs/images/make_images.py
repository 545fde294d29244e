"""Regenerate the pictures of the manual: ``python docs/images/make_images.py`` (random weights, seeded; under a
minute on a CPU). Writes ``plotcli-sweep.png`` (a patching sweep heatmap), ``plotcli-grid.png`` (a feature grid)
and ``plotcli-monitor.png`` (a monitor plot) next to this file; needs the ``[plot]`` and ``[torchvision]`` extras.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import hookkit

HERE = Path(__file__).resolve().parent


def sweep_png(out: Path) -> Path:
    """A 4-layer transformer encoder (random weights) on 8 positions; clean and corrupt differ at position 3."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False),
                          nn.Linear(32, 1)).eval()
    clean = torch.randn(1, 8, 32)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randn(32)
    tokens = ["the", "cat", "sat", "on", "the", "warm", "red", "mat"]
    tokens[3] = "on/under"
    sweep = hookkit.patching_sweep(model, clean, corrupt, "0.layers.*", lambda out: out[0, -1, 0], positions=True)
    return sweep.save_png(out, labels=tokens)


def grid_png(out: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    disc = ((xs - 0.3) ** 2 + (ys + 0.2) ** 2 < 0.15).float()
    image = torch.stack([torch.sin(8 * xs) + disc, torch.cos(6 * ys) - disc, xs * ys]).unsqueeze(0)
    with torch.no_grad(), hookkit.capture(model, ["layer1"]) as cap:
        model(image)
    return hookkit.save_feature_grid(cap["layer1"], out, channels=24, nrow=8, title="layer1")


def monitor_png(out: Path) -> Path:
    """A small MLP trained for 100 steps on a toy regression, every 5th step recorded."""
    from collections import OrderedDict

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), relu1=nn.ReLU(), fc2=nn.Linear(32, 32),
                                      relu2=nn.ReLU(), head=nn.Linear(32, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "exp1"
        with hookkit.monitor(model, ["fc1", "relu1", "fc2", "relu2", "head"], every=5, log=run,
                             summary=False) as mon:
            for _ in range(100):
                x = torch.randn(32, 16)
                loss = (model(x) - x[:, :4]).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                mon.step()
        return hookkit.plot_run(run, out, stats=["update_ratio", "grad_norm", "zero_frac"])


def main() -> None:
    for name, make in (("sweep", sweep_png), ("grid", grid_png), ("monitor", monitor_png)):
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        print(make(HERE / f"plotcli-{name}.png"))


if __name__ == "__main__":
    main()
