"""Watch a training run with ``hookkit.monitor`` and find the layer group whose learning rate is wrong.

    python examples/monitor_training.py [RUN_FOLDER]     # default: examples/out/monitor_training

A small CNN is trained on random images (made here; CPU, a few seconds) with two optimizer parameter groups: the
convolutional body at lr 1e-2, the classifier head at lr 1.0, a typo-sized mistake. ``hookkit.monitor`` records
every 5th step to ``RUN_FOLDER/monitor.jsonl`` and prints its table when the block ends; ``plot_run`` draws the
run. In the ``update_ratio`` panel (||w_after - w_before|| / ||w_after|| per parameter; ~1e-3 is healthy) the head's
lines sit two orders of magnitude above the body's: that is the group to fix. Needs matplotlib
(``pip install 'hookkit[plot]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

import hookkit

# Where the example writes by default: under examples/out/ (git-ignored), wherever it is run from.
OUT = Path(__file__).resolve().parent / "out" / "monitor_training"


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # body.0
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # body.1
        nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),  # body.2
    )


class Net(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = small_cnn()
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main(run: Path) -> Path:
    torch.manual_seed(0)
    model = Net()
    images = torch.randn(512, 3, 32, 32)
    labels = torch.randint(0, 10, (512,))
    opt = torch.optim.SGD([
        {"params": model.body.parameters(), "lr": 1e-2},
        {"params": model.head.parameters(), "lr": 1.0},  # the mistake to find: 100x the body's rate
    ])
    loss_fn = nn.CrossEntropyLoss()
    layers = ["body.0", "body.1", "body.2", "head"]
    with hookkit.monitor(model, layers, every=5, log=run) as mon:
        for _epoch in range(3):
            for i in range(0, len(images), 32):
                loss = loss_fn(model(images[i:i + 32]), labels[i:i + 32])
                loss.backward()
                opt.step()
                opt.zero_grad()
                mon.step()
    png = hookkit.plot_run(run, stats=("update_ratio", "grad_norm", "zero_frac"))
    last = mon.records[-1]["params"]
    head = last["head.weight"]["update_ratio"]
    body = max(v["update_ratio"] for k, v in last.items() if k.startswith("body."))
    print(f"update ratio at step {mon.records[-1]['step']}: head.weight {head:.2g}, largest in the body {body:.2g}")
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
