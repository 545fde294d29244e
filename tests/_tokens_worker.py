"""Run by tests/test_extract_tokens.py, as one process or as two torchrun-style ranks (RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT in the environment; extract() joins the process group itself).

    python _tokens_worker.py OUT ok         ragged token layers of padded, masked batches
    python _tokens_worker.py OUT unmasked   the same batches without their mask: rows of other shapes per rank
"""

from __future__ import annotations

import os
import sys

import torch
from test_extract_tokens import LAYERS, TokenNet, padded, sequences

import hookkit


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TokenNet().eval()
    batches = padded(sequences(50), 8)
    if mode == "unmasked":
        batches = [(b["x"],) for b in batches]
    try:
        hookkit.extract(model, LAYERS, batches, out=out, progress=False)
    except hookkit.ExtractError as exc:
        print(f"ExtractError: {exc}", flush=True)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
