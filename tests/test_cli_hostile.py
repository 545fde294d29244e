"""Hostile CLI input (issue 8, item 10): each mistake is one `hookkit: error:` line naming the fix, exit code 2, no
traceback, and it is caught before a model is built, a tensor allocated or a file written."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

import hookkit.cli
import hookkit.cli.images
from hookkit.cli import main, run

from _optional import needs_torchvision

LEAF_MODULE = """
import torch.nn as nn


def linear():
    return nn.Linear(3, 3)
"""


@pytest.fixture
def leaf_models(user_module) -> str:
    """`hostile_leaf:linear`, a factory of a model without submodules, importable as a user's file would be."""
    user_module("hostile_leaf", LEAF_MODULE)
    return "hostile_leaf:linear"


@pytest.fixture
def no_model_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly (not as a user error) if the command gets as far as building the model."""
    def refuse(*args, **kwargs):
        raise RuntimeError("the model was built before the bad input was refused")

    monkeypatch.setattr(hookkit.cli._inputs, "load_model", refuse)


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
    from PIL import Image  # with torchvision: the tests that read images are marked needs_torchvision

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(root / f"{i}.png")
    return root


def extract_args(data: Path, out: Path | str, *extra: str) -> list[str]:
    return ["extract", "torchvision:resnet18", "--layers", "avgpool", "--data", str(data), "--out", str(out),
            *extra]


# -- --out ---------------------------------------------------------------------------------------------------------
@needs_torchvision
def test_out_that_is_an_existing_file_is_refused_before_the_model_is_built(tmp_path, capsys, no_model_built):
    data = make_images(tmp_path / "imgs")
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main(extract_args(data, target)) == 2
    line = one_error_line(capsys)
    assert f"--out {str(target)!r} is a file, not a folder" in line
    assert "pass a folder" in line
    assert target.read_text() == "keep me"


@needs_torchvision
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
@needs_torchvision
def test_out_on_a_read_only_mount_is_refused_before_the_model_is_built(tmp_path, read_only_dir, below, capsys,
                                                                      no_model_built):
    data = make_images(tmp_path / "imgs")
    out = read_only_dir / "feats" if below else read_only_dir
    assert main(extract_args(data, out)) == 2
    line = one_error_line(capsys)
    assert f"--out {str(out)!r}" in line and "read-only file system" in line
    assert "choose a writable folder" in line
    assert os.listdir(read_only_dir) == []


# -- --input-shape -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["trace", "summary"])
def test_an_input_too_large_for_memory_is_refused_before_anything_is_built(command, capsys, no_model_built):
    assert main([command, "torchvision:resnet18", "--input-shape", "1000000,1000000,1000"]) == 2
    line = one_error_line(capsys)
    assert "--input-shape 1000000,1000000,1000" in line
    assert "makes an input (1,000,000,000,000,000 float32 numbers, 3.6 PiB)" in line
    assert "pass a smaller shape" in line


@pytest.mark.parametrize("shape", ["99999999999999999999,4", "4,9223372036854775808"])
def test_a_size_no_tensor_can_have_is_refused_without_cpp_frames(shape, capsys, no_model_built):
    assert main(["trace", "torchvision:resnet18", "--input-shape", shape]) == 2
    line = one_error_line(capsys)
    assert f"--input-shape {shape}" in line and "pass a smaller shape" in line


def test_the_input_limit_is_half_the_physical_memory(monkeypatch, leaf_models, capsys):
    # half: 24 bytes, six float32 numbers
    monkeypatch.setattr(hookkit.cli._inputs, "physical_memory_bytes", lambda: 48)
    code, out = invoke(["summary", leaf_models, "--input-shape", "2,3"])
    assert code == 0, capsys.readouterr().err
    code, out = invoke(["summary", leaf_models, "--input-shape", "7,1"])
    assert code == 2 and out == ""
    line = one_error_line(capsys)
    assert "(7 float32 numbers, 28 B): more than half of this machine's 48 B of memory (24 B)" in line


# -- extract --image-size / --batch-size ---------------------------------------------------------------------------
@needs_torchvision
def test_an_image_size_too_large_for_memory_is_refused_before_any_image_is_decoded(tmp_path, capsys, monkeypatch,
                                                                                 no_model_built):
    data = make_images(tmp_path / "imgs")
    monkeypatch.setattr(hookkit.cli.images.ImageFiles, "__getitem__",
                        lambda self, i: pytest.fail("an image was decoded before the size was checked"))
    out = tmp_path / "out"
    assert main(extract_args(data, out, "--image-size", "100000")) == 2
    line = one_error_line(capsys)
    assert "--image-size 100000" in line and "pass a smaller --image-size or --batch-size" in line
    assert not out.exists()


@needs_torchvision
def test_the_batch_counts_only_the_images_there_are(tmp_path, capsys, monkeypatch, no_model_built):
    data = make_images(tmp_path / "imgs", n=3)
    one_image = 3 * 64 * 64 * 4
    monkeypatch.setattr(hookkit.cli._inputs, "physical_memory_bytes", lambda: 2 * 3 * one_image)
    # --batch-size 64 over 3 images is a batch of 3, which fits: it gets as far as building the model.
    with pytest.raises(RuntimeError, match="the model was built"):  # run() lets what is not a user error through
        run(extract_args(data, tmp_path / "out", "--image-size", "64", "--batch-size", "64"))
    make_images(data, n=4)
    assert main(extract_args(data, tmp_path / "out", "--image-size", "64", "--batch-size", "64")) == 2
    assert "makes a batch of 4 images of 3×64×64 (49,152 float32 numbers, 192.0 KiB)" in one_error_line(capsys)


# -- models without submodules -------------------------------------------------------------------------------------
def test_trace_of_a_model_without_submodules_traces_the_model_itself(leaf_models, capsys):
    # Needs hookkit.trace() to trace the root module when it has no submodules (the lead's change in trace.py).
    code, out = invoke(["trace", leaf_models, "--input-shape", "2,3"])
    assert code == 0, capsys.readouterr().err
    assert "Linear in: f32[2, 3]" in out and "Linear out: f32[2, 3]" in out
    assert out.splitlines()[-1] == "2 events; every hook removed."


def test_summary_of_a_model_without_submodules_says_so(leaf_models, capsys):
    code, out = invoke(["summary", leaf_models, "--input-shape", "2,3", "--no-timing"])
    assert code == 0, capsys.readouterr().err
    assert "Linear: 12 params" in out and "output f32[2, 3]" in out
    note = " ".join(out.split())  # the note may wrap
    assert "Linear has no submodules, so the table has no rows" in note
    assert f"`hookkit trace {leaf_models} --input-shape 2,3` shows its input and output" in note


# -- other numbers out of range ------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["trace", "torchvision:resnet18", "--input-shape", "1,3,8,8", "--seed", "99999999999999999999"],
     "argument --seed: expected a whole number from -2**63 to 2**64-1 (what torch.manual_seed accepts), got "
     "99999999999999999999"),
    (["demo", "--seed", "-99999999999999999999"], "argument --seed: expected a whole number from -2**63"),
    (["extract", "torchvision:resnet18", "--layers", "fc", "--data", "d", "--out", "o", "--batch-size",
      "99999999999999999999"], "argument --batch-size: expected a whole number from 1 to 9223372036854775807"),
    (["extract", "torchvision:resnet18", "--layers", "fc", "--data", "d", "--out", "o", "--workers", "-1"],
     "argument --workers: expected a whole number from 0 to"),
])
def test_numbers_out_of_range_are_usage_errors(argv, expected, capsys, no_model_built):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
