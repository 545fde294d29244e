"""Token data of varied length, a small model that takes dict batches with an attention_mask, and batch samplers that
group samples by length: shared by tests/test_extract_order.py and run by it as a worker (2 gloo ranks, or one
process killed midway).

    python _order_worker.py OUT             as one of 2 ranks (tests/_ranks.py sets the environment): extracts
                                            OUT/ragged (pool=None) and OUT/avg (pool="avg") with length buckets
    python _order_worker.py slow OUT POOL   one process, one batch at a time with a pause, printing "batch" after
                                            each forward, so that the test can kill -9 it midway
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

import hookkit

N, VOCAB = 45, 50
LAYERS = ["net.1", "net.3"]


class Lines(Dataset):
    """N token sequences of 1 to 12 tokens; ``changed``: sample 0 has other tokens (same length)."""

    def __init__(self, n: int = N, *, changed: bool = False) -> None:
        g = torch.Generator().manual_seed(3)
        lengths = torch.randint(1, 13, (n,), generator=g)
        self.ids = [torch.randint(1, VOCAB, (int(length),), generator=g) for length in lengths]
        if changed:
            self.ids[0] = torch.where(self.ids[0] == 1, 2, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i]

    def lengths(self) -> list[int]:
        return [len(t) for t in self.ids]


def pad(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dict batch as a tokenizer gives it: input_ids right-padded with 0, and its attention_mask."""
    longest = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, :len(s)] = s
        mask[row, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TinyEncoder(nn.Module):
    """Per-token layers after an embedding, called as ``model(input_ids=..., attention_mask=...)``. Its weights are
    multiples of 1/8 and its layers linear or ReLU, so that every sum is exact in float32: a token's rows are the
    same bits whatever batch shape (and so matrix-multiply blocking) computed them, and mean pooling too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU())
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.round(p * 8) / 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(input_ids))


def by_length(lengths: list[int], batch_size: int, *, seed: int = 0) -> list[list[int]]:
    """Index lists of samples of similar length (sorted by length, longest first), the batches in a fixed shuffled
    order: what a length-bucketing batch sampler gives."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    shuffled = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[k] for k in shuffled]


class LengthBatches(Sampler[list[int]]):
    """A batch sampler class that gives the same ``by_length`` lists on every pass."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0) -> None:
        self.batches = by_length(lengths, batch_size, seed=seed)

    def __iter__(self):
        yield from (list(b) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def bucketed(ds: Lines, batch_size: int, seed: int = 0) -> DataLoader:
    return DataLoader(ds, batch_sampler=LengthBatches(ds.lengths(), batch_size, seed), collate_fn=pad)


def corpus_order(ds: Lines, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=pad)


def main() -> None:
    torch.set_num_threads(1)
    # the classes as the tests import them (a model's fingerprint holds its class's module: not "__main__")
    from _order_worker import Lines, TinyEncoder, bucketed
    if sys.argv[1] == "slow":
        out, pool = sys.argv[2], None if sys.argv[3] == "none" else sys.argv[3]
        model = TinyEncoder()

        def pause(module, args, output):
            print("batch", flush=True)
            time.sleep(0.1)
        model.net[0].register_forward_hook(pause)
        hookkit.extract(model, LAYERS, bucketed(Lines(), 4, seed=1), out=out, pool=pool, progress=False)
        print("finished", flush=True)
    else:
        out = Path(sys.argv[1])
        for pool in (None, "avg"):
            hookkit.extract(TinyEncoder(), LAYERS, bucketed(Lines(), 4), out=out / str(pool).lower(), pool=pool,
                            progress=False)
        print(f"rank {os.environ.get('RANK')} finished", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
