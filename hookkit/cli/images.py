"""A folder of image files as a dataset, for ``hookkit extract --data FOLDER``: row ``i`` is always the same image.

Files are found recursively and sorted by their path relative to the folder, so the order never depends on the
filesystem; ``write_file_list`` records that order next to the extracted features (``files.txt``, line ``i`` is
row ``i``). Each image gets the standard ImageNet evaluation preprocessing.

``hookkit.cli.extract`` builds an ``ImageFiles`` for ``--data``; ``hookkit.cli.demo`` takes the ImageNet mean and std
from here. Pillow and torchvision (the optional extra ``hookkit[torchvision]``) are imported when an ``ImageFiles``
is made, not with this module: without them the constructor raises ``ImageFolderError`` saying what to install.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from hookkit._errors import ImageFolderError
from hookkit.core.fs import write_bytes

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImageFiles", "write_file_list", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CROP_FRACTION = 0.875  # resize the shorter side to image_size / 0.875 (256 for 224), then center-crop image_size
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grayscale; PIL's convert("RGB") would clip
_INSTALL = "pip install 'hookkit[torchvision]' (or pip install torchvision pillow)"


def _imaging() -> tuple[ModuleType, ModuleType]:
    """``(PIL.Image, torchvision.transforms.v2.functional)``, imported now: both are optional dependencies."""
    try:
        from PIL import Image
        from torchvision.transforms.v2 import functional
    except ImportError as exc:  # not installed, or torchvision built for another torch
        raise ImageFolderError(
            f"reading image folders needs Pillow and torchvision, which cannot be imported ({exc}); {_INSTALL}."
        ) from exc
    return Image, functional


class ImageFiles(torch.utils.data.Dataset):
    """Every image file under ``root`` (recursively), sorted by relative path, preprocessed for an ImageNet model.

        >>> import tempfile; from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> Image.new("RGB", (320, 240), "red").save(f"{root}/a.png")
        >>> data = ImageFiles(root, image_size=224)
        >>> data.files, len(data), tuple(data[0].shape)
        (['a.png'], 1, (3, 224, 224))

    Both an ImageFolder-style tree (``root/class_x/img.png``) and a flat folder work. Files and folders whose name
    starts with ``.`` are skipped, as are files without an image extension (``IMAGE_EXTENSIONS``, any case).
    The order is the sort order of the relative POSIX paths (``"cat/1.png" < "dog/0.png"``), whatever order the
    filesystem lists them in. Symlinked folders are followed (each real folder once).

    ``data[i]`` decodes file ``i`` with PIL, converts any mode (grayscale, 16-bit grayscale, RGBA, palette...) to
    RGB, resizes the shorter side to ``round(image_size / 0.875)`` (bilinear, antialiased: 256 for 224), crops the
    center ``image_size`` square, scales to ``[0, 1]`` and normalizes with the ImageNet mean and std: a float32
    tensor ``[3, image_size, image_size]``. Alpha is dropped, not composited; EXIF orientation is not applied
    (as in torchvision's ``ImageFolder``).

    Args:
        root: the folder to search.
        image_size: the side of the square output (default 224).

    Attributes:
        root: ``root`` as a ``Path``.
        files: the relative POSIX paths, in row order.
        image_size, resize_size: the crop side and the shorter side before cropping.

    Raises:
        ImageFolderError: ``root`` is missing or not a folder, a folder under it cannot be listed, it holds no
            image file, or ``image_size`` is not a positive int. ``data[i]`` raises it, naming the file and the
            row, when the file cannot be read or decoded (nothing is skipped silently); also when Pillow or
            torchvision cannot be imported (``pip install 'hookkit[torchvision]'``).
    """

    def __init__(self, root: str | os.PathLike[str], *, image_size: int = 224) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ImageFolderError(f"image_size must be a positive int, got {image_size!r}")
        _imaging()  # no Pillow or torchvision: say so now, before the folder is searched or a model is built
        self.root = Path(root)
        self.image_size = image_size
        self.resize_size = round(image_size / _CROP_FRACTION)
        self.files: list[str] = _find_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        rel = self.files[index]  # IndexError out of range, as a sequence should
        row = index % len(self.files)
        path = self.root / rel
        try:
            image = _load_rgb(path)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise ImageFolderError(
                f"cannot read image {str(path)!r} (row {row} of {len(self.files)}): {type(exc).__name__}: {exc}"
            ) from exc
        return self._preprocess(image)

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        F = _imaging()[1]
        image = F.resize(image, [self.resize_size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        image = F.center_crop(image, [self.image_size, self.image_size])
        x = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        return F.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))

    def __repr__(self) -> str:
        return f"ImageFiles({str(self.root)!r}, image_size={self.image_size}): {len(self.files)} images"


def write_file_list(files: Iterable[str], path: str | os.PathLike[str]) -> Path:
    """Write ``files`` to ``path`` (usually ``OUT/files.txt``), one per line in row order, atomically.

        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "files.txt"
        >>> _ = write_file_list(["cat/1.png", "dog/0.png"], out)
        >>> out.read_text()
        'cat/1.png\\ndog/0.png\\n'

    The lines go to a temporary file in the same folder that then replaces ``path`` (``os.replace``), so a reader
    sees the old list or the new one, never half of one. Every line ends with ``\\n``; UTF-8.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ImageFolderError: a name holds a line break (it could not be read back line by line).
    """
    path = Path(path)
    lines = list(files)
    for i, name in enumerate(lines):
        if "\n" in name or "\r" in name:
            raise ImageFolderError(f"file name of row {i} holds a line break, so files.txt cannot list it: {name!r}")
    write_bytes(path, "".join(name + "\n" for name in lines).encode("utf-8", "surrogateescape"))
    return path


def _find_images(root: Path) -> list[str]:
    """The relative POSIX paths of the image files under ``root``, sorted; raises when there are none."""
    if not root.exists():
        raise ImageFolderError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ImageFolderError(f"image folder {str(root)!r} is not a directory; pass the folder holding the images")

    def fail(err: OSError) -> None:
        raise ImageFolderError(f"cannot list folder {err.filename!r} under image folder {str(root)!r}: "
                               f"{err.strerror or err}") from err

    found: list[str] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of folders walked: a symlink cycle is walked once
    for folder, dirs, names in os.walk(root, onerror=fail, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_folder = Path(folder).relative_to(root).parts
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append("/".join((*rel_folder, name)))
    if not found:
        raise ImageFolderError(
            f"no image files found under {str(root)!r}: looked recursively for {', '.join(IMAGE_EXTENSIONS)} "
            "(any case), skipping hidden files and folders"
        )
    found.sort()
    return found


def _load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB image."""
    with _imaging()[0].open(path) as image:
        image.load()  # decode now: a truncated file fails here, inside the try that names it
        if image.mode in _SIXTEEN_BIT_MODES:
            image = image.point(lambda v: v * (1 / 256)).convert("L")  # 16-bit -> 8-bit, not clipped at 255
        elif image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
        return image.convert("RGB")
