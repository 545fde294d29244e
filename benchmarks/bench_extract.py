#!/usr/bin/env python
"""extract() against a bare `for batch in loader: model(batch)` loop, and its memory as N grows (CPU).

    python benchmarks/bench_extract.py            # ~3 minutes on 2 cores
    python benchmarks/bench_extract.py --quick

Throughput: ResNet-18, 2,048 64x64 images made in memory, batch 64, eval + inference_mode for every variant;
variants interleaved round by round, median seconds per pass over the data.
Memory: peak RSS of a child process that extracts N images to disk (layer4, no pooling: 2 KiB... per image),
for two N; flat means the writes are streamed, not held.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

import hookkit
from hookkit.core import fs as _fs  # only to switch the syncs off for one variant, to measure what they cost


class Images(Dataset):
    """N images made on demand from their index (so the data set itself takes no memory as N grows)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)),)


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each variant per round, after one warm-up call each (allocator, thread pools, page cache); each
    round starts one variant later than the one before, so that no variant always runs first."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()
    for r in range(rounds):
        order = list(variants.items())
        order = order[r % len(order):] + order[: r % len(order)]
        for k, f in order:
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def loader(n: int) -> DataLoader:
    return DataLoader(Images(n), batch_size=64)


def throughput(rounds: int, n: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    data = loader(n)

    def bare() -> None:
        with torch.inference_mode():
            for (batch,) in data:
                model(batch)

    def extract_to(layers: list[str], pool: str | None, durable: bool = True) -> None:
        with tempfile.TemporaryDirectory() as d:
            if durable:
                hookkit.extract(model, layers, data, out=d, pool=pool, progress=False)
                return
            real = _fs.sync, _fs.sync_folder
            _fs.sync = _fs.sync_folder = lambda fd: None  # durability's cost: no syncs (every write goes through fs)
            try:
                hookkit.extract(model, layers, data, out=d, pool=pool, progress=False)
            finally:
                _fs.sync, _fs.sync_folder = real

    variants = {
        "bare loop (whole model)": bare,
        "extract avgpool -> disk": lambda: extract_to(["avgpool"], None),
        "extract layer3+avgpool, pool=avg -> disk": lambda: extract_to(["layer3", "avgpool"], "avg"),
        "extract layer4 unpooled (8 KiB/image) -> disk": lambda: extract_to(["layer4"], None),
        "  the same without fsync (durability's cost)": lambda: extract_to(["layer4"], None, durable=False),
        "extract layer1 only (stops after it) -> disk": lambda: extract_to(["layer1"], "avg"),
    }
    times = interleaved(variants, rounds)
    base = statistics.median(times["bare loop (whole model)"])
    print(f"throughput: ResNet-18, {n} images 3x64x64, batch 64, {torch.get_num_threads()} threads, "
          f"{rounds} rounds (median)")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:48s} {m:7.3f} s  {n / m:7.0f} img/s  {m / base:5.3f}x bare")


def child(n: int, out: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    hookkit.extract(model, ["layer4"], loader(n), out=out, progress=False)
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(sizes: list[int]) -> None:
    print("memory: peak RSS of a process extracting layer4 (512x2x2 floats = 8 KiB per image) to disk")
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), d], capture_output=True, text=True,
                                  check=True)
            rss = json.loads(proc.stdout.splitlines()[-1])["maxrss_mib"]
            size = (Path(d) / "layer4.npy").stat().st_size / 2**20
        print(f"  N={n:6d}: peak RSS {rss:7.1f} MiB, layer4.npy {size:7.1f} MiB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("N", "OUT"))
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    throughput(rounds=3 if args.quick else 5, n=512 if args.quick else 2048)
    memory([1000, 10000] if not args.quick else [500, 2000])


if __name__ == "__main__":
    main()
