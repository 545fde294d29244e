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
from hookkit.cli import run  # noqa: E402
from hookkit.cli.images import ImageFiles  # noqa: E402


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


# -- Ctrl-C ------------------------------------------------------------------------------------------------------------

_SLOW_MODEL = '''
import time
import torch.nn as nn


class Slow(nn.Module):
    def forward(self, x):
        time.sleep(0.2)
        return x


def make():
    return nn.Sequential(nn.Conv2d(3, 5, 3), Slow(), nn.ReLU())
'''


def test_ctrl_c_is_one_line_with_the_rows_kept_and_the_command_that_resumes_to_the_same_files(tmp_path):
    """SIGINT once some rows are written: one line (no traceback), exit code 130; running the command it names
    resumes (and says from how many rows), and the files are byte-identical to an uninterrupted run's."""
    import os
    import re
    import shlex
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "slowmodel.py").write_text(_SLOW_MODEL)
    make_images(tmp_path / "imgs", n=40)

    def command(out: str) -> list[str]:
        return ["extract", "slowmodel:make", "--layers", "1", "--pool", "avg", "--data", "imgs", "--out", out,
                "--image-size", "16", "--batch-size", "4"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def hookkit_cli(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hookkit", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    proc = subprocess.Popen([sys.executable, "-m", "hookkit", *command("feats")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "feats" / "progress" / "rank-0.rows"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if written(progress):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = stderr.splitlines()
    again = shlex.join(["hookkit", *command("feats")])
    found = re.match(r"hookkit: interrupted: (\d+) of 40 rows", line)
    assert found, line
    kept = int(found.group(1))
    assert line == (f"hookkit: interrupted: {kept} of 40 rows are written to 'feats' and kept; run the same command "
                    f"again to compute the other {40 - kept}: {again}")
    assert 0 < kept < 40 and kept % 4 == 0

    resumed = hookkit_cli(shlex.split(again)[1:])
    assert resumed.returncode == 0, resumed.stderr
    note = " ".join(resumed.stdout.split())
    assert f"40 images ({kept} of them already written by an earlier run, resumed; {40 - kept} computed now)" in note

    whole = hookkit_cli(command("whole"))
    assert whole.returncode == 0, whole.stderr
    assert "already written" not in whole.stdout
    files = sorted(p.name for p in (tmp_path / "feats").iterdir() if p.is_file())
    assert files == sorted(p.name for p in (tmp_path / "whole").iterdir() if p.is_file())
    assert "1.npy" in files and "files.txt" in files
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "feats" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    manifests = [json_of(tmp_path / d / "manifest.json") for d in ("feats", "whole")]
    commands = [m.pop("command") for m in manifests]  # each folder records the command line that wrote it
    assert commands == [{"line": shlex.join(["hookkit", *command(d)]), "cwd": str(tmp_path)}
                        for d in ("feats", "whole")]
    assert manifests[0] == manifests[1]

    again_done = hookkit_cli(command("feats"))
    assert again_done.returncode == 0, again_done.stderr
    assert "all 40 rows were already written by an earlier run: nothing was computed" in " ".join(
        again_done.stdout.split())


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def written(progress: Path) -> bool:
    """Whether a progress file marks a row done (one byte per row, set once its rows are synced)."""
    try:
        return any(progress.read_bytes())
    except OSError:
        return False


def test_op_nodes_in_layers_are_read_as_the_library_reads_them(tmp_path, capsys):
    """--layers goes through the library's one reading of a layer argument: extract takes op and repeated-call
    nodes (FX's names), summary refuses them saying why."""
    make_images(tmp_path / "imgs", n=3)
    out = tmp_path / "out"
    code, text = invoke(["extract", "torchvision:resnet18", "--layers", "layer1.0.add", "layer1.0.relu_1", "flatten",
                         "--pool", "avg", "--data", str(tmp_path / "imgs"), "--out", str(out), "--image-size", "32"])
    assert code == 0, text
    assert np.load(out / "layer1.0.add.npy").shape == (3, 64)
    assert np.load(out / "flatten.npy").shape == (3, 512)
    assert invoke(["summary", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--layers", "layer1.0.add"])[0] == 2
    assert "'layer1.0.add' is an op or repeated-call node, and summary's table" in capsys.readouterr().err
