"""Shared test helpers: the hook census and small models with awkward habits."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Any

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.modules.module as module_mod

def hook_census(model: nn.Module) -> dict[str, Any]:
    """Everything a hookkit block could leave changed, as data: two censuses are equal only if nothing was added,
    removed, swapped or flipped.

    - every module's hook dicts (every attribute with "hook" in its name: forward, pre, backward, always-called,
      with-kwargs, state-dict and load-state-dict hooks, and any torch adds later), its ``_is_full_backward_hook``
      flag and its ``training`` flag;
    - every parameter's and buffer's tensor hooks (``_backward_hooks``, ``_post_accumulate_grad_hooks``);
    - torch's global module hook dicts and flags (``torch.nn.modules.module._global_*``);
    - dynamo's whole config (``skip_nnmodule_hook_guards`` among it) and grad / inference / anomaly mode.
    """
    import torch._dynamo  # noqa: F401  (imported by torchvision anyway; its config is part of the census)

    census: dict[str, Any] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        where = name or "<root>"
        for attr, value in sorted(vars(module).items()):
            if "hook" not in attr:
                continue
            if isinstance(value, dict):
                census[f"{where}.{attr}"] = [(k, v if isinstance(v, bool) else id(v)) for k, v in value.items()]
            else:
                census[f"{where}.{attr}"] = value
        census[f"{where}.training"] = module.training
    tensors = [(f"param {n}", p) for n, p in model.named_parameters(remove_duplicate=False)]
    tensors += [(f"buffer {n}", b) for n, b in model.named_buffers(remove_duplicate=False)]
    for label, t in tensors:
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            census[f"{label}.{attr}"] = list((getattr(t, attr, None) or {}).keys())
    for attr in sorted(vars(module_mod)):
        if attr.startswith("_global_"):
            value = getattr(module_mod, attr)
            census[f"torch.{attr}"] = list(value.items()) if isinstance(value, dict) else value
    census["dynamo.config"] = torch._dynamo.config.get_config_copy()
    census["grad_enabled"] = torch.is_grad_enabled()
    census["inference_mode"] = torch.is_inference_mode_enabled()
    census["anomaly"] = torch.is_anomaly_enabled()
    return census


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
