"""Shared test helpers: the hook census and small models with awkward habits."""

from __future__ import annotations

import sys
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from hookkit import hook_census  # noqa: F401  (the tests' census is the public one)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(getattr(m, attr)) for m in model.modules() for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                                     "_backward_hooks", "_backward_pre_hooks")
    )


Pair = namedtuple("Pair", ["first", "second"])


@dataclass
class Out:
    logits: torch.Tensor
    extra: Any = None


class NestedOutputs(nn.Module):
    """Returns tuples with None, namedtuples, dicts and dataclasses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tup = TupleWithNone()
        self.named = NamedTupleOut()
        self.dict = DictOut()
        self.dc = DataclassOut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        a, none, b = self.tup(h)
        p = self.named(a)
        d = self.dict(p.first + b)
        o = self.dc(d["y"] * d["nested"][0])
        return o.logits + o.extra["z"]


class TupleWithNone(nn.Module):
    def forward(self, x):
        return x * 2, None, x + 1


class NamedTupleOut(nn.Module):
    def forward(self, x):
        return Pair(x.sin(), x.cos())


class DictOut(nn.Module):
    def forward(self, x):
        return {"y": x * 3, "nested": [x - 1, (x.abs(), None)], "name": "static"}


class DataclassOut(nn.Module):
    def forward(self, x):
        return Out(logits=x.tanh(), extra={"z": x.exp()})


class SharedReLU(nn.Module):
    """One ReLU module called three times per forward (the reused-module case baukit keeps only once)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.head(self.relu(x - 0.1))


class InplaceAfter(nn.Module):
    """A Linear whose output is changed in place right after (the full-backward-hook crash case)."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``user_module("mymodels", SOURCE)``: write a module into a fresh folder and make it importable (fresh, not a
    cached copy), as a user's own model file would be for ``hookkit ... mymodels:factory``; returns the folder."""

    def make(name: str, source: str) -> Path:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return tmp_path

    return make


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- golden files: printed output compared with tests/golden/, rewritten only on request ---------------------------
GOLDEN_DIR = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/* from the current output instead of comparing")


@pytest.fixture
def golden(request: pytest.FixtureRequest):
    """``golden("trace_simplenet.txt", text)``: assert ``text`` equals the stored file (or rewrite it with
    ``pytest --update-golden``). Formatting changes are then deliberate, and visible in the diff."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str) -> None:
        path = GOLDEN_DIR / name
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"no golden file {path}: run pytest --update-golden once and review it"
        expected = path.read_text()
        assert text == expected, f"output differs from {path} (pytest --update-golden rewrites it after review)"

    return check


@pytest.fixture(autouse=True)
def torch_state_unchanged():
    """Every test leaves torch's global hook state as it found it: global module hooks and flags, grad, inference and
    anomaly mode, and this thread's stack of torch function modes (hookkit's op taps push one inside a forward). The
    per-model part of the census is each test's own business (they compare ``hook_census(model)``)."""
    before = _torch_state()
    yield
    assert _torch_state() == before, "a test left torch's global hook state or function-mode stack changed"


def _torch_state() -> dict[str, Any]:
    census = hook_census(nn.Module())
    # dynamo's config appears when a test first imports dynamo; whether it changed is test_compiled.py's to check,
    # except the flag an open hookkit block turns off (a block left open keeps compiled code guarding on hooks)
    state = {k: v for k, v in census.items() if not k.startswith("<root>") and k != "dynamo.config"}
    config = sys.modules.get("torch._dynamo.config")
    state["skip_nnmodule_hook_guards"] = getattr(config, "skip_nnmodule_hook_guards", True)  # True: its default
    return state
