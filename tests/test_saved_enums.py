"""Enum members in a saved capture: saved by their class and name, loaded back as the very same member (and type),
and merged like any other equal non-tensor value."""

from __future__ import annotations

import enum
import json
import warnings

import pytest
import torch
import torch.nn as nn
from test_saved import needs_safetensors, rewritten

import hookkit

try:
    import safetensors
except ImportError:  # the optional extra is not installed
    safetensors = None


class Mode(enum.Enum):
    ADD = "add"
    MUL = "mul"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Inner(nn.Module):
    def forward(self, x, *, mode=Mode.ADD):
        return {"y": x * 2 if mode is Mode.MUL else x + 2, "mode": mode, "level": Level.HIGH,
                "modes": (Mode.ADD, None)}


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x, mode=Mode.MUL)


def _saved(tmp_path):
    model = Outer()
    with hookkit.capture(model, ["inner"], inputs=True) as cap:
        model(torch.randn(2, 3))
    path = tmp_path / "cap.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an enum member is no NotSaved placeholder
        cap.save(path)
    return cap, path


@needs_safetensors
def test_an_enum_member_in_outputs_and_kwargs_comes_back_as_the_same_member(tmp_path):
    cap, path = _saved(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = hookkit.load(path)
    out = loaded["inner"]
    assert out["mode"] is Mode.MUL and type(out["mode"]) is Mode
    assert out["level"] is Level.HIGH and type(out["level"]) is Level  # an IntEnum member, not the int 2
    assert out["modes"][0] is Mode.ADD and out["modes"][1] is None
    assert loaded.kwargs["inner"]["mode"] is Mode.MUL
    assert torch.equal(out["y"], cap["inner"]["y"])


@needs_safetensors
def test_a_file_with_an_enum_member_is_format_2_which_this_hookkit_reads(tmp_path):
    _, path = _saved(tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["hookkit"])
    assert manifest["format"] == 2
    node = manifest["layers"]["inner"]["outputs"][0]["items"][1][1]
    assert {k: node[k] for k in ("type", "module", "qualname", "name")} == {
        "type": "enum", "module": __name__, "qualname": "Mode", "name": "MUL"}


@needs_safetensors
@pytest.mark.parametrize("field, value, why", [
    ("name", "DIV", "has no member 'DIV'"),
    ("qualname", "Gone", "holds no class of that name"),
    ("qualname", "Inner", "is not an enum"),
])
def test_an_enum_member_that_cannot_be_found_comes_back_as_a_placeholder_with_a_warning(tmp_path, field, value,
                                                                                        why):
    _, saved = _saved(tmp_path)

    def edit(manifest):
        manifest["layers"]["inner"]["outputs"][0]["items"][1][1][field] = value

    path = rewritten(saved, tmp_path / "edited.safetensors", edit)
    with pytest.warns(UserWarning, match=why):
        loaded = hookkit.load(path)
    stand_in = loaded["inner"]["mode"]
    assert isinstance(stand_in, hookkit.record.encode.NotSaved) and "Mode.MUL" in stand_in.text
    assert loaded["inner"]["level"] is Level.HIGH


def test_merge_keeps_equal_enum_members_and_refuses_different_ones():
    model = Outer()
    caps = []
    for mode in (Mode.MUL, Mode.MUL, Mode.ADD):
        with hookkit.capture(model.inner, [""]) as cap:
            model.inner(torch.randn(2, 3), mode=mode)
        caps.append(cap)
    merged = hookkit.merge(caps[:2])
    assert merged[""]["mode"] is Mode.MUL and merged[""]["y"].shape == (4, 3)
    differs = (r"capture 2 differs from capture 0 at calls\(''\)\[0\], in outputs\['mode'\]: "
               r"<Mode.MUL: 'mul'> vs <Mode.ADD")
    with pytest.raises(hookkit.ArgumentError, match=differs):
        hookkit.merge(caps)
