"""The README is a front page: short, every extra in its table, its links and its one picture in the repository.
(Its code blocks run, and its first two commands are the ones CI relies on: tests/test_docs.py.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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
    assert not [link for link in links if not (ROOT / link).exists()]
