"""The examples as a set: each is listed in docs/examples.md with its command, each writes under examples/out/
unless told otherwise, and none points outside the repository. Each example's own behaviour is tested next to the
feature it shows (docs/examples.md names the file); patching_sweep.py is run here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
LISTING = (ROOT / "docs" / "examples.md").read_text()
# The examples that write files, each to examples/out/<its name>/ by default.
WRITERS = ["feature_maps", "gradcam", "monitor_training", "patching_sweep", "train_probe"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_every_example_is_listed_with_its_command_and_the_test_that_runs_it(example):
    row = next((line for line in LISTING.splitlines() if line.startswith(f"| `{example.name}` |")), None)
    assert row is not None, f"docs/examples.md does not list {example.name}"
    assert f"`python examples/{example.name}" in row
    tested_by = re.findall(r"`(tests/test_\w+\.py)`", row)
    assert tested_by and all((ROOT / path).is_file() for path in tested_by)
    assert example.stem in "".join((ROOT / path).read_text() for path in tested_by)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_no_example_points_outside_the_repository(example):
    source = example.read_text()
    for pattern in (r"\.\./", r"\bshared/", r"(?<![\w.])/(tmp|home|work|root|Users|data)/", r"[A-Z]:\\\\"):
        assert not re.search(pattern, source), f"{example.name} names a path outside the repository: {pattern}"


@pytest.mark.parametrize("name", WRITERS)
def test_examples_that_write_files_default_to_examples_out(name):
    source = (ROOT / "examples" / f"{name}.py").read_text()
    assert re.search(rf'Path\(__file__\)\.resolve\(\)\.parent / "out" / "{name}"', source), name
    assert not re.search(r'Path\("[^"]*"\)', source), f"{name} has a default relative to the current folder"
    assert f"examples/out/{name}/" in LISTING


def test_patching_sweep_example_writes_its_heatmaps_where_it_is_told(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "patching_sweep.py"), str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "patching_gpt2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [out]  # nothing in the current folder
