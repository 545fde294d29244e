"""`hookkit extract MODEL --layers ... --data IMAGE_FOLDER --out DIR`: rows in file order, files.txt, resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from _optional import importorskip_torchvision

# Image folders are a torchvision feature (pip install 'hookkit[torchvision]'): the whole file needs it.
importorskip_torchvision()

from PIL import Image  # noqa: E402  (comes with torchvision)

import hookkit  # noqa: E402
from hookkit._images import ImageFiles  # noqa: E402
from hookkit.cli import run  # noqa: E402


def make_images(root: Path, n: int = 7) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / ("zebra" if i % 2 else "ant")
        folder.mkdir(parents=True, exist_ok=True)
        img = (torch.rand(30 + i, 41, 3, generator=g) * 255).to(torch.uint8)
        Image.fromarray(img.numpy()).save(folder / f"{i:02d}.png")


def invoke(argv: list[str]) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    return run(argv, console=console), console.file.getvalue()


def test_extract_command_writes_rows_in_file_order_equal_to_the_library_call(tmp_path):
    make_images(tmp_path / "imgs")
    out = tmp_path / "out"
    code, text = invoke(["extract", "torchvision:resnet18", "--layers", "avgpool", "layer3", "--pool", "avg",
                         "--data", str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "3",
                         "--image-size", "64"])
    assert code == 0, text
    files = (out / "files.txt").read_text().splitlines()
    assert files == sorted(files) and len(files) == 7 and files[0].startswith("ant/")
    torch.manual_seed(0)  # the command's --seed default: the same random weights
    model = hookkit.cli.load_model("torchvision:resnet18")
    images = ImageFiles(tmp_path / "imgs", image_size=64)
    ref = hookkit.extract(model, ["avgpool", "layer3"], DataLoader(images, batch_size=7), pool="avg",
                          progress=False)
    for name in ["avgpool", "layer3"]:
        got = np.load(out / f"{name}.npy")
        assert got.shape == ref[name].shape == (7, 512 if name == "avgpool" else 256)
        np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-5)
    assert "7 images" in text


def test_a_changed_folder_is_refused_instead_of_mixing_rows(tmp_path, capsys):
    make_images(tmp_path / "imgs", n=4)
    out = tmp_path / "out"
    args = ["extract", "torchvision:resnet18", "--layers", "avgpool", "--data", str(tmp_path / "imgs"), "--out",
            str(out), "--image-size", "32"]
    assert invoke(args)[0] == 0
    make_images(tmp_path / "imgs", n=6)
    assert invoke(args)[0] == 2
    assert "lists other images" in capsys.readouterr().err
    assert np.load(out / "avgpool.npy").shape == (4, 512, 1, 1)  # what was written stays


def test_bad_folder_and_layer_exit_2(tmp_path, capsys):
    assert invoke(["extract", "torchvision:resnet18", "--layers", "avgpool", "--data", str(tmp_path / "none"),
                   "--out", str(tmp_path / "o")])[0] == 2
    assert "does not exist" in capsys.readouterr().err
    make_images(tmp_path / "imgs", n=2)
    assert invoke(["extract", "torchvision:resnet18", "--layers", "avgpol", "--data", str(tmp_path / "imgs"),
                   "--out", str(tmp_path / "o")])[0] == 2
    assert "Did you mean 'avgpool'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


SLASH_MODULE = """
import torch.nn as nn


def model():
    m = nn.Sequential()
    m.add_module("stem", nn.Conv2d(3, 4, 3))
    m.add_module("enc/0", nn.AdaptiveAvgPool2d(1))
    m.add_module("flat", nn.Flatten())
    return m
"""


def test_the_command_names_the_real_file_of_a_layer_whose_name_is_no_file_name(tmp_path, user_module):
    user_module("slash_models", SLASH_MODULE)
    make_images(tmp_path / "imgs", n=3)
    out = tmp_path / "out"
    wide = Console(file=io.StringIO(), width=1000, color_system=None)  # tmp paths are long: nothing may be cut
    code = run(["extract", "slash_models:model", "--layers", "enc/0", "--data", str(tmp_path / "imgs"),
                "--out", str(out), "--image-size", "32"], console=wide)
    text = wide.file.getvalue()
    assert code == 0, text
    (written,) = [p for p in out.iterdir() if p.suffix == ".npy"]
    assert np.load(written).shape == (3, 4, 1, 1)
    assert written.name in " ".join(text.split())  # the table shows the file that exists, not out/enc/0.npy
