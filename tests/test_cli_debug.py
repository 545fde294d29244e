"""The debugging commands: `hookkit trace` and `hookkit summary` on MODEL specs with a random input."""

from __future__ import annotations

import io
import subprocess
import sys

from rich.console import Console

from hookkit.cli import run

from _optional import importorskip_torchvision

# Every test here runs a torchvision model (pip install 'hookkit[torchvision]'): the whole file needs it.
importorskip_torchvision()


def invoke(argv: list[str], width: int = 120) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    code = run(argv, console=console)
    return code, console.file.getvalue()


def test_trace_command_prints_forward_and_backward_events_of_the_chosen_layers():
    code, out = invoke(["trace", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--layers", "layer4.*",
                        "fc", "--backward"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("▷ layer4.0 BasicBlock in: f32[1, 256, 4, 4]")
    assert "◀ fc Linear grad_output: f32[1, 1000] μ=1 σ=0 [1, 1]" in out
    assert lines[-1] == "12 events; every hook removed."
    assert max(len(line) for line in lines) <= 120


def test_trace_command_without_backward_or_stats():
    code, out = invoke(["trace", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--layers", "fc",
                        "--no-stats"])
    assert code == 0
    assert out.splitlines()[:2] == ["▷ fc Linear in: f32[1, 512]", "◁ fc Linear out: f32[1, 1000]"]


def test_bad_shape_model_and_layer_exit_2_with_one_line(capsys):
    assert invoke(["trace", "torchvision:resnet18", "--input-shape", "1,3,x"])[0] == 2
    assert "is not a shape" in capsys.readouterr().err
    assert invoke(["trace", "torchvision:resnet18", "--input-shape", "1,5"])[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("hookkit: error: ResNet rejected a random input of shape (1, 5)") and err.count("\n") == 1
    assert invoke(["trace", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--layers", "layer9"])[0] == 2
    assert "no layer 'layer9'" in capsys.readouterr().err


def test_python_dash_m_trace_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "hookkit", "trace", "torchvision:resnet18", "--input-shape",
                           "1,3,32,32", "--layers", "avgpool"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "avgpool AdaptiveAvgPool2d out: f32[1, 512, 1, 1]" in proc.stdout


def test_summary_command_shows_every_module_call_within_120_columns():
    code, out = invoke(["summary", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--no-timing"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["Layer", "Class", "Output"]
    assert any(line.split()[:3] == ["layer4.1.conv2", "Conv2d", "f32[1,"] for line in lines)
    assert "Time" not in lines[0]
    assert max(len(line) for line in lines) <= 120
    assert "11,689,512 params" in lines[-1]


def test_summary_command_depth_and_bad_input(capsys):
    code, out = invoke(["summary", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--depth", "1"])
    assert code == 0 and "layer1.0" not in out and "layer1 " in out
    assert invoke(["summary", "torchvision:resnet18", "--input-shape", "2,2"])[0] == 2
    assert "rejected a random input" in capsys.readouterr().err
