"""The ``hookkit`` command helps: bare ``hookkit`` prints the help, every option's help says its default, and
``hookkit plot`` prints its table without matplotlib."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from hookkit.cli import main, run
from hookkit.cli._parser import build_parser

ROOT = Path(__file__).resolve().parents[1]


def parsers(parser: argparse.ArgumentParser, name: str = "hookkit") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every subparser under it, with the command line that reaches it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice, sub in action.choices.items():
                yield from parsers(sub, f"{name} {choice}")


def required_groups(parser: argparse.ArgumentParser) -> set[argparse.Action]:
    return {a for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}


def test_every_option_of_every_command_has_help_that_states_its_default():
    """The rule: every action has help, except --help and --version (argparse's own). An argument the user must
    give (a positional, required=True, or one of a required either-or group) states no default. Every other
    option says "default" in its help: its value in words (a flag: what happens without it), and when the
    default is a value (not None / False) the value itself, each item of a list."""
    problems = []
    commands = list(parsers(build_parser()))
    assert [name for name, _ in commands] == ["hookkit", *(f"hookkit {c}" for c in
                                              ("layers", "demo", "trace", "summary", "extract", "plot"))]
    for name, parser in commands:
        either_or = required_groups(parser)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.metavar or action.dest}"
            if isinstance(action, argparse._SubParsersAction):
                problems += [f"{name} {a.dest}: no help" for a in action._choices_actions if not a.help]
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{where}: no help")
                continue
            text = formatter._expand_help(action)
            if action.required or not action.option_strings or action in either_or:
                continue
            if "default" not in text.lower():
                problems.append(f"{where}: its help does not state its default: {text!r}")
            elif action.default not in (None, False):
                values = action.default if isinstance(action.default, (list, tuple)) else [action.default]
                problems += [f"{where}: the default {v!r} is not in its help: {text!r}" for v in values
                             if str(v) not in text]
    assert not problems, "\n".join(problems)


def test_the_walk_catches_an_option_without_help_or_without_its_default(monkeypatch):
    """The rule above, on a parser with the three mistakes: it fails on each."""
    original = build_parser

    def broken() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["plot"]
        sub.add_argument("--quiet", action="store_true", help="print less")
        sub.add_argument("--dpi", type=int, default=110, help="resolution; default: a good one")
        sub.add_argument("--bare")
        return parser

    monkeypatch.setattr(sys.modules[__name__], "build_parser", broken)
    with pytest.raises(AssertionError) as caught:
        test_every_option_of_every_command_has_help_that_states_its_default()
    message = str(caught.value)
    assert "plot --quiet: its help does not state" in message
    assert "plot --dpi: the default 110 is not in its help" in message
    assert "plot --bare: no help" in message


def test_bare_hookkit_prints_the_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hookkit") and "commands:" in out and "layers" in out and "plot" in out
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "hookkit"], capture_output=True, text=True, timeout=120, env=env,
                            cwd=ROOT)
    assert result.returncode == 0 and result.stdout == out and result.stderr == ""


# -- hookkit plot without matplotlib -----------------------------------------------------------------------------------
def monitor_run(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "monitor.jsonl", "w") as f:
        for step in (0, 10):
            f.write(json.dumps({"step": step, "time": 0.0, "layers": {"fc": {"act_std": 1.0 + step, "nan": 0,
                                                                              "inf": 0}},
                                "params": {"fc.weight": {"grad_norm": 0.5}}, "alerts": []}) + "\n")
    return folder


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` raises ImportError


def plot(argv: list[str]) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    return run(["plot", *argv], console=console), console.file.getvalue()


def test_hookkit_plot_prints_its_table_without_matplotlib_and_says_what_the_png_needs(tmp_path, no_matplotlib,
                                                                                     capsys):
    folder = monitor_run(tmp_path / "exp1")
    code, out = plot([str(folder)])
    assert code == 0 and capsys.readouterr().err == ""
    assert "hookkit monitor: 2 recorded steps (0-10)" in out and "│ fc " in out
    assert "no PNG written" in out and "pip install 'hookkit[plot]'" in " ".join(out.split())
    assert not (folder / "monitor.png").exists()


def test_hookkit_plot_out_without_matplotlib_prints_the_table_then_is_an_error(tmp_path, no_matplotlib, capsys):
    folder = monitor_run(tmp_path / "exp1")
    code, out = plot([str(folder), "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and "hookkit monitor: 2 recorded steps" in out
    assert err.startswith("hookkit: error: --out ") and "pip install 'hookkit[plot]'" in err
    assert not (tmp_path / "m.png").exists()
