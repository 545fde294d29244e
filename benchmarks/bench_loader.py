#!/usr/bin/env python
"""feats.loader (shuffled blocks in windows) against reading the same file front to back, and against shuffling
rows held in memory (CPU).

    python benchmarks/bench_loader.py            # 200,000 rows x 384, float32 (293 MiB) and bfloat16
    python benchmarks/bench_loader.py --quick    # 20,000 rows

The file is written by ``hookkit.extract`` (an identity layer over random rows) into a temporary folder, so it is in
the page cache: the figures are the page cache's speed, not a cold disk's. One pass = every row once, in batches;
variants interleaved round by round (after one warm-up pass each), median seconds per pass:

* ``feats.loader`` with shuffle=True, and with shuffle=False (file order);
* numpy front to back: ``np.array(memmap[i:i + batch])`` over the file (a plain sequential read with copies);
* ``DataLoader(TensorDataset(rows), batch_size, shuffle=True)`` over the rows already in memory (per-row indexing
  and collation, as PyTorch does it for a map-style dataset);
* in memory, ``rows[perm[i:i + batch]]``: a batch gathered from a random permutation of the rows in memory (the
  fastest possible full shuffle, needing the whole layer in memory).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from bench_extract import interleaved  # noqa: E402  (run as benchmarks/bench_loader.py: its folder is on sys.path)
from torch.utils.data import DataLoader, TensorDataset

import hookkit


def write(out: Path, rows: int, dim: int, dtype: torch.dtype) -> hookkit.Features:
    """A file of ``rows`` random rows of ``dim`` values, written by extract() as it writes any layer."""
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(min(8192, rows - i), dim, generator=g) for i in range(0, rows, 8192))
    return hookkit.extract(nn.Sequential(nn.Identity()), ["0"], data, out=out, dtype=dtype, progress=False)


def drain(batches: Iterable[Any]) -> int:
    """Rows in all batches (a DataLoader over a TensorDataset yields [tensor] lists)."""
    return sum(len(b[0] if isinstance(b, list) else b) for b in batches)


def bench(feats: hookkit.Features, batch: int, rounds: int) -> None:
    mm = np.load(feats.path("0"), mmap_mode="r")
    rows = len(mm)
    in_memory = torch.cat(list(feats.loader("0", 65536, shuffle=False)))  # the rows in memory, as torch reads them
    epoch = iter(range(10**9))  # a new order for each shuffled pass

    def numpy_pass() -> int:
        return sum(len(np.array(mm[i:i + batch])) for i in range(0, rows, batch))

    def gathered() -> int:
        perm = torch.randperm(rows)
        return sum(len(in_memory[perm[i:i + batch]]) for i in range(0, rows, batch))

    variants: dict[str, Callable[[], object]] = {
        "feats.loader shuffle=True": lambda: drain(feats.loader("0", batch, epoch=next(epoch))),
        "feats.loader shuffle=False (file order)": lambda: drain(feats.loader("0", batch, shuffle=False)),
        "numpy front to back over the memmap": numpy_pass,
        "DataLoader(TensorDataset(in memory), shuffle=True)": lambda: drain(
            DataLoader(TensorDataset(in_memory), batch_size=batch, shuffle=True)),
        "in memory rows[randperm batch] (no DataLoader)": gathered,
    }
    times = interleaved(variants, rounds)
    base = statistics.median(times["numpy front to back over the memmap"])
    mib = mm.nbytes / 2**20
    stored = feats.manifest.get("torch_dtypes", {}).get("0", str(mm.dtype)) if feats.manifest else str(mm.dtype)
    print(f"{rows} rows x {mm.shape[1]} {stored}: {feats.path('0').stat().st_size:,} bytes on disk "
          f"({mib:.0f} MiB, page cache), batch {batch}, "
          f"{torch.get_num_threads()} threads, {rounds} rounds (median)")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:52s} {m:7.3f} s  {rows / m / 1e6:6.2f} M rows/s  {mib / m:7.0f} MiB/s  {m / base:5.2f}x numpy")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows or (20_000 if args.quick else 200_000)
    rounds = 3 if args.quick else 5
    for dtype in (torch.float32, torch.bfloat16):
        with tempfile.TemporaryDirectory() as d:
            bench(write(Path(d), rows, args.dim, dtype), args.batch, rounds)


if __name__ == "__main__":
    main()
