"""One result type: ``capture()``'s ``with`` block fills a ``Capture``, and ``load()`` and ``merge()`` return the same
class; the block is a separate object. One concatenation with one default. Every public function's result type is
exported. The recording modules import one way (no cycle, no lazy import back)."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_saved import needs_safetensors

import hookkit
from hookkit.record.join import DIM

RECORD = Path(hookkit.__file__).parent / "record"


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))


def _captured(model, x):
    with hookkit.capture(model, ["0", "2"]) as cap:
        model(x)
    return cap


def test_the_with_block_is_a_separate_object_that_fills_a_capture():
    model = _model()
    block = hookkit.capture(model, ["0", "2"])
    assert type(block) is hookkit.CaptureBlock and block.selected == ["0", "2"]
    before = hookkit.hook_census(model)
    with block as cap:
        assert type(cap) is hookkit.Capture and cap is block.capture
        assert repr(cap).startswith("<hookkit.Capture (open)")
        model(torch.randn(3, 4))
    assert hookkit.hook_census(model) == before
    assert repr(cap).startswith("<hookkit.Capture (closed) of 2 layer(s)")
    assert cap["2"].shape == (3, 2) and list(cap) == ["0", "2"]
    assert cap.outputs["2"] is cap["2"] and list(cap.outputs) == list(cap)  # the outputs, a store like the others
    # the block reads as the capture it filled: `block = capture(...)`, `with block: ...`, `block[name]`
    assert block["2"] is cap["2"] and list(block) == ["0", "2"] and "0" in block and len(block) == 2
    assert block.calls("0")[0] is cap.calls("0")[0] and block.copies == cap.copies


def test_remove_without_a_with_block_takes_the_hooks_off():
    model = _model()
    before = hookkit.hook_census(model)
    block = hookkit.capture(model, ["0"])
    cap = block.__enter__()
    assert hookkit.hook_census(model) != before
    cap.remove()
    assert hookkit.hook_census(model) == before
    cap.remove()  # twice is fine
    block.__exit__(None, None, None)
    assert hookkit.hook_census(model) == before


@needs_safetensors
def test_captured_loaded_and_merged_captures_are_one_class(tmp_path):
    model = _model()
    caps = [_captured(model, torch.randn(2, 4)) for _ in range(2)]
    path = tmp_path / "cap.safetensors"
    caps[0].save(path)
    loaded = hookkit.load(path)
    merged = hookkit.merge([caps[0], loaded])
    assert type(caps[0]) is type(loaded) is type(merged) is hookkit.Capture
    assert repr(loaded).startswith(f"<hookkit.Capture (loaded from {str(path)!r})")
    assert repr(merged).startswith("<hookkit.Capture (merged from 2 captures)")
    for cap in (loaded, merged):
        assert cap.copies == 0
        cap.remove()  # no hooks behind it: nothing to do
        assert cap.selected == ["0", "2"]
    merged.save(tmp_path / "merged.safetensors")
    assert torch.equal(hookkit.load(tmp_path / "merged.safetensors")["2"], torch.cat([caps[0]["2"], caps[0]["2"]]))


def test_concat_calls_and_merge_share_one_join_with_one_default_dim():
    """``concat_calls`` used to default to dim=1 and ``merge`` to dim=0: both now join along ``DIM`` (0)."""
    assert DIM == 0
    for fn in (hookkit.concat_calls, hookkit.merge):
        assert inspect.signature(fn).parameters["dim"].default == DIM
    a, b = torch.zeros(2, 3), torch.ones(1, 3)
    assert hookkit.concat_calls([a, b]).shape == (3, 3)
    model = _model()
    caps = [_captured(model, torch.randn(n, 4)) for n in (2, 1)]
    assert hookkit.merge(caps)["2"].shape == (3, 2)
    # one function, one set of messages
    with pytest.raises(hookkit.ArgumentError, match=r"hookkit.concat_calls: dim=5 is not a dim of tensor 0 of the "
                                                    r"calls in values=, a 2-D tensor \(shape \(2, 3\)\)"):
        hookkit.concat_calls([a, b], dim=5)
    with pytest.raises(hookkit.ArgumentError, match=r"hookkit.merge: dim=5 is not a dim of tensor 0 of the output of "
                                                    r"'0', a 2-D tensor \(shape \(2, 4\)\)"):
        hookkit.merge(caps, dim=5)
    with pytest.raises(hookkit.ArgumentError, match=r"hookkit.concat_calls: cannot concatenate tensor 0 of the calls "
                                                    r"in values= along dim=1"):
        hookkit.concat_calls([a, b], dim=1)


def _classes(annotation):
    if isinstance(annotation, type):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _classes(arg)


def test_what_every_public_function_and_capture_method_returns_is_exported():
    """A user can name (and type) what a public function hands back, and what the methods of the capture classes
    do. ``recording`` (the engine's record a capture reads, for hookkit's own saving and merging) is the one
    exception."""
    missing = []
    for name in hookkit.__all__:
        obj = getattr(hookkit, name)
        if isinstance(obj, type) and issubclass(obj, BaseException) or name == "__version__":
            continue
        if isinstance(obj, type) and not obj.__module__.startswith("hookkit.record."):
            continue
        members = [(name, obj)] if not isinstance(obj, type) else [
            (f"{name}.{m}", inspect.getattr_static(obj, m)) for m in dir(obj)
            if (not m.startswith("_") or m in ("__enter__", "__getitem__")) and m != "recording"]
        for qualname, f in members:
            f = f.fget if isinstance(f, property) else getattr(f, "__func__", f)
            if not inspect.isfunction(f):
                continue
            for cls in _classes(typing.get_type_hints(f).get("return")):
                exported = cls.__name__ in hookkit.__all__ and getattr(hookkit, cls.__name__) is cls
                if cls.__module__.startswith("hookkit") and not exported:
                    missing.append(f"{qualname} -> {cls.__module__}.{cls.__qualname__}")
    assert not missing, missing


def _imports(path: Path) -> set[str]:
    """The hookkit modules a file imports, at its top or inside a function (a lazy import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hookkit"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hookkit"))
    return found


def test_the_recording_modules_import_one_way():
    modules = {f"hookkit.record.{p.stem}": p for p in RECORD.glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, [*path, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
    # the file code knows nothing of the result type or of capture()
    for low in ("saved", "encode", "decode", "manifest", "classes", "join"):
        assert not graph[f"hookkit.record.{low}"] & {"hookkit.record.recording", "hookkit.record.capture",
                                                     "hookkit.record.merge"}, low
    for path in (RECORD.parent / "core").glob("*.py"):
        assert not any(m.startswith("hookkit.record") for m in _imports(path)), path.name


def test_call_records_are_built_in_one_place():
    """Outside ``decode.new_call``, nothing in record/ sets a field of the engine's ``Call`` records."""
    from hookkit.core.engine import Call

    fields = set(Call.__slots__)
    found = []
    for path in sorted(RECORD.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        home = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name == "new_call"
                and path.stem == "decode" for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if id(node) in home:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]:
                if isinstance(target, ast.Attribute) and target.attr in fields and not (
                        isinstance(target.value, ast.Name) and target.value.id == "self"):
                    found.append(f"{path.name}:{target.lineno} .{target.attr}")
    assert not found, found
