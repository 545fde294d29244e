"""Run by tests/test_feature_loader.py as two torchrun-style ranks (gloo): both ranks extract a small model's layer
to one folder, then each streams its share with ``feats.loader`` (rank and world from the process group) and saves
the row numbers and rows of every batch. Blocks and windows
are as small as the test's.

    python _loader_worker.py OUT_DIR
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch

import hookkit
from hookkit.extraction import loader as _loader

from _extract_worker import model_and_data


def main() -> None:
    out = Path(sys.argv[1])
    _loader._BLOCK_BYTES, _loader._BUFFER_BYTES = 96, 4 * 96  # as the test's: many windows for 101 rows
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    try:
        model, _, batches = model_and_data(101, 8)
        feats = hookkit.extract(model, ["3"], batches, out=out / "feats", progress=False)
        rank = torch.distributed.get_rank()
        seen = {}
        for drop_last in (False, True):
            loader = feats.loader("3", 8, seed=3, epoch=1, drop_last=drop_last)
            seen[drop_last] = {"len": len(loader), "batches": list(loader), "rows": loader.rows()}
        torch.save(seen, out / f"rank{rank}.pt")
        torch.distributed.barrier()
        print(f"rank {rank}: {len(seen[False]['batches'])} batches", flush=True)
    finally:
        torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
