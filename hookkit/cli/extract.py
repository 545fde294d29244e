"""``hookkit extract MODEL --layers ... --data IMAGE_FOLDER --out DIR``: features of every image in a folder, and
``hookkit extract MODEL_FOLDER --layers ... --text FILE --out DIR``: of every document of a text file, streamed to
``DIR/<layer>.npy`` by ``hookkit.extract`` (resumable), with an index naming row ``i`` (``DIR/files.txt``: its
image; ``DIR/lines.txt``: its input line).

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds. Images come from
``hookkit.cli.images.ImageFiles`` (torchvision and Pillow, imported when used), texts from ``hookkit.cli.texts``
(``read_documents``, the Hugging Face model folder's tokenizer and model, ``TokenizedTexts`` with its padding
collate; transformers imported when used). Every option is checked, the input read and the index compared with the
one in ``--out`` before a file is written; what ``extract`` itself checks (``--out``, the pool names) is checked by its
own functions (``hookkit.extraction.options``), with the option's name in the message. ``_extract`` then hands a
DataLoader to ``hookkit.extract`` and prints what it wrote (and how many rows an earlier run had written). Ctrl-C
keeps the rows written and raises ``Interrupted`` with their number and the command that resumes;
``hookkit.cli.run`` prints it as one line, exit code 130.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hookkit._errors import ArgumentError, CommandLineError, HookkitError
from hookkit.cli._inputs import (
    MODEL_HELP,
    Interrupted,
    build_model,
    check_fits,
    count,
    positive_int,
    seed,
)
from hookkit.core.select import select
from hookkit.extraction.options import POOLS, check_out_folder

__all__: list[str] = []  # run through `hookkit extract`

_IMAGE_SIZE = 224
_TEXT_POOLS = tuple(p for p in POOLS if p != "flatten")  # a document's tokens do not flatten to one width
_IMAGE_ONLY = (("image_size", "--image-size"), ("weights", "--weights"))
_TEXT_ONLY = (("field", "--field"), ("max_length", "--max-length"), ("no_truncation", "--no-truncation"),
              ("order", "--order"))


def register(sub: Any) -> None:
    """Add ``hookkit extract`` to the subparsers ``sub``."""
    extract_cmd = sub.add_parser(
        "extract",
        help="features of every image in a folder or document of a text file, streamed to DIR/<layer>.npy "
        "(resumable)",
        description="Run MODEL over every image under --data (sorted by relative path, so row i is always the same "
        "image; standard ImageNet preprocessing) or every document of --text (a local Hugging Face model folder "
        "with its tokenizer; row i is the i-th document) and write DIR/<layer>.npy, DIR/manifest.json and "
        "DIR/files.txt (the image of each row) or DIR/lines.txt (the input line of each row). Run the same command "
        "again to resume an interrupted extraction.",
    )
    extract_cmd.add_argument("model", metavar="MODEL",
                             help=f"{MODEL_HELP}; with --text, a local Hugging Face model folder (config.json, "
                             "weights, tokenizer files)")
    extract_cmd.add_argument("--layers", nargs="+", required=True, metavar="LAYER",
                             help="layer names, globs or op nodes (see `hookkit layers MODEL`)")
    data = extract_cmd.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="IMAGE_FOLDER",
                      help="a folder of images (ImageFolder-style class subfolders or flat)")
    data.add_argument("--text", metavar="FILE",
                      help="a UTF-8 text file, one document per line (blank lines skipped), or JSON Lines with "
                      "--field")
    extract_cmd.add_argument("--out", required=True, metavar="DIR", help="where the .npy files go")
    extract_cmd.add_argument("--pool", choices=[p for p in POOLS if p is not None],
                             help="per sample: average / max over space or tokens (text: over the real tokens, "
                             "not the padding), flatten (images only), or the first token. Default: none, an image "
                             "keeps the layer's whole output per row, a text every real token (DIR/<layer>.npy "
                             "[tokens, ...] and DIR/<layer>.offsets.npy)")
    extract_cmd.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                             help="images or documents per batch; default: %(default)s")
    extract_cmd.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                             help="storage dtype (default: the layer's own; a bfloat16 layer as float32). bfloat16 "
                             "files hold the raw 2-byte values (numpy uint16; manifest.json names the dtype)")
    extract_cmd.add_argument("--workers", type=count, default=0, metavar="N",
                             help="DataLoader worker processes (decoding images, tokenizing text); default: "
                             "%(default)s, everything in the main process")
    images = extract_cmd.add_argument_group("images (--data)")
    images.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                        help=f"side of the square crop; default: {_IMAGE_SIZE} (a batch over half of the memory "
                        "is refused)")
    images.add_argument("--weights", metavar="PATH",
                        help="a local state_dict file to load into the model; default: none, random weights (--seed)")
    images.add_argument("--seed", type=seed, default=0, help="seed of random weights; default: %(default)s")
    text = extract_cmd.add_argument_group("text (--text)")
    text.add_argument("--field", metavar="NAME",
                      help="read --text as JSON Lines: each line an object whose field NAME holds the document "
                      "(default: plain text, one document per line)")
    text.add_argument("--max-length", type=positive_int, default=None, metavar="TOKENS",
                      help="cut documents to this many tokens, special tokens included; default: the most the "
                      "model takes")
    text.add_argument("--no-truncation", action="store_true",
                      help="never cut a document: refuse (before anything is written) one over the limit (default: "
                      "cut it to --max-length)")
    text.add_argument("--order", choices=["length", "corpus"], default=None,
                      help="which documents share a batch: length (the default) puts documents of similar token "
                      "counts together, the longest batch first, so that little of each batch is padding; corpus "
                      "takes them in file order. Row i is document i either way")
    extract_cmd.set_defaults(command=_cmd_extract)


def _cmd_extract(args: argparse.Namespace, console: Console) -> int:
    text = args.text is not None
    for attr, option in _IMAGE_ONLY if text else _TEXT_ONLY:
        if getattr(args, attr) not in (None, False):
            raise CommandLineError(f"{option} applies to {'--data (images)' if text else '--text'}, not to "
                                   f"{'--text' if text else '--data'}; leave it out.")
    if "" in args.layers:
        raise CommandLineError("--layers '': name the model's layers (see `hookkit layers MODEL`), not the model "
                               "itself.")
    check_out_folder(args.out, option="--out")  # extract's own check of out=; it and those below fail before anything
    out = Path(args.out)  # is written
    return _text(args, out, console) if text else _images(args, out, console)


def _images(args: argparse.Namespace, out: Path, console: Console) -> int:
    from torch.utils.data import DataLoader

    from hookkit.cli.images import ImageFiles, write_file_list

    side = args.image_size or _IMAGE_SIZE
    images = ImageFiles(args.data, image_size=side)
    batch = min(args.batch_size, len(images))
    check_fits(f"--image-size {side} with --batch-size {args.batch_size} makes a batch of {batch} "
               f"image{'s' if batch > 1 else ''} of 3×{side}×{side}", batch * 3 * side * side,
               "pass a smaller --image-size or --batch-size")
    model = build_model(args)
    listing = out / "files.txt"
    if listing.exists() and listing.read_text().splitlines() != images.files:
        raise CommandLineError(f"{listing} lists other images than {args.data} holds now, so resuming would mix "
                               "rows. Use another --out, or delete it to start over.")
    select(model, args.layers, caller="hookkit extract")  # a bad layer name fails before anything is written
    _write_index(args, lambda: write_file_list(images.files, listing))
    loader = DataLoader(images, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    feats, before = _extract(args, model, loader, out, len(images), pool=args.pool)
    _show(feats, console, f"{len(images)} images{before}; row i is the image on line i of {listing}.")
    return 0


def _text(args: argparse.Namespace, out: Path, console: Console) -> int:
    from hookkit.cli import texts as _texts

    if args.pool not in _TEXT_POOLS:
        raise CommandLineError(f"--pool {args.pool} with --text: a document's tokens do not flatten into rows of "
                               "one width; use --pool avg, max or cls, or leave --pool out to keep every token.")
    docs = _texts.read_documents(args.text, field=args.field)
    tokenizer = _texts.load_tokenizer(args.model)
    limit = _texts.model_max_length(tokenizer, config=_texts.load_config(args.model))
    if args.max_length is not None:
        if limit is not None and args.max_length > limit:
            raise CommandLineError(f"--max-length {args.max_length} is over the {limit} tokens the model takes "
                                   f"(its position embeddings end there); pass --max-length {limit} or less.")
        limit = args.max_length
    lengths = None  # each document's token count, for --order length: counted once, here or by text_loader
    if args.no_truncation and limit is not None:
        whose = "the model's limit of" if args.max_length is None else "--max-length"
        lengths = _texts.check_lengths(docs, tokenizer, limit, limit_from=whose)
    listing = out / "lines.txt"
    _texts.check_line_index(docs, listing)
    model = _texts.load_text_model(args.model)
    select(model, args.layers, caller="hookkit extract")  # a bad layer name fails before anything is written
    if args.workers:
        # Workers fork after the tokenizer ran here (--no-truncation): tokenizers would warn and go serial anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = _texts.TokenizedTexts(docs.texts, tokenizer, max_length=limit, truncation=not args.no_truncation)
    dataset_id = _texts.corpus_id(docs, tokenizer, max_length=limit, truncation=not args.no_truncation)
    _write_index(args, lambda: _texts.write_line_index(docs, listing))
    loader = _texts.text_loader(texts, args.batch_size, order=args.order or "length", lengths=lengths,
                                num_workers=args.workers)
    feats, before = _extract(args, model, loader, out, len(docs), pool=args.pool, dataset_id=dataset_id)
    _show(feats, console, f"{len(docs)} documents{before}; row i is the document whose input line is the first "
          f"number on line i of {listing}.")
    return 0


def _write_index(args: argparse.Namespace, write: Any) -> None:
    """Make ``--out`` and write the row index, first, so that a resumed run can tell if the input changed."""
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write()
    except OSError as exc:  # the checks passed, but the file system still said no (quota, a race, ...)
        raise CommandLineError(f"cannot write to --out {args.out!r} ({exc.strerror or exc}); choose a writable "
                               "folder.") from exc


def _extract(args: argparse.Namespace, model: Any, loader: Any, out: Path, rows: int,
             **options: Any) -> tuple[Any, str]:
    """``extract`` into ``out``, and what an earlier run of the command had done there (a note for the summary:
    resumed from k rows, or already finished). Ctrl-C becomes ``Interrupted``: the rows kept and the command that
    resumes."""
    from hookkit.extraction.extract import extract
    from hookkit.extraction.manifest import COMMAND, rows_written

    done, finished = rows_written(out)
    again = shlex.join(["hookkit", *args.argv])
    recorded = COMMAND.set({"line": again, "cwd": os.getcwd()})  # kept in the manifest: how to finish the folder
    try:
        feats = extract(model, args.layers, loader, out=out, dtype=args.dtype, progress=True, **options)
    except KeyboardInterrupt:
        try:
            kept, _ = rows_written(out)  # extract's writer has written and recorded every batch it was handed
        except HookkitError:  # pragma: no cover - a folder made unreadable while it ran
            raise Interrupted(f"the rows written to {str(out)!r} are kept; run the same command again to compute "
                              f"the others: {again}") from None
        raise Interrupted(f"{kept} of {rows} rows are written to {str(out)!r} and kept; run the same command "
                          f"again to compute the other {rows - kept}: {again}") from None
    finally:
        COMMAND.reset(recorded)
    if finished:
        return feats, f" (all {rows} rows were already written by an earlier run: nothing was computed)"
    if done:
        return feats, f" ({done} of them already written by an earlier run, resumed; {rows - done} computed now)"
    return feats, ""


def _show(feats: Any, console: Console, note: str) -> None:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("layer", "file", "shape", "dtype"):
        table.add_column(column)
    ragged = False
    for name in feats:
        path = feats.path(name)
        array = feats.torch(name)  # a memory map: also a bfloat16 layer, which numpy has no type for
        dtype = str(array.dtype).removeprefix("torch.")
        try:
            offsets = feats.offsets(name)
        except ArgumentError:  # one row per sample
            table.add_row(name, str(path), " × ".join(map(str, array.shape)), dtype)
            continue
        ragged = True
        table.add_row(name, str(path), " × ".join(map(str, array.shape)) + " (tokens)", dtype)
        table.add_row("", str(path.with_name(path.name.removesuffix(".npy") + ".offsets.npy")),
                      f"{len(offsets)} (offsets)", str(offsets.dtype))
    console.print(table)
    if ragged:
        note += " Without --pool, sample i's tokens are rows offsets[i]:offsets[i + 1] of <layer>.npy."
    console.print(Text(note, style="dim"))
