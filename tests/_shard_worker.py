"""Shared by tests/test_extract_shards.py and run by it under torchrun (2 processes that never call
``init_process_group``: extract() joins their group): a dataset that logs every sample it loads, per rank and
process, so that the tests count data loading instead of timing it.

    python tests/_shard_worker.py OUT LOG_DIR N BATCH WORKERS COLLATE
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import hookkit

LAYERS = ["1", "3"]


class Logged(Dataset):
    """``n`` samples ``(x[i], i)``; each ``__getitem__`` appends ``i`` to ``LOG_DIR/rank<RANK>-pid<pid>.log``
    (DataLoader workers are other processes: they inherit RANK and write their own file)."""

    def __init__(self, n: int, log_dir: str | os.PathLike) -> None:
        self.x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with open(self.log_dir / f"rank{os.environ.get('RANK', '-')}-pid{os.getpid()}.log", "a") as f:
            f.write(f"{i}\n")
        return self.x[i], i


def inputs_only(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor]:
    """A custom collate_fn that keeps the batch composition: the inputs stacked, the labels dropped."""
    return (torch.stack([x for x, _ in samples]) * 1.0,)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


def loader(n: int, batch: int, log_dir: str | os.PathLike, *, workers: int = 0, collate: str = "default",
           **options) -> DataLoader:
    collate_fn = inputs_only if collate == "custom" else None
    return DataLoader(Logged(n, log_dir), batch_size=batch, num_workers=workers, collate_fn=collate_fn, **options)


def loads(log_dir: str | os.PathLike) -> dict[str, Counter]:
    """{rank: Counter of the sample indices its processes loaded}; rank '-' is a plain process."""
    found: dict[str, Counter] = {}
    for path in Path(log_dir).glob("rank*-pid*.log"):
        rank = path.name[len("rank"):path.name.index("-pid")]
        found.setdefault(rank, Counter()).update(int(line) for line in path.read_text().split())
    return found


def main() -> None:
    out, log_dir, n, batch, workers, collate = sys.argv[1:7]
    data = loader(int(n), int(batch), log_dir, workers=int(workers), collate=collate)
    hookkit.extract(model(), LAYERS, data, out=out, progress=False)
    dist = torch.distributed
    print(f"rank {os.environ['RANK']}: group joined after extract: {dist.is_initialized()}", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
