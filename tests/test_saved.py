"""Saved captures (``Capture.save`` / ``hookkit.load``) and merged ones (``hookkit.merge``), against the live capture
they came from and against a capture of the whole batch.

Saving and loading need the optional ``save`` extra (safetensors); those tests skip cleanly without it. Merging does
not need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import sys
import warnings
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import hookkit

from conftest import NestedOutputs, Out, Pair, SharedReLU

try:
    import safetensors
    import safetensors.torch
except ImportError:  # the optional extra is not installed
    safetensors = None

needs_safetensors = pytest.mark.skipif(safetensors is None, reason="needs safetensors: pip install 'hookkit[save]'")


def assert_same(a: Any, b: Any, path: str = "value") -> None:
    """``a`` and ``b`` hold equal values of the same types, all the way down (tensors: exact values and dtypes)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def recorded_kinds(cap: Any) -> list[str]:
    rec = cap.recording
    return ["outputs"] + ["inputs", "kwargs"] * rec.want_inputs + ["grads", "grad_inputs"] * rec.want_grads


def assert_captures_equal(live: Any, other: Any) -> None:
    """Every layer, call and kind that ``live`` recorded reads the same from ``other``."""
    assert list(other) == list(live)
    assert recorded_kinds(other) == recorded_kinds(live)
    for kind in recorded_kinds(live):
        a, b = (live, other) if kind == "outputs" else (getattr(live, kind), getattr(other, kind))
        assert list(b) == list(a), kind
        for name in a:
            assert_same(a.calls(name), b.calls(name), f"{kind}[{name!r}]")
    assert_same(live.param_grads, other.param_grads, "param_grads")


def round_trip(cap: Any, tmp_path: Path) -> hookkit.Capture:
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    return hookkit.load(path)


# -- models ---------------------------------------------------------------------------------------------------------
class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *, scale=1.0, mask=None, mode="add", steps=2, flag=True, dtype=None, eps=0.0):
        y = self.fc(x) * scale
        return y if mask is None else y * mask


class WithKeywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        mask = (x > 0).float()
        return self.inner(x, scale=0.5, mask=mask, mode="mul", steps=3, flag=False, dtype=torch.float16,
                          eps=float("inf"))


class Values(nn.Module):
    """Tensors of several dtypes next to non-tensor values of every kind a capture file holds."""

    def forward(self, x):
        return {
            "bf16": x.to(torch.bfloat16), "fp16": x.half(), "fp64": x.double(), "int": (x * 10).long(),
            "int8": (x * 10).to(torch.int8), "bool": x > 0, "uint8": (x.abs() * 10).to(torch.uint8),
            "number": 3, "float": 2.5, "inf": float("-inf"), "none": None, "flag": True, "text": "static",
            "dtype": torch.float16, "device": torch.device("cpu"), "size": x.shape, "bytes": b"\x00ab",
            "complex": 1 + 2j, 7: x + 7, ("pair", 1): x - 1,
        }


class Views(nn.Module):
    """Non-contiguous views, tensors sharing storage, and one tensor returned twice."""

    def forward(self, x):
        y = x * 2
        return y.t(), y[:, 1], y, y, y[1:]


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 5),
    ).eval()


# -- saved and loaded equal the originals -----------------------------------------------------------------------------
@needs_safetensors
def test_every_call_of_a_reused_module_comes_back(tmp_path):
    model = SharedReLU()
    with hookkit.capture(model, ["relu", "fc1", "head"], inputs=True) as cap:
        model(torch.randn(3, 6))
    loaded = round_trip(cap, tmp_path)
    assert len(loaded.calls("relu")) == 3
    assert_captures_equal(cap, loaded)


@needs_safetensors
def test_nested_outputs_come_back_with_their_types(tmp_path):
    model = NestedOutputs()
    with hookkit.capture(model, ["tup", "named", "dict", "dc"]) as cap:
        model(torch.randn(2, 4))
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    assert loaded["tup"][1] is None
    assert type(loaded["named"]) is Pair and loaded["named"]._fields == ("first", "second")
    assert type(loaded["dc"]) is Out and set(loaded["dc"].extra) == {"z"}
    assert loaded["dict"]["name"] == "static" and loaded["dict"]["nested"][1][1] is None


@needs_safetensors
def test_inputs_and_keyword_inputs_come_back(tmp_path):
    model = WithKeywords()
    with hookkit.capture(model, ["inner", "inner.fc"], inputs=True) as cap:
        model(torch.randn(3, 4))
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    kw = loaded.kwargs["inner"]
    assert kw["mode"] == "mul" and kw["steps"] == 3 and kw["flag"] is False and kw["dtype"] is torch.float16
    assert kw["eps"] == float("inf") and kw["mask"].dtype == torch.float32


@needs_safetensors
def test_gradients_and_input_gradients_come_back(tmp_path):
    model = SharedReLU()
    x = torch.randn(3, 6, requires_grad=True)
    with hookkit.capture(model, ["relu", "fc1", "head"], inputs=True, grads=True) as cap:
        model(x).sum().backward()
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    (want,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(loaded.grad_inputs["fc1"], want)  # against torch itself, not only the capture


@needs_safetensors
def test_nested_gradients_come_back(tmp_path):
    model = NestedOutputs()
    with hookkit.capture(model, ["tup", "named", "dict", "dc"], inputs=True, grads=True) as cap:
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    assert loaded.grads["tup"][1] is None


@needs_safetensors
def test_parameter_gradients_come_back(tmp_path):
    model = SharedReLU()
    with hookkit.capture(model, ["fc1", "head"], param_grads=True) as cap:
        model(torch.randn(3, 6)).sum().backward()
    loaded = round_trip(cap, tmp_path)
    assert set(loaded.param_grads) == {"fc1", "head"}
    assert_captures_equal(cap, loaded)
    torch.testing.assert_close(loaded.param_grads["fc1"]["weight"], model.fc1.weight.grad, rtol=0, atol=0)


@needs_safetensors
def test_hugging_face_model_output_comes_back_as_its_class(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    bert = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    with hookkit.capture(bert, ["", "encoder", "encoder.layer.0", "embeddings"]) as cap:
        out = bert(input_ids=ids, output_hidden_states=True)
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    assert type(loaded[""]) is type(out) and list(loaded[""].keys()) == list(out.keys())
    assert loaded[""].attentions is None  # a field that was None reads as None, as on the original
    torch.testing.assert_close(loaded[""].last_hidden_state, out.last_hidden_state, rtol=0, atol=0)


@needs_safetensors
def test_dtypes_and_non_tensor_values_come_back_exactly(tmp_path):
    model = Values()
    with hookkit.capture(model, [""]) as cap:
        model(torch.randn(3, 4))
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    value = loaded[""]
    assert [value[k].dtype for k in ("bf16", "fp16", "int", "bool")] == [torch.bfloat16, torch.float16, torch.int64,
                                                                          torch.bool]
    assert type(value["size"]) is torch.Size and value[("pair", 1)].shape == (3, 4)


@needs_safetensors
def test_views_and_tensors_sharing_storage_come_back_with_their_values(tmp_path):
    model = Views()
    with hookkit.capture(model, [""], inputs=True) as cap:
        model(torch.randn(3, 4))
    assert not cap[""][0].is_contiguous()
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    value = loaded[""]
    assert value[2] is value[3]  # one tensor stored twice is saved once


@needs_safetensors
def test_a_module_captured_under_two_names_keeps_one_list_of_calls(tmp_path):
    class TwoNames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    model = TwoNames()
    with hookkit.capture(model, ["a", "b"]) as cap:
        model(torch.randn(1, 2))
    loaded = round_trip(cap, tmp_path)
    assert_captures_equal(cap, loaded)
    assert len(loaded.calls("a")) == 2 and loaded.recording.records["a"] is loaded.recording.records["b"]


@needs_safetensors
def test_a_capture_saved_inside_its_block_holds_what_ran_so_far(tmp_path):
    model = SharedReLU()
    with hookkit.capture(model, ["head"]) as cap:
        model(torch.randn(2, 6))
        cap.save(tmp_path / "early.safetensors")
        model(torch.randn(2, 6))
    early = hookkit.load(tmp_path / "early.safetensors")
    assert len(early.calls("head")) == 1 and len(cap.calls("head")) == 2
    torch.testing.assert_close(early["head"], cap.calls("head")[0], rtol=0, atol=0)


@needs_safetensors
def test_the_loaded_capture_reads_like_a_capture(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with hookkit.capture(model, ["0", "2", "1"]) as cap:
        model(torch.randn(2, 4))
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    loaded = hookkit.load(path)
    assert list(loaded) == ["0", "1", "2"] and len(loaded) == 3 and "1" in loaded
    assert loaded.selected == cap.selected
    assert repr(loaded) == f"<hookkit.Capture (loaded from {str(path)!r}) of 3 layer(s) that ran: 0, 1, 2>"
    with pytest.raises(hookkit.NotRecordedError, match="not one of the captured layers"):
        loaded["3"]
    with pytest.raises(hookkit.NotRecordedError, match="inputs=True"):
        loaded.inputs["0"]
    with pytest.raises(hookkit.NotRecordedError, match="grads=True"):
        loaded.grads["0"]


@needs_safetensors
def test_the_file_holds_a_manifest_with_versions_layers_and_classes(tmp_path):
    model = NestedOutputs()
    with hookkit.capture(model, ["named", "dc", "lin"]) as cap:
        model(torch.randn(2, 4))
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["hookkit"])
        keys = set(f.keys())
    assert manifest["format"] == 1 and manifest["hookkit"] == hookkit.__version__
    assert manifest["torch"] == torch.__version__ and manifest["order"] == ["lin", "named", "dc"]
    named = manifest["layers"]["named"]["outputs"][0]
    assert (named["type"], named["qualname"], named["fields"]) == ("namedtuple", "Pair", ["first", "second"])
    assert named["module"] == Pair.__module__
    tensor = named["items"][0]
    assert tensor["type"] == "tensor" and tensor["key"] in keys and tensor["dtype"] == "float32"
    assert tensor["shape"] == [2, 4]
    assert manifest["layers"]["dc"]["outputs"][0]["qualname"] == "Out"


@needs_safetensors
def test_a_class_defined_in_a_function_comes_back_plain_with_a_warning_unless_passed(tmp_path):
    Local = namedtuple("Local", ["a", "b"])

    @dataclasses.dataclass
    class LocalOut:
        value: torch.Tensor

    class Returns(nn.Module):
        def forward(self, x):
            return Local(x, x + 1), LocalOut(x * 2)

    model = Returns()
    with hookkit.capture(model, [""]) as cap:
        model(torch.randn(2, 3))
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    with pytest.warns(UserWarning, match=r"values of 2 class\(es\) come back as plain tuples / lists / dicts: "
                                         r".*Local \(module .* holds no class of that name\).*<locals>\.LocalOut "
                                         r"\(it is defined inside a function\).*classes=\[\.\.\.\]"):
        loaded = hookkit.load(path)
    local, out = loaded[""]
    assert type(local) is tuple and type(out) is dict
    torch.testing.assert_close(local[1], cap[""][0].b, rtol=0, atol=0)
    torch.testing.assert_close(out["value"], cap[""][1].value, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        passed = hookkit.load(path, classes=[Local, LocalOut])
    assert_same(passed[""], cap[""])


@needs_safetensors
def test_a_value_a_file_cannot_hold_is_saved_as_a_placeholder_with_a_warning(tmp_path):
    class TakesAFunction(nn.Module):
        def forward(self, x, fn=None):
            return fn(x)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TakesAFunction()

        def forward(self, x):
            return self.inner(x, fn=torch.relu)

    model = Outer()
    with hookkit.capture(model, ["inner"], inputs=True) as cap:
        model(torch.randn(2, 3))
    path = tmp_path / "cap.safetensors"
    with pytest.warns(UserWarning, match=r"NotSaved placeholders: a keyword input of 'inner'"):
        cap.save(path)
    fn = hookkit.load(path).kwargs["inner"]["fn"]
    assert "not saved" in repr(fn) and "builtin_function_or_method" in fn.type_name


# -- errors -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = NestedOutputs()
    with hookkit.capture(model, ["lin", "named", "dict", "dc"], inputs=True) as cap:
        model(torch.randn(2, 4))
    path = tmp_path / "cap.safetensors"
    cap.save(path)
    return path


def rewritten(saved: Path, path: Path, edit: Callable[[dict[str, Any]], None],
              text: Callable[[str], str] = lambda text: text) -> Path:
    """``saved``'s tensors written to ``path`` with a manifest that ``edit`` changed in place (then ``text`` changed
    as JSON text), and a SHA-256 that fits it: a consistent lie, which only the checks after the manifest's checksum
    can catch."""
    with safetensors.safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
        keys = f.keys()
        tensors = {k: f.get_tensor(k) for k in keys}
    manifest = json.loads(metadata["hookkit"])
    edit(manifest)
    metadata["hookkit"] = text(json.dumps(manifest, separators=(",", ":")))
    metadata["hookkit.sha256"] = hashlib.sha256(metadata["hookkit"].encode()).hexdigest()
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


@needs_safetensors
def test_saved_and_merged_captures_read_a_module_s_first_call_in_the_last_forward(tmp_path):
    """``relu`` runs three times per forward: a loaded or merged capture reads ``cap["relu"]`` as the live one does
    (its first call in the last forward), and a file without the forward of each call (an older hookkit's) reads
    the last call, as that hookkit did."""
    model = SharedReLU()
    caps = []
    for _ in range(2):
        with hookkit.capture(model, ["relu"], inputs=True) as cap:
            model(torch.randn(3, 6))
            model(torch.randn(3, 6))
        caps.append(cap)
    live = caps[0]
    assert torch.equal(live["relu"], live.calls("relu")[3])
    path = tmp_path / "run.safetensors"
    live.save(path)
    loaded = hookkit.load(path)
    assert torch.equal(loaded["relu"], live["relu"]) and torch.equal(loaded.inputs["relu"], live.inputs["relu"])
    again = tmp_path / "again.safetensors"
    loaded.save(again)
    assert torch.equal(hookkit.load(again)["relu"], live["relu"])
    merged = hookkit.merge(caps)
    assert torch.equal(merged["relu"], torch.cat([caps[0]["relu"], caps[1]["relu"]]))

    def forget_forwards(manifest: dict[str, Any]) -> None:
        del manifest["layers"]["relu"]["forward"]

    old = hookkit.load(rewritten(path, tmp_path / "old.safetensors", forget_forwards))
    assert torch.equal(old["relu"], live.calls("relu")[-1])

    def garble(manifest: dict[str, Any]) -> None:
        manifest["layers"]["relu"]["forward"] = ["a"] * 6

    with pytest.raises(hookkit.SavedCaptureError, match="forward"):
        hookkit.load(rewritten(path, tmp_path / "bad.safetensors", garble))


@needs_safetensors
def test_a_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(hookkit.SavedCaptureError, match=r"nope\.safetensors'.*no such file"):
        hookkit.load(path)


@needs_safetensors
def test_a_file_that_is_not_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not tensors")
    with pytest.raises(hookkit.SavedCaptureError, match=r"notes\.safetensors'.*not a readable safetensors file"):
        hookkit.load(path)


@needs_safetensors
@pytest.mark.parametrize("cut", [1, 64, "data", "header"])
def test_a_truncated_file_is_a_clear_error(saved, cut):
    data = saved.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    keep = {"data": header, "header": header // 2}.get(cut, len(data) - cut if isinstance(cut, int) else 0)
    saved.write_bytes(data[:keep])
    with pytest.raises(hookkit.SavedCaptureError, match="truncated, corrupted") as info:
        hookkit.load(saved)
    assert str(saved) in str(info.value) and info.value.__cause__ is not None


@needs_safetensors
@pytest.mark.parametrize("mask", [0x01, 0xFF])
def test_a_flipped_byte_anywhere_in_the_header_is_a_clear_error(saved, mask):
    data = saved.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for i in range(0, header, 3):  # the length, safetensors' tensor index, the manifest and its checksum
        corrupted = bytearray(data)
        corrupted[i] ^= mask
        saved.write_bytes(bytes(corrupted))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(hookkit.SavedCaptureError, match=str(saved.name)):
                hookkit.load(saved)


@needs_safetensors
def test_an_edited_manifest_is_caught_by_its_checksum(saved, tmp_path):
    with safetensors.safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
        keys = f.keys()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert '"static"' in metadata["hookkit"]
    metadata["hookkit"] = metadata["hookkit"].replace('"static"', '"edited"')
    path = tmp_path / "edited.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(hookkit.SavedCaptureError, match="does not match its checksum.*the file is corrupted"):
        hookkit.load(path)


@needs_safetensors
@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_a_flipped_bit_in_any_tensor_s_bytes_is_a_clear_error_naming_the_tensor(saved, mask):
    # safetensors checks the header, not the data: without the manifest's per-tensor SHA-256 these load wrong numbers
    data = saved.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    index = json.loads(data[8:header])
    spans = {k: v["data_offsets"] for k, v in index.items() if k != "__metadata__"}
    original = safetensors.torch.load(data)
    assert spans and len(data) > header
    for key, (begin, end) in spans.items():
        if begin == end:
            continue
        corrupted = bytearray(data)
        corrupted[header + (begin + end) // 2] ^= mask
        saved.write_bytes(bytes(corrupted))
        with pytest.raises(hookkit.SavedCaptureError,
                           match=rf"{saved.name}'.*1 of its {len(spans)} tensor\(s\) do not match their SHA-256.*"
                                 rf"{key!r}.*data is corrupted.*verify=False") as info:
            hookkit.load(saved)
        assert info.value.__cause__ is None
        assert len(hookkit.load(saved, verify=False)) == 4  # the escape hatch reads the file as it is
        assert not torch.equal(safetensors.torch.load_file(str(saved))[key], original[key])
    saved.write_bytes(data)
    assert len(hookkit.load(saved)) == 4


@needs_safetensors
@pytest.mark.parametrize("edit", ["drop", "wrong"])
def test_a_manifest_whose_checksums_do_not_list_the_tensors_is_a_clear_error(saved, tmp_path, edit):
    lin = safetensors.torch.load_file(str(saved))["lin/outputs/0/0"]
    digests: dict[str, str] = {}

    def change(manifest: dict[str, Any]) -> None:
        digests.update(manifest["sha256"])
        if edit == "drop":
            del manifest["sha256"]["lin/outputs/0/0"]
        else:
            manifest["sha256"]["lin/outputs/0/0"] = hashlib.sha256(b"something else").hexdigest()

    path = rewritten(saved, tmp_path / "lie.safetensors", change)
    assert digests["lin/outputs/0/0"] == hashlib.sha256(lin.numpy()).hexdigest() and len(digests) > 1
    error = {"drop": r"checksums do not list the file's \d+ tensor\(s\)",
             "wrong": r"1 of its \d+ tensor\(s\) do not match their SHA-256 in the manifest \('lin/outputs/0/0'\)"}
    with pytest.raises(hookkit.SavedCaptureError, match=r"lie\.safetensors'.*" + error[edit]):
        hookkit.load(path)


@needs_safetensors
def test_tensors_are_checked_on_the_cpu_then_moved_to_the_device_asked_for(saved):
    on_cpu = hookkit.load(saved)
    moved = hookkit.load(saved, device="meta")  # a device other than the CPU, on any machine
    assert moved["lin"].device.type == "meta" and moved["lin"].shape == on_cpu["lin"].shape
    assert moved["named"].first.device.type == "meta" and on_cpu["named"].first.device.type == "cpu"


@needs_safetensors
@pytest.mark.parametrize(("old", "new", "error"), [
    ('"shape":[2,4]', '"shape":[4,2]', r"is float32 \[2, 4\] in the file but float32 \[4, 2\] in the manifest"),
    ('"key":"lin/outputs/0/0"', '"key":"lin/outputs/9/9"', "names a tensor 'lin/outputs/9/9' that the file does not"),
])
def test_a_manifest_that_does_not_fit_the_tensors_is_a_clear_error(saved, tmp_path, old, new, error):
    def change(manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest["layers"], separators=(",", ":"))
        assert old in text
        manifest["layers"] = json.loads(text.replace(old, new, 1))

    path = rewritten(saved, tmp_path / "misfit.safetensors", change)
    with pytest.raises(hookkit.SavedCaptureError, match=r"misfit\.safetensors'.*does not fit the file.*" + error):
        hookkit.load(path)


@needs_safetensors
def test_a_safetensors_file_without_a_manifest_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(hookkit.SavedCaptureError, match=r"weights\.safetensors'.*without a hookkit manifest"):
        hookkit.load(path)


@needs_safetensors
def test_a_manifest_of_a_newer_format_asks_for_an_upgrade(tmp_path):
    path = tmp_path / "future.safetensors"
    manifest = json.dumps({"format": 99, "hookkit": "9.0.0"})
    safetensors.torch.save_file({"t": torch.zeros(1)}, str(path), metadata={"format": "pt", "hookkit": manifest})
    with pytest.raises(hookkit.SavedCaptureError, match=r"newer hookkit \(9\.0\.0, capture format 99\).*Upgrade"):
        hookkit.load(path)


@needs_safetensors
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failing_save_leaves_the_existing_file_intact(saved, monkeypatch, failure):
    before = saved.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(before[: len(before) // 2])
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    model = SharedReLU()
    with hookkit.capture(model, ["head"]) as cap:
        model(torch.randn(2, 6))
    with pytest.raises((hookkit.SavedCaptureError, KeyboardInterrupt)) as info:
        cap.save(saved)
    if isinstance(failure, OSError):
        assert "No space left" in str(info.value) and "unchanged" in str(info.value)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]  # no temporary file left behind
    monkeypatch.undo()
    assert list(hookkit.load(saved)) == ["lin", "named", "dict", "dc"]


@needs_safetensors
def test_a_second_save_replaces_the_file(saved):
    model = SharedReLU()
    with hookkit.capture(model, ["head"]) as cap:
        model(torch.randn(2, 6))
    cap.save(saved)
    assert list(hookkit.load(saved)) == ["head"]


@needs_safetensors
def test_saving_into_a_missing_folder_fails_before_writing(tmp_path):
    model = SharedReLU()
    with hookkit.capture(model, ["head"]) as cap:
        model(torch.randn(2, 6))
    with pytest.raises(hookkit.SavedCaptureError, match=r"the folder '.*missing' does not exist"):
        cap.save(tmp_path / "missing" / "cap.safetensors")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(hookkit.SavedCaptureError, match="that is a folder"):
        cap.save(tmp_path)
    assert os.listdir(tmp_path) == []


@needs_safetensors
def test_a_sparse_tensor_is_refused_naming_its_layer(tmp_path):
    class Sparse(nn.Module):
        def forward(self, x):
            return x.to_sparse()

    model = nn.Sequential(nn.Linear(3, 3), Sparse())
    with hookkit.capture(model, ["0", "1"]) as cap:
        model(torch.randn(2, 3))
    with pytest.raises(hookkit.SavedCaptureError, match=r"the output of '1'.*sparse_coo tensor"):
        cap.save(tmp_path / "cap.safetensors")
    assert os.listdir(tmp_path) == []


@needs_safetensors
def test_a_meta_tensor_is_refused_naming_its_layer(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3, device="meta"))
    with hookkit.capture(model, ["0"]) as cap:
        model(torch.randn(2, 3, device="meta"))
    with pytest.raises(hookkit.SavedCaptureError, match=r"the output of '0'.*meta tensor"):
        cap.save(tmp_path / "cap.safetensors")


@needs_safetensors
def test_a_tensor_changed_in_place_after_capture_is_not_saved(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    with hookkit.capture(model, ["0"]) as cap:
        out = model(torch.randn(2, 3))
    with torch.no_grad():
        out.add_(1)
    with pytest.raises(hookkit.ModifiedInPlaceError, match="'0' was modified in place"):
        cap.save(tmp_path / "cap.safetensors")


def test_without_safetensors_save_and_load_say_what_to_install(tmp_path, monkeypatch):
    model = SharedReLU()
    with hookkit.capture(model, ["head"]) as cap:
        model(torch.randn(2, 6))
    (tmp_path / "cap.safetensors").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install 'hookkit\[save\]'"):
        cap.save(tmp_path / "cap.safetensors")
    with pytest.raises(ImportError, match=r"pip install 'hookkit\[save\]'"):
        hookkit.load(tmp_path / "cap.safetensors")
    assert (tmp_path / "cap.safetensors").read_bytes() == b"x"


# -- merging ----------------------------------------------------------------------------------------------------------
def batches_and_whole(model: nn.Module, layers: list[str], **options: Any) -> tuple[list[Any], Any]:
    x = torch.randn(6, 3, 10, 10)
    caps = []
    for part in x.split(2):
        with hookkit.capture(model, layers, **options) as cap:
            out = model(part.requires_grad_(options.get("grads", False)))
            if options.get("grads"):
                out.sum().backward()
        caps.append(cap)
    with hookkit.capture(model, layers, **options) as whole:
        out = model(x.requires_grad_(options.get("grads", False)))
        if options.get("grads"):
            out.sum().backward()
    return caps, whole


def assert_close_captures(whole: Any, merged: Any) -> None:
    assert recorded_kinds(merged) == recorded_kinds(whole)
    for kind in recorded_kinds(whole):
        a, b = (whole, merged) if kind == "outputs" else (getattr(whole, kind), getattr(merged, kind))
        assert list(b) == list(a), kind
        for name in a:
            torch.testing.assert_close(b.calls(name), a.calls(name), msg=f"{kind}[{name!r}]")


def test_merged_batches_equal_a_capture_of_the_whole_batch():
    model = cnn()
    caps, whole = batches_and_whole(model, ["0", "2", "3", "6"], inputs=True, grads=True)
    merged = hookkit.merge(caps)
    assert merged["0"].shape[0] == 6 and merged.grads["3"].shape[0] == 6
    assert_close_captures(whole, merged)
    assert repr(merged).startswith("<hookkit.Capture (merged from 3 captures)")


@needs_safetensors
def test_merged_then_saved_then_loaded_is_the_same(tmp_path):
    model = cnn()
    caps, whole = batches_and_whole(model, ["0", "6"], inputs=True)
    merged = hookkit.merge(caps)
    loaded = round_trip(merged, tmp_path)
    assert_captures_equal(merged, loaded)
    assert_close_captures(whole, hookkit.merge([loaded]))


def test_merge_joins_each_call_of_a_reused_module_and_nested_outputs():
    shared, nested = SharedReLU(), NestedOutputs()
    xs = torch.randn(3, 2, 6)
    caps = []
    for x in xs:
        with hookkit.capture(shared, ["relu"], inputs=True) as cap:
            shared(x)
        caps.append(cap)
    merged = hookkit.merge(caps)
    with hookkit.capture(shared, ["relu"], inputs=True) as whole:
        shared(xs.reshape(6, 6))
    assert len(merged.calls("relu")) == 3
    assert_close_captures(whole, merged)
    caps = []
    for x in torch.randn(2, 3, 4):
        with hookkit.capture(nested, ["tup", "named", "dict", "dc"]) as cap:
            nested(x)
        caps.append(cap)
    merged = hookkit.merge(caps)
    assert type(merged["named"]) is Pair and merged["named"].first.shape == (6, 4) and merged["tup"][1] is None
    assert type(merged["dc"]) is Out and merged["dict"]["name"] == "static"


def test_merge_along_another_dimension():
    model = SharedReLU()
    caps = []
    for x in torch.randn(2, 3, 6):
        with hookkit.capture(model, ["head"]) as cap:
            model(x)
        caps.append(cap)
    assert hookkit.merge(caps, dim=1)["head"].shape == (3, 4)


def test_merge_refuses_captures_of_other_layers():
    model = SharedReLU()
    with hookkit.capture(model, ["fc1", "head"]) as a:
        model(torch.randn(2, 6))
    with hookkit.capture(model, ["fc1", "fc2"]) as b:
        model(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"capture 1 has other layers than capture 0: layer 1 .* is 'fc2' there and "
                                         r"'head' in capture 0"):
        hookkit.merge([a, b])


def test_merge_refuses_a_different_number_of_calls():
    model = SharedReLU()
    with hookkit.capture(model, ["relu"]) as a:
        model(torch.randn(2, 6))
    with hookkit.capture(model, ["relu"]) as b:
        model(torch.randn(2, 6))
        model(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"'relu' ran 3 time\(s\) in capture 0 but 6 time\(s\) in capture 1"):
        hookkit.merge([a, b])


def test_merge_refuses_different_structures_naming_layer_call_and_place():
    class Varies(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = False

        def forward(self, x):
            return {"y": x, "nested": [x, (x, x if self.second else None)]}

    model = nn.Sequential(nn.Linear(3, 3), Varies())
    with hookkit.capture(model, ["0", "1"]) as a:
        model(torch.randn(2, 3))
    model[1].second = True
    with hookkit.capture(model, ["0", "1"]) as b:
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"capture 1 differs from capture 0 at calls\('1'\)\[0\], in "
                                         r"outputs\['nested'\]\[1\]\[1\]: None vs a float32 tensor"):
        hookkit.merge([a, b])


def test_merge_refuses_other_dtypes_shapes_and_options():
    model = cnn()
    with hookkit.capture(model, ["6"]) as a:
        model(torch.randn(2, 3, 10, 10))
    with hookkit.capture(model, ["6"], to=torch.float16) as half:
        model(torch.randn(2, 3, 10, 10))
    with pytest.raises(ValueError,
                       match=r"at calls\('6'\)\[0\], in outputs: a float32 tensor of 2 dim\(s\) vs a float16"):
        hookkit.merge([a, half])
    with hookkit.capture(model, ["0"]) as small:
        model(torch.randn(2, 3, 10, 10))
    with hookkit.capture(model, ["0"]) as big:
        model(torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match=r"cannot concatenate tensor 0 of the output of '0' along dim=0"):
        hookkit.merge([small, big])
    with hookkit.capture(model, ["6"], inputs=True) as with_inputs:
        model(torch.randn(2, 3, 10, 10))
    with pytest.raises(ValueError, match=r"capture 1 was made with inputs=True, capture 0 with inputs=False"):
        hookkit.merge([a, with_inputs])
    with pytest.raises(ValueError, match="at least one capture"):
        hookkit.merge([])
    with pytest.raises(TypeError, match="item 1 is a Tensor, not a capture"):
        hookkit.merge([a, torch.zeros(1)])


def test_merge_leaves_parameter_gradients_out_with_a_warning():
    model = SharedReLU()
    caps = []
    for x in torch.randn(2, 2, 6):
        with hookkit.capture(model, ["head"], param_grads=True) as cap:
            model(x).sum().backward()
        caps.append(cap)
    with pytest.warns(UserWarning, match="merge leaves param_grads out"):
        merged = hookkit.merge(caps)
    assert merged.param_grads == {} and merged["head"].shape == (4, 2)
