"""The package's metadata: a LICENSE file, a PEP 639 license expression, classifiers, keywords and project URLs,
and an sdist that holds the package and its license and leaves the tests (which need the whole repository) out."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_the_license_file_is_the_mit_license_of_the_contributors():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} hookkit contributors$", text, re.M)
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text


def test_the_license_is_a_pep_639_expression_with_its_file_and_no_license_classifier():
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]  # setuptools refuses both
    # setuptools reads a license expression from 77 on; an older one would fail on the string.
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77"


def test_classifiers_say_what_it_is_for_and_which_python():
    classifiers = PROJECT["classifiers"]
    floor = re.fullmatch(r">=(3\.\d+)", PROJECT["requires-python"]).group(1)
    for expected in ("Intended Audience :: Science/Research", "Operating System :: OS Independent",
                     "Topic :: Scientific/Engineering :: Artificial Intelligence", "Typing :: Typed",
                     "Programming Language :: Python :: 3 :: Only", f"Programming Language :: Python :: {floor}"):
        assert expected in classifiers
    assert classifiers == sorted(classifiers) and len(set(classifiers)) == len(classifiers)
    try:
        from trove_classifiers import classifiers as known
    except ImportError:
        return  # the spelling is checked where trove-classifiers is installed
    assert set(classifiers) <= known


def test_keywords_and_project_urls_point_into_the_repository():
    assert "pytorch" in PROJECT["keywords"] and "hooks" in PROJECT["keywords"]
    urls = PROJECT["urls"]
    assert set(urls) >= {"Homepage", "Documentation"}
    for url in urls.values():
        # Relative placeholders until there is a public home: each names a file or folder of the repository.
        assert url.startswith("https://") or (ROOT / url).exists(), url


def test_the_sdist_holds_package_readme_and_license_and_no_tests(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates PEP 639 license expressions (>=77 builds them)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hookkit", src / "hookkit", ignore=ignore)
    shutil.copytree(ROOT / "tests", src / "tests", ignore=ignore)
    build = f"from setuptools.build_meta import build_sdist; print(build_sdist({str(tmp_path / 'dist')!r}))"
    proc = subprocess.run([sys.executable, "-W", "always", "-c", build], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert not re.search(r"license.*deprecat|deprecat.*license", log, re.I | re.S), log
    with tarfile.open(tmp_path / "dist" / proc.stdout.split()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        pkg_info = sdist.extractfile(f"hookkit-{_version()}/PKG-INFO").read().decode()
    assert {"LICENSE", "README.md", "pyproject.toml", "hookkit/__init__.py", "hookkit/py.typed"} <= names
    assert not [name for name in names if name.startswith("tests")]  # left out whole, never half
    assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info


def _version() -> str:
    text = (ROOT / "hookkit" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)
