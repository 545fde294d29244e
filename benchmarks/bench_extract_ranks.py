#!/usr/bin/env python
"""extract() split across 2 torchrun-style ranks: data loading counted (``__getitem__`` calls) and timed (CPU).

    python benchmarks/bench_extract_ranks.py            # ~1 minute on 2 cores
    python benchmarks/bench_extract_ranks.py --n 256    # quicker

ResNet-18 (random init) on N 64x64 images made from their index (as bench_extract.py's ``Images``), each load
also spending ``--decode-ms`` of CPU to stand for decoding a file; layer4, avg-pooled, to a folder. Variants:

* 1 process, a DataLoader: every sample loaded once.
* 2 ranks, a DataLoader: each rank loads the batches it computes plus the data's first batch (sample-0 check).
* 2 ranks, a generator over the same DataLoader: the old read-and-skip (RoundRobin): every rank loads every batch.

The 2 ranks are 2 processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) that never call
``init_process_group``: extract() joins the group (gloo). Each rank uses 1 thread, the single process 2.
``extract s`` is the slowest rank's extract() call; ``process s`` adds starting Python and importing torch.
Every variant's files are compared byte for byte with the single process's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import hookkit

VARIANTS = {  # name: (processes, data)
    "1 process, DataLoader": (1, "loader"),
    "2 ranks, DataLoader": (2, "loader"),
    "2 ranks, generator (read all)": (2, "generator"),
}


class Images(Dataset):
    """N images made on demand from their index; counts its loads; burns ``decode_ms`` of CPU per load."""

    def __init__(self, n: int, decode_ms: float) -> None:
        self.n = n
        self.decode_s = decode_ms / 1000
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        self.loads += 1
        end = time.perf_counter() + self.decode_s
        while time.perf_counter() < end:  # a stand-in for decoding a JPEG: CPU work, not a sleep
            pass
        return (torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)),)


def worker(data_kind: str, out: str, n: int, batch: int, decode_ms: float, threads: int) -> None:
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    images = Images(n, decode_ms)
    data = DataLoader(images, batch_size=batch)
    source = data if data_kind == "loader" else (b for b in data)  # a generator: every rank reads every batch
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the read-and-skip warning is what this variant measures
        hookkit.extract(model, ["layer4"], source, out=out, pool="avg", progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "loads": images.loads, "seconds": seconds}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(processes: int, data_kind: str, out: Path, args: argparse.Namespace) -> tuple[list[dict], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1" if processes > 1 else "2"
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        env.update(WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
    threads = 1 if processes > 1 else 2
    cmd = [sys.executable, __file__, "--worker", data_kind, str(out), str(args.n), str(args.batch),
           str(args.decode_ms), str(threads)]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                              env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if processes > 1 else {})})
             for r in range(processes)]
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{cmd} failed with {p.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="images (default 1024)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decode-ms", type=float, default=2.0, help="CPU per load, standing for decoding")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, out, n, batch, decode_ms, threads = args.worker
        worker(kind, out, int(n), int(batch), float(decode_ms), int(threads))
        return

    print(f"extract, ResNet-18 layer4 avg-pooled, {args.n} images 64x64, batch {args.batch}, "
          f"{args.decode_ms:g} ms of CPU per load; {os.cpu_count()} cores, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first: Path | None = None
        for name, (processes, kind) in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            results, wall = launch(processes, kind, out, args)
            same = "-" if first is None else "yes" if (first / "layer4.npy").read_bytes() == (
                out / "layer4.npy").read_bytes() else "NO"
            first = first or out
            loads = [r["loads"] for r in results]
            rows.append((name, sum(loads), " + ".join(map(str, loads)), max(r["seconds"] for r in results), wall,
                         same))
    header = ("variant", "loads", "per rank", "extract s", "process s", "same files")
    widths = [max(len(str(r[i])) if not isinstance(r[i], float) else 6 for r in [header, *rows]) for i in range(6)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        cells = [f"{c:.2f}" if isinstance(c, float) else str(c) for c in row]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))


if __name__ == "__main__":
    main()
