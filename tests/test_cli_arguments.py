"""Every command with a wrong option value: exit code 2, one `error:` line naming the option, no traceback, nothing
written. A typo in a glob (`--layers 'a[z-a]'`) is such a mistake, not an internal error."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

import hookkit
from hookkit.cli import main, run
from hookkit.cli._parser import build_parser

from _optional import needs_torchvision

MODULE = """
import torch.nn as nn


def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""
M = "args_cli:net"
SHAPE = ["--input-shape", "1,3,8,8"]


def make_images(root: Path, n: int = 2) -> None:
    Image = pytest.importorskip("PIL.Image", reason="the image folder needs Pillow: pip install 'hookkit[torchvision]'")

    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((torch.rand(12, 12, 3) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")


@pytest.fixture
def work(tmp_path: Path, user_module) -> Path:
    """A folder with images, a monitor run and a file; what a refused command must leave as it is."""
    user_module("args_cli", MODULE)
    folder = tmp_path / "work"
    make_images(folder / "imgs")
    model = torch.nn.Linear(2, 1)
    with hookkit.monitor(model, every=1, log=folder / "run", summary=False, ) as mon:
        model(torch.ones(1, 2)).sum().backward()
        mon.step()
    (folder / "file.txt").write_text("not a folder\n")
    return folder


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


# (the command line, with {w} for the work folder; what the error line must name)
EXTRACT = ["extract", M, "--layers", "1", "--data", "{w}/imgs", "--out", "{w}/out"]
BAD = [
    (["layers", "no_such_module:net"], "no_such_module"),
    (["layers", M, "--depth", "0"], "--depth"),
    (["layers", M, "--filter", "a[z-a]"], "--filter"),
    (["layers", M, "--filter", "a[z-a]", *SHAPE], "--filter"),
    (["layers", M, "--filter", "nope"], "nope"),
    (["layers", M, "--input-shape", "1,x"], "--input-shape"),
    (["layers", M, "--seed", "x"], "--seed"),
    (["layers", M, "--weights", "{w}/none.pt"], "none.pt"),
    (["layers", M, "--table=yes"], "--table"),
    (["demo", "--model", "no_such_module:net"], "no_such_module"),
    (["demo", "--model", M, "--layers", "a[z-a]"], "layers"),
    (["demo", "--model", M, "--layers", "nope"], "nope"),
    (["demo", "--model", M, "--seed", "x"], "--seed"),
    (["demo", "--model", M, "--weights", "{w}/none.pt"], "none.pt"),
    (["trace", M, *SHAPE, "--layers", "a[z-a]"], "layers"),
    (["trace", M, *SHAPE, "--layers", "nope"], "nope"),
    (["trace", M], "--input-shape"),
    (["trace", M, "--input-shape", "0"], "--input-shape"),
    (["trace", M, *SHAPE, "--seed", "-"], "--seed"),
    (["trace", M, *SHAPE, "--weights", "{w}/none.pt"], "none.pt"),
    (["trace", M, *SHAPE, "--backward=1"], "--backward"),
    (["trace", M, *SHAPE, "--no-stats=1"], "--no-stats"),
    (["summary", M, *SHAPE, "--depth", "0"], "--depth"),
    (["summary", M, *SHAPE, "--layers", "a[z-a]"], "layers"),
    (["summary", M, *SHAPE, "--layers", "nope"], "nope"),
    (["summary", M, *SHAPE, "--no-timing=1"], "--no-timing"),
    (["summary", M, "--input-shape", "1,3,0,8"], "--input-shape"),
    (["summary", M, *SHAPE, "--weights", "{w}/none.pt"], "none.pt"),
    (["summary", M, *SHAPE, "--seed", "1.5"], "--seed"),
    (["extract", "no_such_module:net", *EXTRACT[2:]], "no_such_module"),
    ([*EXTRACT[:3], "a[z-a]", *EXTRACT[4:]], "layers"),
    ([*EXTRACT[:3], "nope", *EXTRACT[4:]], "nope"),
    ([*EXTRACT[:5], "{w}/none", *EXTRACT[6:]], "none"),
    ([*EXTRACT[:4], "--text", "{w}/none.jsonl", *EXTRACT[6:]], "none.jsonl"),
    ([*EXTRACT, "--text", "{w}/file.txt"], "--text"),
    ([*EXTRACT[:7], "{w}/file.txt"], "--out"),
    ([*EXTRACT, "--pool", "mean"], "--pool"),
    ([*EXTRACT, "--batch-size", "0"], "--batch-size"),
    ([*EXTRACT, "--dtype", "float64"], "--dtype"),
    ([*EXTRACT, "--workers", "-1"], "--workers"),
    ([*EXTRACT, "--image-size", "0"], "--image-size"),
    ([*EXTRACT, "--weights", "{w}/none.pt"], "none.pt"),
    ([*EXTRACT, "--seed", "x"], "--seed"),
    ([*EXTRACT, "--max-length", "0"], "--max-length"),
    ([*EXTRACT, "--no-truncation=1"], "--no-truncation"),
    ([*EXTRACT, "--field", "text"], "--field"),
    ([*EXTRACT, "--max-length", "8"], "--max-length"),
    ([*EXTRACT, "--order", "random"], "--order"),
    ([*EXTRACT, "--order", "corpus"], "--order"),  # with --data: it applies to --text only
    (["plot", "{w}/none"], "none"),
    (["plot", "{w}/run", "--stats", "nope"], "nope"),
    (["plot", "{w}/run", "--heatmap=1"], "--heatmap"),
    (["plot", "{w}/run", "--out", "{w}/file.txt/x.png"], "file.txt"),
]


@pytest.mark.parametrize(("argv", "names"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_wrong_option_is_one_error_line_naming_it_with_exit_code_2(work, argv, names, capsys):
    argv = [a.replace("{w}", str(work)) for a in argv]
    before = _listing(work)
    console = Console(file=io.StringIO(), width=120, color_system=None)
    code = run(argv, console=console)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert names in errors[0], err
    assert "Traceback" not in err and "internal error" not in err
    assert _listing(work) == before, "a refused command wrote or removed a file"


def test_every_option_of_every_command_is_in_the_table():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {argv[0] for argv, _ in BAD} == set(commands)
    for name, command in commands.items():
        options = {o for a in command._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        tried = {arg.split("=")[0] for argv, _ in BAD if argv[0] == name for arg in argv}
        assert options <= tried, f"hookkit {name}: no wrong value tried for {sorted(options - tried)}"


def test_a_glob_typo_through_main_is_a_usage_error_not_a_bug(work, capsys):
    """What the console script does: `hookkit layers MODEL --filter 'a[z-a]'` exits 2, one line, no traceback."""
    assert main(["layers", M, "--filter", "a[z-a]"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "hookkit: error: --filter: the pattern 'a[z-a]' is not a valid glob (bad character range z-a in its [...] "
        "set). A set lists characters or ranges low-high, e.g. 'layer[1-4]'; '[!...]' excludes them."]


@needs_torchvision
def test_a_glob_typo_in_demo_layers_is_a_usage_error(capsys):
    assert main(["demo", "--layers", "layer[4-1]"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert "layers: the pattern 'layer[4-1]' is not a valid glob" in err
