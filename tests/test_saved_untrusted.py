"""Loading a capture file that someone else made: ``hookkit.load`` imports no module and calls no class's code
because the file says so, and every file it cannot read, crafted or damaged, is one ``SavedCaptureError`` naming
what is wrong, raised before anything is built from it; mistakes in ``load``'s own arguments are argument errors.

The crafted files are consistent lies (``test_saved.rewritten``: the manifest's own SHA-256 fits), so only the checks
after the checksum can catch them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import json
import sys
import textwrap
import warnings
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from test_saved import assert_captures_equal, assert_same, needs_safetensors, rewritten

import hookkit

from conftest import NestedOutputs, Out, Pair, hook_census

pytestmark = needs_safetensors

CALLED: list[str] = []  # what the classes below ran: a load must run none of it


class RecordingPair(namedtuple("RecordingPair", ["first", "second"])):
    """A namedtuple of the fields the file claims, whose own ``__new__`` has a side effect."""

    def __new__(cls, *args: Any) -> RecordingPair:
        CALLED.append("RecordingPair.__new__")
        return super().__new__(cls, *args)


class RecordingDict(dict):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CALLED.append("RecordingDict.__init__")
        super().__init__(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        CALLED.append("RecordingDict.__setitem__")
        super().__setitem__(key, value)


class RecordingList(list):
    def __init__(self, *args: Any) -> None:
        CALLED.append("RecordingList.__init__")
        super().__init__(*args)


@dataclasses.dataclass
class RecordingOut:
    logits: Any
    extra: Any = None

    def __post_init__(self) -> None:
        CALLED.append("RecordingOut.__post_init__")


@dataclasses.dataclass
class FinalizedOut:
    logits: Any
    extra: Any = None

    def __del__(self) -> None:
        CALLED.append(f"FinalizedOut.__del__ of {type(self.logits).__name__}")


class NotAContainer:
    """Of none of the kinds a file can claim; its constructor takes anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CALLED.append("NotAContainer.__init__")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = NestedOutputs()
    before = hook_census(model)
    with hookkit.capture(model, ["lin", "named", "dict", "dc"], inputs=True) as cap:
        model(torch.randn(2, 4))
    assert hook_census(model) == before
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    return path


def naming(classes: dict[str, tuple[str, str]]) -> Any:
    """An edit that makes the outputs of layers ``named`` (a namedtuple), ``dict`` (a dict holding a list) and
    ``dc`` (a dataclass) name other classes: ``{"named" | "dict" | "list" | "dc": (module, qualname)}``."""
    def edit(manifest: dict[str, Any]) -> None:
        layers = manifest["layers"]
        nodes = {"named": layers["named"]["outputs"][0], "dict": layers["dict"]["outputs"][0],
                 "dc": layers["dc"]["outputs"][0]}
        nodes["list"] = dict(nodes["dict"]["items"])["nested"]
        for which, (module, qualname) in classes.items():
            nodes[which].update(module=module, qualname=qualname)

    return edit


def load_warning(path: Path, **options: Any) -> tuple[hookkit.Capture, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = hookkit.load(path, **options)
    return loaded, "\n".join(str(w.message) for w in caught)


# -- loading a file runs no code ----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["this", "planted"])
def test_a_file_that_names_a_module_does_not_import_it(saved, tmp_path, monkeypatch, capsys, module):
    planted = tmp_path / "planted_by_file"
    planted.mkdir()
    (planted / "planted.py").write_text(textwrap.dedent(f"""
        open({str(tmp_path / 'imported.txt')!r}, "w").close()
        from collections import namedtuple
        Pair = namedtuple("Pair", ["first", "second"])
    """))
    monkeypatch.syspath_prepend(str(planted))
    monkeypatch.delitem(sys.modules, module, raising=False)
    path = rewritten(saved, tmp_path / "crafted.safetensors", naming({"named": (module, "Pair")}))
    loaded, warned = load_warning(path)
    assert module not in sys.modules and not (tmp_path / "imported.txt").exists()
    assert capsys.readouterr().out == ""  # `import this` prints the Zen of Python
    assert f"{module}.Pair (its module {module!r} is not imported, and loading a file imports nothing)" in warned
    original = hookkit.load(saved)
    assert type(loaded["named"]) is tuple and type(original["named"]) is Pair
    assert_same(loaded["named"], tuple(original["named"]))


def test_classes_named_by_a_file_are_rebuilt_without_running_their_code(saved, tmp_path):
    here = __name__
    path = rewritten(saved, tmp_path / "crafted.safetensors", naming(
        {"named": (here, "RecordingPair"), "dict": (here, "RecordingDict"), "list": (here, "RecordingList"),
         "dc": (here, "RecordingOut")}))
    CALLED.clear()
    loaded, warned = load_warning(path)
    assert CALLED == [] and warned == ""
    original = hookkit.load(saved)
    named, mapping, dc = loaded["named"], loaded["dict"], loaded["dc"]
    assert type(named) is RecordingPair and named._fields == ("first", "second")
    torch.testing.assert_close(named.second, original["named"].second, rtol=0, atol=0)
    assert type(mapping) is RecordingDict and type(mapping["nested"]) is RecordingList
    assert_same(dict(mapping), {**original["dict"], "nested": RecordingList(original["dict"]["nested"])})
    assert type(dc) is RecordingOut
    torch.testing.assert_close(dc.logits, original["dc"].logits, rtol=0, atol=0)
    assert CALLED == ["RecordingList.__init__"]  # only the line above, which built one itself


def test_gradient_input_structures_are_rebuilt_without_running_their_classes_code(tmp_path):
    class TakesPair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, pair, scale):
            return self.fc(pair.first) * pair.second + scale

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TakesPair()

        def forward(self, x):
            return self.inner(RecordingPair(x * 2, x + 1), 3.0)

    model = Model()
    x = torch.randn(2, 3, requires_grad=True)
    before = hook_census(model)
    with hookkit.capture(model, ["inner"], inputs=True, grads=True) as cap:
        model(x).sum().backward()
    assert hook_census(model) == before
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    CALLED.clear()
    loaded = hookkit.load(path)
    assert CALLED == []  # reading it later walks it as a live capture's values are walked
    pair = RecordingPair(x * 2, x + 1)
    want = torch.autograd.grad(model.inner(pair, 3.0).sum(), [pair.first, pair.second])
    got = loaded.grad_inputs["inner"]
    assert type(got) is tuple and type(got[0]) is RecordingPair and got[1] is None
    torch.testing.assert_close(list(got[0]), list(want), rtol=0, atol=0)
    assert_same(got, cap.grad_inputs["inner"])


def test_a_class_not_of_the_kind_a_file_claims_is_never_called(saved, tmp_path):
    here = __name__
    path = rewritten(saved, tmp_path / "crafted.safetensors", naming(
        {which: (here, "NotAContainer") for which in ("named", "dict", "list", "dc")}))
    CALLED.clear()
    loaded, warned = load_warning(path)
    assert CALLED == []
    for kind in ("namedtuple", "dict", "list", "dataclass"):
        assert f"the file says it is a {kind}, but it is not a {kind}" in warned
    assert f"{here}.NotAContainer" in warned
    original = hookkit.load(saved)
    assert type(loaded["named"]) is tuple and type(loaded["dict"]) is dict and type(loaded["dc"]) is dict
    assert type(loaded["dict"]["nested"]) is list
    torch.testing.assert_close(loaded["dc"]["logits"], original["dc"].logits, rtol=0, atol=0)


def test_a_class_with_a_finalizer_is_not_rebuilt_from_a_file(saved, tmp_path):
    path = rewritten(saved, tmp_path / "crafted.safetensors", naming({"dc": (__name__, "FinalizedOut")}))
    CALLED.clear()
    loaded, warned = load_warning(path)
    assert type(loaded["dc"]) is dict
    del loaded
    gc.collect()
    assert CALLED == []
    assert f"{__name__}.FinalizedOut (it defines __del__, which would run on values the file chose)" in warned


def test_a_file_cannot_reach_a_class_through_another_module_or_an_attribute(saved, tmp_path):
    here = __name__
    path = rewritten(saved, tmp_path / "crafted.safetensors", naming(
        {"named": (here, "torch.return_types.max"), "dc": (here, "CALLED.__class__")}))
    loaded, warned = load_warning(path)
    assert type(loaded["named"]) is tuple and type(loaded["dc"]) is dict
    assert warned.count("holds no class of that name") == 2


def test_a_class_whose_module_is_not_imported_comes_back_plain_until_passed(tmp_path, monkeypatch):
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "saved_outputs.py").write_text(textwrap.dedent("""
        import dataclasses
        from collections import namedtuple
        from typing import Any

        Halves = namedtuple("Halves", ["low", "high"])

        @dataclasses.dataclass
        class Result:
            halves: Any
            score: Any = None
    """))
    monkeypatch.syspath_prepend(str(folder))
    outputs = importlib.import_module("saved_outputs")

    class Returns(nn.Module):
        def forward(self, x):
            return outputs.Result(outputs.Halves(x[:, :2], x[:, 2:]), score=x.sum())

    model = Returns()
    before = hook_census(model)
    with hookkit.capture(model, [""]) as cap:
        model(torch.randn(2, 4))
    assert hook_census(model) == before
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    monkeypatch.delitem(sys.modules, "saved_outputs")  # a fresh process, which never imported it
    loaded, warned = load_warning(path)
    assert "saved_outputs" not in sys.modules
    for name in ("saved_outputs.Halves", "saved_outputs.Result"):
        assert f"{name} (its module 'saved_outputs' is not imported" in warned
    assert "import the module that defines a class before loading, or pass the class" in warned
    assert type(loaded[""]) is dict and type(loaded[""]["halves"]) is tuple
    torch.testing.assert_close(loaded[""]["halves"][1], cap[""].halves.high, rtol=0, atol=0)
    passed, warned = load_warning(path, classes=[outputs.Halves, outputs.Result])
    assert warned == "" and "saved_outputs" not in sys.modules
    assert_same(passed[""], cap[""])
    monkeypatch.setitem(sys.modules, "saved_outputs", outputs)  # imported by the user: rebuilt without classes=
    imported, warned = load_warning(path)
    assert warned == ""
    assert_captures_equal(cap, imported)


def test_a_hugging_face_model_output_is_made_without_its_init_or_setitem(tmp_path):
    transformers = pytest.importorskip("transformers")
    calls: list[str] = []

    @dataclasses.dataclass
    class MyOutput(transformers.utils.ModelOutput):
        logits: Any = None
        hidden: Any = None
        attentions: Any = None

        def __post_init__(self) -> None:  # the dataclass __init__ calls it
            calls.append("__post_init__")
            super().__post_init__()

        def __setitem__(self, key: Any, value: Any) -> None:
            calls.append("__setitem__")
            super().__setitem__(key, value)

    class Head(nn.Module):
        def forward(self, x):
            return MyOutput(logits=x * 2, hidden=(x, x + 1))

    model = Head()
    before = hook_census(model)
    with hookkit.capture(model, [""]) as cap:
        out = model(torch.randn(2, 3))
    assert hook_census(model) == before
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    calls.clear()
    loaded = hookkit.load(path, classes=[MyOutput])[""]
    assert calls == []
    assert type(loaded) is MyOutput and list(loaded.keys()) == ["logits", "hidden"] == list(out.keys())
    assert_same(loaded.to_tuple(), out.to_tuple())
    assert loaded.logits is loaded["logits"] is loaded[0] and loaded.attentions is None


# -- crafted or damaged manifests: one SavedCaptureError, naming what is wrong -----------------------------------
def test_a_device_node_that_is_not_a_device_is_named(saved, tmp_path):
    def edit(manifest: dict[str, Any]) -> None:
        items = manifest["layers"]["dict"]["outputs"][0]["items"]
        assert items[2][0] == "name"
        items[2][1] = {"type": "device", "value": "garbage"}

    path = rewritten(saved, tmp_path / "device.safetensors", edit)
    with pytest.raises(hookkit.SavedCaptureError, match=r"device\.safetensors'.*not what Capture\.save writes "
                                                        r"\(layers\['dict'\]\.outputs\[0\]\.items\[2\]\[1\]\.value: "
                                                        r"the string 'garbage', where a torch device belongs\)"):
        hookkit.load(path)


@pytest.mark.parametrize("depth", [100_000, 2_000])
def test_a_manifest_nested_deep_is_refused_before_it_is_parsed(saved, tmp_path, depth):
    def deep(text: str) -> str:
        return text.replace('"static"', '{"type":"list","items":[' * depth + "1" + "]}" * depth, 1)

    path = rewritten(saved, tmp_path / "deep.safetensors", lambda m: None, deep)
    with pytest.raises(hookkit.SavedCaptureError, match=rf"deep\.safetensors'.*manifest is nested {2 * depth + 7} "
                                                        r"levels deep, and a capture file's manifest is at most 316"):
        hookkit.load(path)


def test_values_nested_as_deep_as_a_file_holds_round_trip_and_deeper_ones_are_not_saved(tmp_path):
    class Nested(nn.Module):
        def __init__(self, depth: int) -> None:
            super().__init__()
            self.depth = depth

        def forward(self, x):
            value: Any = x
            for i in range(self.depth):
                value = ([value], {"k": value}, (value, None))[i % 3]
            return value

    for depth, fits in ((100, True), (101, False)):
        model = Nested(depth)
        before = hook_census(model)
        with hookkit.capture(model, [""]) as cap:
            model(torch.randn(2))
        assert hook_census(model) == before
        path = tmp_path / f"nested{depth}.safetensors"
        if fits:
            cap.save(path)
            assert_captures_equal(cap, hookkit.load(path))
        else:
            with pytest.raises(hookkit.SavedCaptureError, match=r"a value nested more than 100 containers deep.*"
                                                                r"Nothing was written"):
                cap.save(path)
            assert not path.exists()


def test_a_value_nested_too_deep_in_a_crafted_file_names_where(saved, tmp_path):
    def deep(text: str) -> str:
        return text.replace('"static"', '{"type":"list","items":[' * 101 + "1" + "]}" * 101, 1)

    path = rewritten(saved, tmp_path / "deep.safetensors", lambda m: None, deep)
    with pytest.raises(hookkit.SavedCaptureError, match=r"layers\['dict'\]\.outputs\[0\]\.items\[2\]\[1\]"
                                                        r"\(\.items\[0\] 99 times\): a value nested more than 100 "
                                                        r"containers deep"):
        hookkit.load(path)


def test_a_healthy_file_loads_on_the_meta_device_with_and_without_verification(saved):
    on_cpu = hookkit.load(saved)
    for verify in (True, False):
        meta = hookkit.load(saved, device="meta", verify=verify)
        assert meta["lin"].device.type == "meta" and meta["lin"].shape == on_cpu["lin"].shape
        assert meta.inputs["named"].dtype == on_cpu.inputs["named"].dtype and meta["dc"].logits.is_meta


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"device": "garbage"}, hookkit.ArgumentError, r"device='garbage' is not a device .*'cpu', 'cuda'"),
    ({"device": f"cuda:{torch.cuda.device_count()}"}, hookkit.ArgumentError,
     r"device='cuda:\d+' cannot hold tensors on this machine.*load on 'cpu'"),
    ({"device": 1.5}, hookkit.ArgumentTypeError, r"device must be a str or a torch\.device, got float 1\.5"),
    ({"verify": "no"}, hookkit.ArgumentTypeError, r"verify must be True or False, got str 'no'"),
    ({"classes": "Pair"}, hookkit.ArgumentTypeError, r"classes must be a list of classes.*got str 'Pair'"),
    ({"classes": [Pair, Pair(1, 2)]}, hookkit.ArgumentTypeError,
     r"classes must hold classes, but item 1 is a Pair Pair\(first=1, second=2\)"),
    ({"classes": Out}, hookkit.ArgumentTypeError, r"classes must be a list of classes \(classes=\[MyOutput\]\)"),
])
def test_a_wrong_argument_is_an_argument_error_before_the_file_is_read(tmp_path, options, error, message):
    missing = tmp_path / "not-there.safetensors"  # the argument is checked first: no "no such file"
    with pytest.raises(error, match=r"hookkit\.load: " + message):
        hookkit.load(missing, **options)
    with pytest.raises(hookkit.ArgumentTypeError, match=r"path must be a file name .*got int 3"):
        hookkit.load(3)  # type: ignore[arg-type]


# -- fuzzing: every mutation of a real manifest loads or is a SavedCaptureError -----------------------------------
_DELETE, _DEEP = object(), "\x00deep\x00"
_SCALARS: list[Any] = [None, True, -1, 0, 2**64, -(2**63) - 1, 1.5, float("inf"), "", "garbage", "x" * 5000]
_NODES: list[Any] = [[], [None, None], {}, [[[[]]]], {"type": "tensor"}, {"type": "float", "value": "nan"},
                     {"type": "device", "value": "cuda:99999999999"}, {"type": "dtype", "value": "_dynamo"},
                     {"type": "slot", "index": 0}, {"type": "size", "value": [2**63]}, {"type": "list", "items": 1},
                     {"type": "bytes", "value": "not base64!"}, _DEEP]


def _places(node: Any) -> list[tuple[Any, ...]]:
    """Every key and index of a JSON value, as paths from the root."""
    found = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(node, ())]
    while stack:
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            found.append((*path, k))
            stack.append((v, (*path, k)))
    return found


def _mutated(manifest: dict[str, Any], place: tuple[Any, ...], value: Any) -> str:
    """The manifest's JSON text with ``value`` at ``place`` (deleted for ``_DELETE``; 5,000 lists deep for
    ``_DEEP``)."""
    changed = json.loads(json.dumps(manifest))
    *parents, last = place
    node = changed
    for k in parents:
        node = node[k]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return json.dumps(changed, separators=(",", ":")).replace(json.dumps(_DEEP), "[" * 5000 + "]" * 5000)


def _read_everything(loaded: hookkit.Capture) -> None:
    for kind in ("outputs", "inputs", "kwargs", "grads", "grad_inputs"):
        store = loaded if kind == "outputs" else getattr(loaded, kind)
        for name in store:
            store.calls(name)


def test_every_mutation_of_a_real_manifest_loads_or_is_a_saved_capture_error(tmp_path):
    import safetensors.torch

    model = NestedOutputs()
    before = hook_census(model)
    with hookkit.capture(model, ["lin", "tup", "named", "dict", "dc"], inputs=True, grads=True,
                         param_grads=True) as cap:
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert hook_census(model) == before
    saved = tmp_path / "cap.safetensors"
    cap.save(saved)
    with safetensors.safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
        keys = f.keys()
        tensors = {k: f.get_tensor(k) for k in keys}
    manifest = json.loads(metadata["hookkit"])
    places = _places(manifest)
    assert len(places) > 400
    outcomes: dict[str, int] = {}
    path = tmp_path / "mutated.safetensors"
    for i, place in enumerate(places):  # each place deleted, and given a wrong scalar and a wrong node (in turn)
        for value in (_DELETE, _SCALARS[i % len(_SCALARS)], _NODES[i % len(_NODES)]):
            text = _mutated(manifest, place, value)
            safetensors.torch.save_file(tensors, str(path), metadata={
                **metadata, "hookkit": text, "hookkit.sha256": hashlib.sha256(text.encode()).hexdigest()})
            for options in ({}, {"device": "meta", "verify": False})[: 1 + (i % 4 == 0)]:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        _read_everything(hookkit.load(path, **options))
                    outcome = "loaded and read"
                except hookkit.SavedCaptureError:
                    outcome = "refused"
                except (hookkit.NotRecordedError, hookkit.GradientUnavailableError) as exc:
                    outcome = type(exc).__name__  # reading what the file says was not recorded, as on a live one
                except Exception as exc:  # the failure this test exists to find
                    raise AssertionError(f"{place} = {value!r:.60} {options}: {type(exc).__name__}: {exc}") from exc
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes["refused"] > 1000 and outcomes["loaded and read"] > 50, outcomes
    assert hook_census(model) == before  # thousands of loads left no torch state behind
