"""``hookkit extract MODEL --layers ... --data IMAGE_FOLDER --out DIR``: features of every image in a folder,
streamed to ``DIR/<layer>.npy`` by ``hookkit.extract`` (resumable), with ``DIR/files.txt`` naming row ``i``.

``register`` adds the subcommand to the parser ``hookkit.cli._parser`` builds. The images come from
``hookkit._images.ImageFiles`` (which needs torchvision and Pillow, imported when used); ``--out`` and the batch
size are checked by ``hookkit.cli._inputs`` before the model is built or a file is written.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._errors import CommandLineError
from .._select import resolve
from ._inputs import MODEL_HELP, build_model, check_fits, count, positive_int, seed, writable_folder

__all__: list[str] = []  # run through `hookkit extract`


def register(sub: Any) -> None:
    """Add ``hookkit extract`` to the subparsers ``sub``."""
    extract_cmd = sub.add_parser(
        "extract",
        help="features of every image in a folder, streamed to DIR/<layer>.npy (resumable)",
        description="Run MODEL over every image under --data (sorted by relative path, so row i is always the same "
        "image; standard ImageNet preprocessing) and write DIR/<layer>.npy, DIR/manifest.json and DIR/files.txt "
        "(the image of each row). Run the same command again to resume an interrupted extraction.",
    )
    extract_cmd.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    extract_cmd.add_argument("--layers", nargs="+", required=True, metavar="LAYER",
                             help="layer names or globs (see `hookkit layers MODEL`)")
    extract_cmd.add_argument("--data", required=True, metavar="IMAGE_FOLDER",
                             help="a folder of images (ImageFolder-style class subfolders or flat)")
    extract_cmd.add_argument("--out", required=True, metavar="DIR", help="where the .npy files go")
    extract_cmd.add_argument("--pool", choices=["avg", "max", "flatten", "cls"],
                             help="per image: global average / max over space or tokens, flatten, or first token")
    extract_cmd.add_argument("--batch-size", type=positive_int, default=64, metavar="N")
    extract_cmd.add_argument("--image-size", type=positive_int, default=224, metavar="PX",
                             help="side of the square crop; default: %(default)s (a batch over half of the memory "
                             "is refused)")
    extract_cmd.add_argument("--dtype", choices=["float32", "float16"], default=None,
                             help="storage dtype (default: the layer's own)")
    extract_cmd.add_argument("--workers", type=count, default=0, metavar="N", help="DataLoader worker processes")
    extract_cmd.add_argument("--weights", metavar="PATH", help="a local state_dict file to load into the model")
    extract_cmd.add_argument("--seed", type=seed, default=0, help="seed of random weights; default: %(default)s")
    extract_cmd.set_defaults(command=_cmd_extract)


def _cmd_extract(args: argparse.Namespace, console: Console) -> int:
    from torch.utils.data import DataLoader

    from .._extract import extract
    from .._images import ImageFiles, write_file_list

    out = writable_folder(args.out)  # these fail before the model is built or anything is written
    images = ImageFiles(args.data, image_size=args.image_size)
    batch, side = min(args.batch_size, len(images)), args.image_size
    check_fits(f"--image-size {side} with --batch-size {args.batch_size} makes a batch of {batch} "
               f"image{'s' if batch > 1 else ''} of 3×{side}×{side}", batch * 3 * side * side,
               "pass a smaller --image-size or --batch-size")
    model = build_model(args)
    listing = out / "files.txt"
    if listing.exists() and listing.read_text().splitlines() != images.files:
        raise CommandLineError(f"{listing} lists other images than {args.data} holds now, so resuming would mix "
                               "rows. Use another --out, or delete it to start over.")
    if "" in args.layers:
        raise CommandLineError("--layers '': name the model's layers (see `hookkit layers MODEL`), not the model "
                               "itself.")
    resolve(model, args.layers)  # a bad layer name fails before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_file_list(images.files, listing)  # first, so that a resumed run can tell if the folder changed
    except OSError as exc:  # the checks above passed, but the file system still said no (quota, a race, ...)
        raise CommandLineError(f"cannot write to --out {args.out!r} ({exc.strerror or exc}); choose a writable "
                               "folder.") from exc
    loader = DataLoader(images, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    feats = extract(model, args.layers, loader, out=out, pool=args.pool, dtype=args.dtype, progress=True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("layer", "file", "shape", "dtype"):
        table.add_column(column)
    for name, array in feats.items():
        table.add_row(name, str(feats.path(name)), " × ".join(map(str, array.shape)), str(array.dtype))
    console.print(table)
    console.print(Text(f"{len(images)} images; row i is the image on line i of {listing}.", style="dim"))
    return 0
