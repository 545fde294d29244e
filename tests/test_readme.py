"""The README's tour runs as written, and its first two commands are the ones CI relies on."""

from __future__ import annotations

import re
from pathlib import Path

import hookkit

from _optional import importorskip_torchvision
from conftest import hook_census

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_tour_runs_and_leaves_no_hooks():
    torchvision = importorskip_torchvision()  # the tour uses a torchvision ResNet-18
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model, cap = namespace["model"], namespace["cap"]
    assert cap.grad_inputs["relu"] is not None and cap.grads["fc"].shape == (2, 1000)
    assert hookkit.layer_names(model)[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert hook_census(model) == hook_census(torchvision.models.resnet18().eval())


def test_readme_first_commands_are_demo_then_tests_and_ci_runs_the_same_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    lines = [line for line in commands.splitlines() if line and not line.startswith("#")]
    assert lines[0].endswith("hookkit demo")
    test_command = lines[1].split("&&")[-1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci
