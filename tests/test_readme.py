"""The README is a front page whose examples print what it shows, whose first two commands are the ones CI relies
on, and whose links and picture are there."""

from __future__ import annotations

import doctest
import re
import tomllib
from pathlib import Path

import pytest

from _optional import importorskip_torchvision

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _doctest_blocks() -> list[str]:
    return [code for code in re.findall(r"^```python\n(.*?)^```", README, re.S | re.M) if ">>> " in code]


def test_readme_examples_print_what_they_show(tmp_path, monkeypatch):
    importorskip_torchvision()  # the 30-second example uses a torchvision ResNet-18
    monkeypatch.chdir(tmp_path)
    blocks = _doctest_blocks()
    assert len(blocks) >= 2
    for number, code in enumerate(blocks):
        test = doctest.DocTestParser().get_doctest(code, {}, f"README.md block {number}", "README.md", 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        assert runner.failures == 0 and runner.tries >= 3, f"README.md block {number}"
    first = blocks[0]
    for shown in ("hookkit.capture(", "grads=True", "hook_census", "True"):
        assert shown in first


def test_readme_first_commands_are_demo_then_tests_and_ci_runs_the_same_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    lines = [line for line in commands.splitlines() if line and not line.startswith("#")]
    assert lines[0].endswith("hookkit demo")
    assert all(line.startswith("python3 -m venv .venv && ") for line in lines[:2])  # any Python >= 3.11
    assert "python3.1" not in README
    test_command = lines[1].split("&&")[-1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci


def test_readme_is_a_front_page_whose_extras_table_covers_every_extra():
    assert len(README.splitlines()) <= 200
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    table = set()
    for row in re.findall(r"^\| (`[a-z].*?) \|", README, re.M):
        table |= set(re.findall(r"`([a-z0-9-]+)`", row))
    assert extras <= table, extras - table
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    for listed in re.findall(r"\.\[([a-z0-9,-]+)\]", commands):
        assert set(listed.split(",")) <= table


def test_readme_links_and_picture_are_in_the_repository():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert not [link for link in links if link.startswith(("/", "http:", "../"))]
    manual = [link for link in links if link.startswith("docs/")]
    assert "docs/api.md" in manual and "docs/examples.md" in manual and len(manual) >= 12
    pictures = re.findall(r"!\[[^\]]+\]\((docs/images/[\w-]+\.png)\)", README)
    assert len(pictures) == 1
    assert (ROOT / pictures[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = [link for link in links if not (ROOT / link).exists()]
    if missing and not (ROOT / "docs" / "guides").is_dir():
        pytest.skip(f"the manual's pages are not in this tree yet: {len(set(missing))} files")
    assert not missing
