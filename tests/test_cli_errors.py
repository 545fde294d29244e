"""Where the `hookkit` command draws the line (issue 9): a user's mistake is one `hookkit: error:` line and exit code
2; a bug in hookkit (an internal `TypeError`, say) shows its traceback and asks to be reported, exit code 1; and the
command works without the optional torchvision, saying what to install where a feature needs it."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import hookkit
import hookkit.cli
import hookkit.cli._inputs
import hookkit.cli.layers
from hookkit.cli import main, run

BUG_LINE = "hookkit: internal error (a bug): please report it with the traceback above"

LEAF_MODULE = """
import torch.nn as nn


def linear():
    return nn.Sequential(nn.Linear(3, 3))
"""


@pytest.fixture
def leaf_model(user_module) -> str:
    user_module("errors_leaf", LEAF_MODULE)
    return "errors_leaf:linear"


def internal_type_error(*args, **kwargs):
    raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")


def assert_reported_as_a_bug(code: int, err: str, message: str) -> None:
    assert code == 1
    assert "Traceback (most recent call last)" in err and message in err
    assert err.splitlines()[-1] == BUG_LINE
    assert "hookkit: error:" not in err  # not dressed up as the user's mistake


# -- bugs are bugs -------------------------------------------------------------------------------------------------
def test_an_internal_type_error_is_a_bug_with_its_traceback_not_a_user_error(leaf_model, monkeypatch, capsys):
    monkeypatch.setattr(hookkit.cli.layers, "_layer_rows", internal_type_error)
    code = main(["layers", leaf_model])
    assert_reported_as_a_bug(code, capsys.readouterr().err, "TypeError: unsupported operand type(s) for +")


def test_run_lets_a_bug_propagate_for_callers_to_see(leaf_model, monkeypatch, capsys):
    monkeypatch.setattr(hookkit.cli.layers, "_layer_rows", internal_type_error)
    with pytest.raises(TypeError, match="unsupported operand"):
        run(["layers", leaf_model], console=Console(file=io.StringIO()))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [ValueError("bad value"), LookupError("no such key"), KeyError("k")])
def test_library_value_and_lookup_errors_are_bugs_too(error, leaf_model, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(hookkit.cli.layers, "_layer_rows", fail)
    code = main(["layers", leaf_model])
    assert_reported_as_a_bug(code, capsys.readouterr().err, type(error).__name__)


def test_a_bug_in_a_hook_hookkit_registered_is_not_blamed_on_the_users_input(leaf_model, monkeypatch, capsys):
    # The forward runs inside hookkit.trace(); the model is fine, hookkit's own hook fails.
    monkeypatch.setattr(hookkit.debug.trace, "tensor_stats", internal_type_error)
    code = main(["trace", leaf_model, "--input-shape", "2,3"])
    err = capsys.readouterr().err
    assert_reported_as_a_bug(code, err, "TypeError: unsupported operand")
    assert "rejected a random input" not in err


def test_a_model_that_rejects_the_input_is_still_the_users_error(leaf_model, capsys):
    code = main(["trace", leaf_model, "--input-shape", "2,4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("hookkit: error: Sequential rejected a random input of shape (2, 4): mat1 and mat2")


def test_raised_by_hookkit_tells_hookkit_frames_from_the_users():
    def user_forward(module, args):
        raise TypeError("the user's own bug")

    def in_hookkit(module, args):
        raise TypeError("hookkit's bug")

    # The hook's code claims to live in hookkit/record/capture.py, as a hook hookkit registered would.
    in_hookkit.__code__ = in_hookkit.__code__.replace(co_filename=str(Path(hookkit.__file__).parent / "_capture.py"))
    for hook, ours in [(user_forward, False), (in_hookkit, True)]:
        model = nn.Linear(2, 2)
        model.register_forward_pre_hook(hook)
        try:
            model(torch.ones(1, 2))
        except TypeError as exc:
            assert hookkit.cli._inputs.raised_by_hookkit(exc) is ours
    assert hookkit.cli._inputs.raised_by_hookkit(hookkit.HookkitError("any")) is True


def test_user_errors_are_hookkit_errors_and_usage_errors(capsys):
    assert list(hookkit.cli._USER_ERRORS) == [hookkit.HookkitError]
    assert main(["layers"]) == 2  # argparse: the usage line and the error, no traceback
    err = capsys.readouterr().err
    assert err.startswith("usage: hookkit layers") and "Traceback" not in err


# -- torchvision is optional ---------------------------------------------------------------------------------------
WITHOUT_TORCHVISION = """
import sys
sys.modules["torchvision"] = None  # as if not installed: every import of it raises ImportError
sys.modules["PIL"] = None
import hookkit, hookkit.cli
from hookkit.cli import main
assert not [m for m in sys.modules if m.startswith(("torchvision.", "PIL."))]
print("imported")
sys.exit(main(sys.argv[1:]))
"""


def run_without_torchvision(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(WITHOUT_TORCHVISION), *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=120, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin",
                                                                "COLUMNS": "120"})


def test_without_torchvision_the_cli_imports_and_runs_a_users_model(tmp_path):
    (tmp_path / "errors_leaf.py").write_text(LEAF_MODULE)
    proc = run_without_torchvision("layers", "errors_leaf:linear", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout and "0  Linear  12" in proc.stdout
    proc = run_without_torchvision("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "extract" in proc.stdout


@pytest.mark.parametrize(("argv", "hint"), [
    (["layers", "torchvision:resnet18"], "the torchvision:NAME models need torchvision"),
    (["demo"], "the torchvision:NAME models need torchvision"),
    (["extract", "errors_leaf:linear", "--layers", "0", "--data", ".", "--out", "out"],
     "reading image folders needs Pillow and torchvision"),
])
def test_without_torchvision_its_features_say_what_to_install(argv, hint, tmp_path):
    (tmp_path / "errors_leaf.py").write_text(LEAF_MODULE)
    proc = run_without_torchvision(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "imported\n"
    (line,) = proc.stderr.splitlines()
    assert line.startswith("hookkit: error: ") and hint in line
    assert "pip install 'hookkit[torchvision]'" in line
    assert not (tmp_path / "out").exists()
