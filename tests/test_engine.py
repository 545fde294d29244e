"""The engine's seams: its listener base class, its options, and the one call identity under checkpointing."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn as nn

import hookkit
from hookkit.core.engine import Engine, Options
from hookkit.core.listener import Listener

PACKAGE = pathlib.Path(hookkit.__file__).parent


class _GradsOnly(Listener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []

    def grad(self, where, which, i, n, grad):
        self.seen.append((where[0], which, i))


def test_a_listener_overrides_only_the_events_it_needs():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    listener = _GradsOnly()
    with Engine(model, ["0"], listener=listener, keep=False, grads=True, ops=True):
        model(torch.randn(2, 3, requires_grad=True)).sum().backward()
    assert ("0", "output", 0) in listener.seen
    assert ("0", "input", 0) in listener.seen


def test_listener_base_methods_do_nothing():
    base = Listener()
    where = ("0", nn.Linear(1, 1), 0)
    assert base.forward_pre(where, (), {}) is None
    assert base.forward(where, (), torch.ones(1)) is None
    assert base.grad(where, "output", 0, 1, torch.ones(1)) is None


def test_engine_options_are_the_keyword_switches():
    model = nn.Sequential(nn.Linear(3, 3))
    engine = Engine(model, ["0"], inputs=True, stop=True)
    assert engine._opts == Options(inputs=True, stop=True)
    with pytest.raises(TypeError):
        Engine(model, ["0"], input=True)  # a misspelt switch is a bug of the caller inside hookkit


def test_the_engine_class_stays_small():
    tree = ast.parse((PACKAGE / "core" / "engine.py").read_text())
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    assert engine.end_lineno - engine.lineno + 1 < 300


def _calls(name: str) -> list[str]:
    """Modules of the package that call (or import) ``name``."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Name) and node.id == name) or (
                    isinstance(node, ast.alias) and node.name == name):
                found.append(str(path.relative_to(PACKAGE)))
                break
    return sorted(found)


def test_which_call_is_this_under_checkpointing_is_asked_of_one_module():
    """The engine, the op taps, hooks() and edits tell a recomputation apart through core.checkpointing; only it
    (and core.compat, which reads torch) touches the checkpoint regions."""
    assert _calls("checkpoint_regions") == ["core/checkpointing.py"]  # (core.compat defines it)
    users = set(_calls("recomputing")) | set(_calls("CallNumbers")) | set(_calls("inside_checkpoint"))
    assert {"core/engine.py", "core/ops.py", "intervene/hooks.py", "intervene/edits.py"} <= users


@pytest.mark.parametrize("switches", [{}, {"inputs": True}, {"stop": True}, {"grads": True}])
def test_every_hook_stores_an_output_one_way(switches):
    """The fast hook and the engine's full forward hook finish a call through one routine: a plain tensor output
    is kept with its version (nothing copied, no guard list), whatever else is recorded."""
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    engine = Engine(model, ["0"], **switches)
    with engine:
        model(torch.randn(2, 3))
    (call,) = engine.recording.records["0"]
    assert call.version is not None and call.guards == ()
    assert engine.recording.order == ["0"]


@pytest.mark.parametrize("open_block", [
    lambda m: hookkit.capture(m, "0"),
    lambda m: hookkit.trace(m, console=None),
    lambda m: hookkit.hooks(m, forward={"0": lambda mod, args, out: None}),
])
def test_entering_a_block_twice_is_a_usage_error(open_block):
    model = nn.Sequential(nn.Linear(2, 2))
    block = open_block(model)
    with block:
        pass
    with pytest.raises(hookkit.UsageError, match="entered once"), block:
        pass
    assert hookkit.hook_census(model) == hookkit.hook_census(nn.Sequential(nn.Linear(2, 2)))


def test_param_grads_without_keep_tell_the_listener_the_gradient_itself_and_copy_nothing():
    """``keep=False`` with ``param_grads``: the listener reads each parameter's ``.grad`` at the end of the backward
    (the tensor itself, under every name of its layer) and the engine keeps no copy of it (monitor's recorded steps
    rely on this to cost no gradient memory)."""
    from hookkit.core.engine import Engine
    from hookkit.core.listener import Listener
    from hookkit.core.select import select

    class Told(Listener):
        def __init__(self) -> None:
            self.told: list[tuple[str, str, torch.Tensor]] = []

        def param_grad(self, layer: str, pname: str, grad: torch.Tensor) -> None:
            self.told.append((layer, pname, grad))

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    listener = Told()
    with Engine(model, select(model, ["0", "2"], caller="test"), listener=listener, keep=False,
                param_grads=True) as engine:
        model(torch.randn(5, 3)).sum().backward()
    assert engine.recording.param_grads == {}
    assert sorted((layer, pname) for layer, pname, _ in listener.told) == [
        ("0", "bias"), ("0", "weight"), ("2", "bias"), ("2", "weight")]
    params = dict(model.named_parameters())
    assert all(grad is params[f"{layer}.{pname}"].grad for layer, pname, grad in listener.told)
