"""The image-folder dataset behind ``hookkit extract --data FOLDER``: order, preprocessing, files.txt, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _optional import importorskip_torchvision

# Image folders are a torchvision feature (pip install 'hookkit[torchvision]'): the whole file needs it.
importorskip_torchvision()

from PIL import Image
from torchvision.transforms import v2

from hookkit import HookkitError
from hookkit.cli.images import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, ImageFolderError, write_file_list

# Created in this order, which is not the sorted order, so a dataset that kept the filesystem's order would fail.
EXPECTED_FILES = [
    "apple/a.PNG",
    "apple/b.jpeg",
    "apple/sub/deep.bmp",
    "banana/gray.png",
    "banana/palette.gif",
    "banana/rgba.png",
    "cherry/x.jpg",
    "root.webp",
    "zebra.tif",
]


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image with some noise: resizing it exercises the interpolation, not just a constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for d in ("zebra_dir_unused", "cherry", "banana", "apple/sub", ".hidden"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "zebra_dir_unused" / "readme.md").write_text("not an image")
    Image.fromarray(_pixels(300, 260, 1)).save(root / "zebra.tif")
    Image.fromarray(_pixels(240, 320, 2)).save(root / "cherry" / "x.jpg", quality=90)
    Image.fromarray(_pixels(250, 300, 3)).convert("RGBA").save(root / "banana" / "rgba.png")
    Image.fromarray(_pixels(280, 280, 4)).convert("L").save(root / "banana" / "gray.png")
    Image.fromarray(_pixels(260, 300, 5)).convert("P").save(root / "banana" / "palette.gif")
    Image.fromarray(_pixels(256, 256, 6)).save(root / "apple" / "b.jpeg")
    Image.fromarray(_pixels(400, 300, 7)).save(root / "apple" / "a.PNG")
    Image.fromarray(_pixels(230, 240, 8)).save(root / "apple" / "sub" / "deep.bmp")
    Image.fromarray(_pixels(300, 300, 9)).save(root / "root.webp")
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    Image.fromarray(_pixels(100, 100, 10)).save(root / ".hidden" / "secret.png")
    Image.fromarray(_pixels(100, 100, 11)).save(root / "apple" / ".dotfile.png")
    return root


def _reference(path: Path, *, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """ImageNet evaluation preprocessing built independently from torchvision.transforms.v2 (PIL backend)."""
    transform = v2.Compose([
        v2.Resize(resize),
        v2.CenterCrop(crop),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def test_files_are_found_recursively_sorted_and_non_images_and_hidden_ones_skipped(image_tree: Path) -> None:
    data = ImageFiles(image_tree)
    assert data.files == EXPECTED_FILES
    assert len(data) == len(EXPECTED_FILES)
    assert data.root == image_tree


def test_order_is_the_sorted_relative_path_not_the_filesystem_order(
        image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rows whether the filesystem lists folders and files forwards or backwards."""
    forwards = ImageFiles(image_tree).files
    real_walk = os.walk

    def backwards_walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        for folder, dirs, names in real_walk(*args, **kwargs):
            dirs.reverse()  # in place: pruning by the caller still reaches os.walk
            names.reverse()
            yield folder, dirs, names

    monkeypatch.setattr(os, "walk", backwards_walk)
    assert ImageFiles(image_tree).files == forwards == EXPECTED_FILES
    assert ImageFiles(str(image_tree)).files == EXPECTED_FILES  # a str root works the same


def test_flat_folder_works(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "c.JPG"):
        Image.fromarray(_pixels(64, 80, 0)).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    assert ImageFiles(tmp_path).files == ["a.png", "b.png", "c.JPG"]


def test_every_item_is_a_float32_3x224x224_tensor(image_tree: Path) -> None:
    data = ImageFiles(image_tree)
    for i in range(len(data)):
        x = data[i]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32, data.files[i]
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_preprocessing_matches_torchvision_v2_reference(image_tree: Path, name: str) -> None:
    data = ImageFiles(image_tree)
    got = data[data.files.index(name)]
    torch.testing.assert_close(got, _reference(image_tree / name), atol=1e-5, rtol=0)


def test_preprocessing_is_close_to_the_tensor_backend_too(image_tree: Path) -> None:
    """The PIL and tensor resizes differ by rounding only; a gross error (no antialias, wrong size) would not."""
    data = ImageFiles(image_tree)
    i = data.files.index("apple/a.PNG")
    tensor_pipeline = v2.Compose([
        v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
    ])
    with Image.open(image_tree / "apple/a.PNG") as image:
        expected = tensor_pipeline(image.convert("RGB"))
    assert (data[i] - expected).abs().mean() < 0.01


def test_solid_colour_image_gives_the_normalized_colour_everywhere(tmp_path: Path) -> None:
    rgb = (200, 100, 30)
    Image.new("RGB", (333, 251), rgb).save(tmp_path / "solid.png")
    x = ImageFiles(tmp_path)[0]
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    torch.testing.assert_close(x, expected[:, None, None].expand(3, 224, 224), atol=1e-5, rtol=0)


def test_grayscale_becomes_three_equal_channels_before_normalizing(image_tree: Path) -> None:
    data = ImageFiles(image_tree)
    x = data[data.files.index("banana/gray.png")]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    raw = x * std + mean
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[0], raw[2], atol=1e-5, rtol=0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((50, 60), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    x = ImageFiles(tmp_path, image_size=32)[0]
    raw = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(raw, torch.full_like(raw, 128 / 255), atol=1e-5, rtol=0)


def test_palette_with_transparency_converts_without_warning(tmp_path: Path) -> None:
    image = Image.fromarray(_pixels(40, 40, 3)).convert("P")
    image.save(tmp_path / "p.png", transparency=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageFiles(tmp_path, image_size=32)[0].shape == (3, 32, 32)


def test_image_size_64_resizes_to_73_then_crops_64(image_tree: Path) -> None:
    data = ImageFiles(image_tree, image_size=64)
    assert data.resize_size == 73 and ImageFiles(image_tree).resize_size == 256
    for name in ("apple/a.PNG", "cherry/x.jpg", "banana/rgba.png"):
        got = data[data.files.index(name)]
        assert got.shape == (3, 64, 64)
        torch.testing.assert_close(got, _reference(image_tree / name, resize=73, crop=64), atol=1e-5, rtol=0)


def test_negative_index_and_out_of_range(image_tree: Path) -> None:
    data = ImageFiles(image_tree, image_size=16)
    torch.testing.assert_close(data[-1], data[len(data) - 1])
    with pytest.raises(IndexError):
        data[len(data)]


def test_dataloader_yields_batches_in_file_order(image_tree: Path) -> None:
    data = ImageFiles(image_tree, image_size=32)
    batches = list(torch.utils.data.DataLoader(data, batch_size=3))
    assert [b.shape for b in batches] == [(3, 3, 32, 32)] * 3
    torch.testing.assert_close(torch.cat(batches), torch.stack([data[i] for i in range(len(data))]))
    for i, name in enumerate(data.files):
        torch.testing.assert_close(batches[i // 3][i % 3], _reference(image_tree / name, resize=37, crop=32),
                                   atol=1e-5, rtol=0)


def test_dataloader_with_workers_keeps_file_order(image_tree: Path) -> None:
    data = ImageFiles(image_tree, image_size=32)
    batches = list(torch.utils.data.DataLoader(data, batch_size=3, num_workers=2))
    torch.testing.assert_close(torch.cat(batches), torch.stack([data[i] for i in range(len(data))]))


def test_write_file_list_writes_one_path_per_line_in_row_order(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    data = ImageFiles(image_tree)
    returned = write_file_list(data.files, out / "files.txt")
    assert returned == out / "files.txt"
    assert (out / "files.txt").read_bytes() == "".join(f + "\n" for f in EXPECTED_FILES).encode()
    assert (out / "files.txt").read_text().splitlines() == data.files
    assert sorted(p.name for p in out.iterdir()) == ["files.txt"]  # no temp file left behind


def test_write_file_list_replaces_atomically_through_a_temp_file_in_the_same_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "files.txt"
    target.write_text("old\n")
    calls: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        calls.append((str(src), str(dst)))
        assert Path(dst).read_text() == "old\n"  # the old list is intact until the swap
        assert Path(src).read_text() == "a.png\nb/c.png\n"  # the new one is complete before it
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_file_list(iter(["a.png", "b/c.png"]), target)
    assert len(calls) == 1
    assert Path(calls[0][0]).parent == tmp_path and calls[0][1] == str(target)
    assert target.read_text() == "a.png\nb/c.png\n"


def test_write_file_list_failure_leaves_old_file_and_no_temp(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "files.txt"
    target.write_text("old\n")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk on fire"):
        write_file_list(["a.png"], target)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["files.txt"]


def test_write_file_list_refuses_a_name_with_a_line_break(tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError, match="row 1"):
        write_file_list(["a.png", "b\n.png"], tmp_path / "files.txt")
    assert not (tmp_path / "files.txt").exists()


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ImageFolderError, match="does not exist") as info:
        ImageFiles(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, HookkitError) and isinstance(info.value, ValueError)


def test_root_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(f)
    with pytest.raises(ImageFolderError, match="not a directory"):
        ImageFiles(f)


def test_folder_without_images_says_which_extensions_were_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "a.png")
    with pytest.raises(ImageFolderError, match="no image files") as info:
        ImageFiles(tmp_path)
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"):
        assert ext in str(info.value)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError, match="no image files"):
        ImageFiles(tmp_path)


def test_corrupt_image_names_the_file_and_its_row(image_tree: Path) -> None:
    (image_tree / "banana" / "x.png").write_bytes(b"this is not a png at all \x00\x01\x02" * 10)
    data = ImageFiles(image_tree)
    row = data.files.index("banana/x.png")
    assert data[row - 1].shape == (3, 224, 224)  # neighbours still load
    with pytest.raises(ImageFolderError) as info:
        data[row]
    message = str(info.value)
    assert str(image_tree / "banana" / "x.png") in message and f"row {row} of {len(data)}" in message


def test_truncated_image_is_an_error_not_a_partial_image(tmp_path: Path) -> None:
    Image.fromarray(_pixels(200, 200, 0)).save(tmp_path / "t.jpg", quality=95)
    full = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageFolderError, match=r"t\.jpg.*row 0 of 1"):
        ImageFiles(tmp_path)[0]


def test_corrupt_image_in_a_dataloader_is_not_skipped(image_tree: Path) -> None:
    (image_tree / "apple" / "x.png").write_bytes(b"garbage" * 50)
    data = ImageFiles(image_tree, image_size=16)
    with pytest.raises(ImageFolderError, match="x.png"):
        list(torch.utils.data.DataLoader(data, batch_size=3))


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "224"])
def test_bad_image_size_is_an_error(image_tree: Path, size: object) -> None:
    with pytest.raises(ImageFolderError, match="image_size"):
        ImageFiles(image_tree, image_size=size)  # type: ignore[arg-type]


def test_unlistable_subfolder_is_an_error_not_a_silent_gap(
        image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = image_tree / "cherry"
    real_scandir = os.scandir

    def scandir(path=None):  # type: ignore[no-untyped-def]
        if path is not None and Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path) if path is not None else real_scandir()

    monkeypatch.setattr(os, "scandir", scandir)  # as root, chmod 0 would not stop the listing
    with pytest.raises(ImageFolderError, match="cannot list folder") as info:
        ImageFiles(image_tree)
    assert str(locked) in str(info.value) and "Permission denied" in str(info.value)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinked_folders_are_followed_and_a_cycle_is_walked_once(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "a.png")
    root = tmp_path / "root"
    root.mkdir()
    try:
        (root / "linked").symlink_to(real, target_is_directory=True)
        (real / "loop").symlink_to(root, target_is_directory=True)
    except OSError:
        pytest.skip("cannot create symlinks here")
    assert ImageFiles(root).files == ["linked/a.png"]
