"""Hostile CLI input (issue 8, item 10): each mistake is one `hookkit: error:` line naming the fix, exit code 2, no
traceback, and it is caught before a model is built, a tensor allocated or a file written."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

import hookkit.cli
from hookkit.cli import main, run

LEAF_MODULE = """
import torch.nn as nn


def linear():
    return nn.Linear(3, 3)
"""


@pytest.fixture
def leaf_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`hostile_leaf:linear`, a factory of a model without submodules, importable as a user's file would be."""
    (tmp_path / "hostile_leaf.py").write_text(LEAF_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hostile_leaf", raising=False)
    return "hostile_leaf:linear"


@pytest.fixture
def no_model_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly (not as a user error) if the command gets as far as building the model."""
    def refuse(*args, **kwargs):
        raise RuntimeError("the model was built before the bad input was refused")

    monkeypatch.setattr(hookkit.cli, "load_model", refuse)


def invoke(argv: list[str]) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=120, color_system=None, legacy_windows=False)
    return run(argv, console=console), console.file.getvalue()


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hookkit: error: "), captured.err
    assert "Traceback" not in captured.err and "frame #" not in captured.err
    return lines[0]


def make_images(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(root / f"{i}.png")
    return root


def extract_args(data: Path, out: Path | str, *extra: str) -> list[str]:
    return ["extract", "torchvision:resnet18", "--layers", "avgpool", "--data", str(data), "--out", str(out),
            *extra]


# -- --out ---------------------------------------------------------------------------------------------------------
def test_out_that_is_an_existing_file_is_refused_before_the_model_is_built(tmp_path, capsys, no_model_built):
    data = make_images(tmp_path / "imgs")
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main(extract_args(data, target)) == 2
    line = one_error_line(capsys)
    assert f"--out {str(target)!r} is a file, not a folder" in line
    assert "pass a folder" in line
    assert target.read_text() == "keep me"


def test_out_below_a_file_is_refused_naming_the_file(tmp_path, capsys, no_model_built):
    data = make_images(tmp_path / "imgs")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    assert main(extract_args(data, blocker / "sub" / "feats")) == 2
    line = one_error_line(capsys)
    assert f"lies below {str(blocker)!r}, which is a file" in line and "pass a path outside it" in line
    assert blocker.read_text() == "keep me"


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder on a read-only tmpfs mount (needs root and mount rights; skipped where mounting fails)."""
    target = tmp_path / "ro"
    target.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(target)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a read-only tmpfs here: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=30)


@pytest.mark.parametrize("below", [False, True], ids=["the-mount-itself", "a-new-folder-on-it"])
def test_out_on_a_read_only_mount_is_refused_before_the_model_is_built(tmp_path, read_only_dir, below, capsys,
                                                                      no_model_built):
    data = make_images(tmp_path / "imgs")
    out = read_only_dir / "feats" if below else read_only_dir
    assert main(extract_args(data, out)) == 2
    line = one_error_line(capsys)
    assert f"--out {str(out)!r}" in line and "read-only file system" in line
    assert "choose a writable folder" in line
    assert os.listdir(read_only_dir) == []
