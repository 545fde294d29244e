"""The ``hookkit`` command: `layers` discovers names, `demo` captures them, bad input is one line and exit code 2."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import hookkit
from hookkit.cli import DEMO_LAYERS, demo_image, main, run, run_demo
from hookkit.cli.models import ModelSpecError, load_model

from _optional import needs_torchvision, torchvision
from conftest import hook_count

TINY_MODULE = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))  # a parameter of its own, next to children
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x) * self.gain)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.also_head = self.head  # one module under two names

    def forward(self, x):
        return self.head(self.block(x))


def make():
    return Tiny()


instance = Tiny()


def not_a_model():
    return 42
"""

TINY_TREE = """\
Tiny (tinymodels:make, weights as the factory made them) · 34 params · 5 names
├── block  Block  24 (own 4)
│   ├── block.fc  Linear  20
│   └── block.act  ReLU  0
├── head  Linear  10
└── also_head  Linear  10  same module as head
Counts include children; (own N): parameters a parent holds itself.
Pass a name, or a glob like 'layer*.0.conv1', to hookkit.capture(model, ...).
"""


@pytest.fixture
def tiny_module(user_module) -> Path:
    """`tinymodels` importable from a fresh folder, as a user's own model file would be."""
    return user_module("tinymodels", TINY_MODULE)


def invoke(argv: list[str], width: int = 120) -> tuple[int, str]:
    """Run the command in-process on a recording console; return (exit code, rendered text)."""
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    code = run(argv, console=console)
    return code, console.file.getvalue()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- hookkit layers ------------------------------------------------------------------------------------------------
@needs_torchvision
def test_layers_lists_every_capturable_name_with_class_and_torch_param_counts():
    code, out = invoke(["layers", "torchvision:resnet18"])
    assert code == 0
    model = torchvision.models.resnet18()
    for name in hookkit.layer_names(model):
        assert f"{name}  " in out
    assert "layer1.0.conv1  Conv2d  36,864" in out
    assert f"layer1  Sequential  {n_params(model.layer1):,}" in out
    assert f"layer4.0.downsample  Sequential  {n_params(model.layer4[0].downsample):,}" in out
    header = out.splitlines()[0]
    assert header.startswith(f"ResNet (torchvision:resnet18, random weights) · {n_params(model):,} params")
    assert max(len(line) for line in out.splitlines()) <= 120


@needs_torchvision
def test_layers_table_shows_own_and_total_parameters():
    code, out = invoke(["layers", "torchvision:resnet18", "--table"])
    assert code == 0
    model = torchvision.models.resnet18()
    row = next(line for line in out.splitlines() if line.strip().startswith("layer2.0.downsample "))
    assert row.split()[-2:] == ["0", f"{n_params(model.layer2[0].downsample):,}"]
    fc_row = next(line for line in out.splitlines() if line.startswith("fc "))
    assert fc_row.split()[1:] == ["Linear", "513,000", "513,000"]


@needs_torchvision
def test_layers_depth_keeps_only_shallow_names():
    code, out = invoke(["layers", "torchvision:resnet18", "--depth", "1"])
    assert code == 0
    assert "layer4  Sequential" in out and "fc  Linear" in out
    assert "layer1.0" not in out
    assert "57 deeper names hidden by --depth 1." in out


@needs_torchvision
def test_layers_filter_selects_like_capture_and_keeps_ancestors():
    code, out = invoke(["layers", "torchvision:resnet18", "--filter", "layer*.0.conv1"])
    assert code == 0
    assert "4 match 'layer*.0.conv1'" in out
    for i in range(1, 5):
        assert f"layer{i}.0.conv1  Conv2d" in out
        assert f"layer{i}.0  BasicBlock" in out  # ancestors, for the tree
    assert "layer1.1" not in out and "layer1.0.bn1" not in out and "fc  " not in out


def test_layers_of_a_user_factory_matches_the_golden_tree(tiny_module: Path):
    code, out = invoke(["layers", "tinymodels:make"])
    assert code == 0
    assert out == TINY_TREE


@pytest.mark.parametrize("spec", ["tinymodels:make", "tinymodels:Tiny", "tinymodels:instance"])
def test_user_specs_accept_factories_classes_and_module_objects(tiny_module: Path, spec: str):
    model = load_model(spec)
    assert type(model).__name__ == "Tiny"
    assert not model.training
    code, out = invoke(["layers", spec, "--table"])
    assert code == 0
    assert "block.fc" in out and "Linear" in out


def test_weights_file_is_loaded_into_the_model(tiny_module: Path, tmp_path: Path):
    source = load_model("tinymodels:make")
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.25)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model("tinymodels:make", weights=str(path))
    for (name, p), q in zip(loaded.named_parameters(), source.parameters(), strict=True):
        assert torch.equal(p, q), name
    code, out = invoke(["layers", "tinymodels:make", "--weights", str(path)])
    assert code == 0 and f"weights from {path}" in out


def test_weights_that_do_not_fit_are_a_spec_error(tiny_module: Path, tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(ModelSpecError, match=r"does not fit model spec 'tinymodels:make'.*missing key"):
        load_model("tinymodels:make", weights=str(path))
    mismatched = tmp_path / "mismatched.pt"
    state = load_model("tinymodels:make").state_dict()
    state["head.weight"] = torch.zeros(3, 4)
    torch.save(state, mismatched)
    with pytest.raises(ModelSpecError, match="size mismatch for head.weight"):
        load_model("tinymodels:make", weights=str(mismatched))


@needs_torchvision
def test_torchvision_models_are_built_without_downloading(monkeypatch: pytest.MonkeyPatch):
    def no_download(*args, **kwargs):
        raise AssertionError("hookkit tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = load_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")  # its backbone downloads by default
    assert not model.training


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(*(["layers", "resnet18"], "did you mean 'torchvision:resnet18'"), marks=needs_torchvision),
        pytest.param(*(["layers", "torchvision:resnet1800"], "Did you mean 'resnet18'"), marks=needs_torchvision),
        (["layers", "nosuchpkg.mod:f"], "cannot import 'nosuchpkg.mod'"),
        (["layers", "math:sqrt"], "the factory must take no arguments and return an nn.Module"),
        (["layers", "tinymodels:not_a_model"], "returned int, not a torch.nn.Module"),
        (["layers", "tinymodels:mkae"], "has no attribute 'mkae'. Did you mean 'make'?"),
        pytest.param(["layers", "torchvision:resnet18", "--weights", "no/such/file.pt"], "does not exist",
                     marks=needs_torchvision),
        pytest.param(["demo", "--model", "resnet18"], "did you mean 'torchvision:resnet18'", marks=needs_torchvision),
    ],
)
def test_bad_model_specs_exit_2_with_one_line_naming_the_spec(argv, expected, tiny_module, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hookkit: error: ")
    spec = argv[1] if argv[0] == "layers" else argv[2]
    assert repr(spec) in lines[0]
    assert expected in lines[0]
    assert "Traceback" not in captured.err


def test_bad_specs_raise_model_spec_error_which_is_a_value_error():
    for spec in ["resnet18", "torchvision:resnet1800", "nosuchpkg.mod:f", "math:sqrt", ":x", "torchvision:"]:
        with pytest.raises(ModelSpecError) as info:
            load_model(spec)
        assert isinstance(info.value, hookkit.HookkitError) and isinstance(info.value, ValueError)
        assert repr(spec) in str(info.value) and "\n" not in str(info.value)


@needs_torchvision
def test_unknown_layer_filter_and_demo_layer_exit_2_with_close_names(capsys):
    assert main(["layers", "torchvision:resnet18", "--filter", "layr1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hookkit: error: no layer 'layr1' in ResNet. Did you mean 'layer1'")
    assert main(["demo", "--layers", "conv1", "layer9"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # checked before anything is printed
    assert captured.err.count("\n") == 1 and "no layer 'layer9'" in captured.err


@pytest.mark.parametrize("command", ["layers", "demo"])
def test_help_of_each_subcommand_exits_0(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: hookkit {command}" in capsys.readouterr().out


def test_usage_errors_exit_2_without_a_traceback(capsys):
    assert main(["--nope"]) == 2  # bare `hookkit` prints the help (tests/test_cli_help.py)
    assert main(["layers", "torchvision:resnet18", "--depth", "0"]) == 2
    err = capsys.readouterr().err
    assert "expected a whole number >= 1, got 0" in err and "Traceback" not in err


# -- hookkit demo --------------------------------------------------------------------------------------------------
@needs_torchvision
def test_demo_shows_every_layer_and_that_hooks_were_removed():
    code, out = invoke(["demo"])
    assert code == 0
    assert "random weights" in out
    table_rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in ([n] for n in DEMO_LAYERS)}
    assert list(table_rows) == list(DEMO_LAYERS)
    assert "1×512×7×7" in table_rows["layer4"] and "float32" in table_rows["layer4"]
    # one per layer, and the two on the model that count its forwards (what cap[name] reads)
    assert "✓ every hook was removed: 0 before capture, 8 added while open, 0 after" in out
    assert "top-5 logit indices: " in out


@needs_torchvision
def test_demo_output_is_reproducible():
    assert invoke(["demo", "--layers", "layer4"])[1] == invoke(["demo", "--layers", "layer4"])[1]
    assert invoke(["demo", "--layers", "layer4"])[1] != invoke(["demo", "--layers", "layer4", "--seed", "1"])[1]


@needs_torchvision
def test_run_demo_removes_exactly_its_own_hooks_and_reports_torch_values():
    model = torchvision.models.resnet18().eval()
    seen = []
    mine = model.layer2.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # a user's hook stays
    before = hookkit.hook_census(model)
    x = torch.randn(1, 3, 96, 96)
    result = run_demo(model, ["layer1", "layer2", "layer*.0.relu", "fc"], console=Console(file=io.StringIO()), x=x)
    assert hookkit.hook_census(model) == before
    assert result["hooks_unchanged"] is True
    assert result["hooks_before"] == result["hooks_after"] == hook_count(model) == 1
    assert result["hooks_during"] == 1 + 7 + 2  # the user's, one per layer, two that count the model's forwards
    assert len(seen) == 1
    mine.remove()

    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        layer1 = model.layer1(h)
        logits = model(x)
    stats = result["layers"]["layer1"]
    assert stats["shape"] == (1, 64, 24, 24) and stats["dtype"] == "float32" and stats["calls"] == 1
    assert stats["mean"] == pytest.approx(layer1.mean().item(), rel=1e-5)
    assert stats["max"] == pytest.approx(layer1.max().item(), rel=1e-6)
    assert stats["zeros"] == pytest.approx((layer1 == 0).float().mean().item())
    assert result["layers"]["layer1.0.relu"]["calls"] == 2  # BasicBlock calls its ReLU twice
    assert [i for i, _ in result["top5"]] == logits[0].topk(5).indices.tolist()


def test_run_demo_sees_a_hook_swapped_during_the_forward_that_counting_would_miss():
    class Swaps(nn.Module):
        """Its forward removes a hook and registers another: the number of hooks stays the same."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.handle = self.fc.register_forward_hook(lambda m, i, o: None)

        def forward(self, x):
            self.handle.remove()
            self.handle = self.fc.register_forward_hook(lambda m, i, o: None)
            return self.fc(x)

    out = Console(file=io.StringIO(), width=200)
    result = run_demo(Swaps(), ["fc"], console=out, x=torch.randn(1, 4))
    assert result["hooks_before"] == result["hooks_after"] == 1
    assert result["hooks_unchanged"] is False
    assert "✗ hooks left behind: 1 before the capture, 1 after it closed" in out.file.getvalue()
    assert "fc._forward_hooks" in out.file.getvalue()


def test_run_demo_lists_a_selected_layer_that_never_ran():
    class SkipsOne(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    out = Console(file=io.StringIO(), width=120)
    result = run_demo(SkipsOne(), ["used", "unused"], console=out, x=torch.randn(1, 4))
    assert result["layers"]["used"]["calls"] == 1
    assert result["layers"]["unused"]["calls"] == 0
    assert "did not run" in out.file.getvalue()
    assert result["top5"] == [] and "not (1, classes) logits" in out.file.getvalue()


def test_run_demo_on_a_model_that_rejects_the_image_is_a_value_error():
    model = nn.Linear(4, 4)
    model.inner = nn.Identity()
    before = hookkit.hook_census(model)
    with pytest.raises(ValueError, match=r"Linear failed on the demo input, a tensor of shape \(1, 3, 224, 224\)"):
        run_demo(model, ["inner"], console=Console(file=io.StringIO()))
    assert hookkit.hook_census(model) == before


def test_demo_image_is_deterministic_and_in_range():
    img = demo_image()
    assert img.shape == (3, 224, 224)
    assert torch.equal(img, demo_image())
    assert not torch.equal(img, demo_image(seed=1))
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0.1


# -- the real commands ---------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "120", "PYTHONWARNINGS": "ignore"}


@needs_torchvision
def test_python_m_hookkit_layers_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "hookkit", "layers", "torchvision:resnet18"], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "layer1.0.conv1  Conv2d  36,864" in proc.stdout
    assert proc.stderr == ""


def _console_script() -> str:
    found = Path(sys.executable).parent / "hookkit"
    if found.exists():
        return str(found)
    which = shutil.which("hookkit")
    if which is None:
        pytest.skip("the hookkit console script is not installed")
    return which


@needs_torchvision
def test_console_script_runs_the_demo():
    proc = subprocess.run([_console_script(), "demo"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in DEMO_LAYERS:
        assert f"\n{name} " in proc.stdout
    assert "every hook was removed" in proc.stdout


def test_console_script_finds_a_model_in_the_working_directory_and_fails_in_one_line(tmp_path: Path):
    (tmp_path / "tinymodels.py").write_text(TINY_MODULE)
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    ok = subprocess.run([_console_script(), "layers", "tinymodels:make"], capture_output=True, text=True,
                        env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == TINY_TREE
    bad = subprocess.run([_console_script(), "layers", "tinymodels:not_a_model"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("hookkit: error: model spec 'tinymodels:not_a_model'")
    assert bad.stderr.count("\n") == 1
