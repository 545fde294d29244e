"""extract() stores bfloat16 and float16 bit for bit (bfloat16 as a plain .npy of its raw 2-byte values, the dtype
named in manifest.json), ``Features.torch`` hands any layer back as a torch tensor without copying the file, and
``hookkit.load_features`` opens a finished folder without the model (refusing an unfinished one with the call or the
command that finishes it)."""

from __future__ import annotations

import io
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from rich.console import Console

import hookkit
from hookkit.extraction.fingerprint import call_settings

from _optional import importorskip_torchvision

LAYERS = ["0", "2"]


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 5)).to(dtype).eval()


def token_batches(dtype: torch.dtype, n: int = 23, batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    """[N, T, 6] batches of samples of 7 tokens (the same samples for any batch size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 7, 6, generator=g).to(dtype)
    return [x[i:i + batch] for i in range(0, n, batch)]


def padded(dtype: torch.dtype, n: int = 23, batch: int = 4, seed: int = 2) -> list[dict]:
    """Dict batches of sequences of 1 to 9 tokens, padded, with an attention_mask (the same samples for any batch
    size)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (n,), generator=g).tolist()
    seqs = [torch.randn(t, 6, generator=g).to(dtype) for t in lengths]
    out = []
    for i in range(0, n, batch):
        chunk = seqs[i:i + batch]
        t = max(len(s) for s in chunk)
        x = torch.zeros(len(chunk), t, 6, dtype=dtype)
        mask = torch.zeros(len(chunk), t, dtype=torch.long)
        for j, s in enumerate(chunk):
            x[j, :len(s)] = s
            mask[j, :len(s)] = 1
        out.append({"input": x, "attention_mask": mask})
    return out


class Masked(nn.Module):
    """Per-token layers that take Hugging Face style keyword batches."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = mlp(dtype)

    def forward(self, input: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input)


def outputs(model: nn.Module, batches: list, layers: list[str]) -> dict[str, list[torch.Tensor]]:
    """Each layer's output on each batch, from torch's own forward hooks."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: got[n].append(o.clone())) for n in layers]
    try:
        with torch.inference_mode():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in handles:
            h.remove()
    return got


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


POOLS = {None: lambda t: t, "max": lambda t: t.amax(dim=1), "avg": lambda t: t.mean(dim=1)}


# -- bfloat16: bit for bit ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("pool", [None, "max", "avg"])
def test_a_bfloat16_model_is_stored_bit_for_bit_with_dtype_bfloat16(pool, on_disk, tmp_path):
    model = mlp(torch.bfloat16)
    batches = token_batches(torch.bfloat16)
    feats = hookkit.extract(model, LAYERS, batches, out=tmp_path / "f" if on_disk else None, pool=pool,
                            dtype=torch.bfloat16, progress=False)
    raw = outputs(model, batches, LAYERS)
    for layer in LAYERS:
        want = torch.cat([POOLS[pool](t) for t in raw[layer]])
        assert want.dtype == torch.bfloat16
        assert_bitwise(feats.torch(layer), want)


@pytest.mark.parametrize("on_disk", [False, True])
def test_ragged_tokens_of_a_bfloat16_model_are_stored_bit_for_bit(on_disk, tmp_path):
    model = Masked(torch.bfloat16)
    batches = padded(torch.bfloat16)
    layers = ["net.0", "net.2"]
    feats = hookkit.extract(model, layers, batches, out=tmp_path / "f" if on_disk else None, dtype="bfloat16",
                            progress=False)
    raw = outputs(model, batches, layers)
    counts = torch.cat([b["attention_mask"].sum(1) for b in batches])
    for layer in layers:
        want = torch.cat([t[b["attention_mask"].bool()] for t, b in zip(raw[layer], batches, strict=True)])
        assert_bitwise(feats.torch(layer), want)
        offsets = feats.offsets(layer)
        assert isinstance(offsets, np.ndarray) and offsets.dtype == np.int64
        np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts.numpy())]))
        for i in (0, 5, len(counts) - 1):
            tokens = feats.tokens(layer, i)
            assert isinstance(tokens, torch.Tensor)  # numpy has no bfloat16: a torch view of the flat tokens
            assert_bitwise(tokens, want[offsets[i]:offsets[i + 1]])


class Flaky:
    """The batches of ``batches``, but iterating stops with an error at batch ``stop_at``: the rows of the batches
    before it are kept, the folder is left unfinished."""

    def __init__(self, batches: list, stop_at: int) -> None:
        self.batches, self.stop_at = batches, stop_at

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.stop_at:
                raise RuntimeError("the data stopped")
            yield b


def interrupted(model, layers, batches, out, stop_at=3, **options) -> None:
    with pytest.raises(RuntimeError, match="the data stopped"):
        hookkit.extract(model, layers, Flaky(batches, stop_at), out=out, progress=False, **options)
    assert not (out / f"{layers[0]}.npy").exists()  # unfinished


@pytest.mark.parametrize("ragged", [False, True])
def test_a_resumed_bfloat16_run_with_another_batch_size_gives_the_same_bits(ragged, tmp_path):
    model = Masked(torch.bfloat16) if ragged else mlp(torch.bfloat16)
    layers = ["net.0", "net.2"] if ragged else LAYERS
    make = padded if ragged else token_batches
    pool = None if ragged else "avg"
    interrupted(model, layers, make(torch.bfloat16, batch=4), tmp_path / "f", pool=pool, dtype=torch.bfloat16)
    resumed = hookkit.extract(model, layers, make(torch.bfloat16, batch=6), out=tmp_path / "f", pool=pool,
                              dtype=torch.bfloat16, progress=False)
    whole = hookkit.extract(model, layers, make(torch.bfloat16, batch=4), out=tmp_path / "w", pool=pool,
                            dtype=torch.bfloat16, progress=False)
    raw = outputs(model, make(torch.bfloat16, batch=4), layers)
    for layer in layers:
        assert resumed.path(layer).read_bytes() == whole.path(layer).read_bytes()
        if ragged:
            want = torch.cat([t[b["attention_mask"].bool()]
                              for t, b in zip(raw[layer], make(torch.bfloat16, batch=4), strict=True)])
        else:
            want = torch.cat([t.mean(dim=1) for t in raw[layer]])
        assert_bitwise(resumed.torch(layer), want)


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_float32_model_stored_as_bfloat16_holds_torchs_own_rounding(on_disk, tmp_path):
    model = mlp()
    batches = token_batches(torch.float32)
    feats = hookkit.extract(model, LAYERS, batches, out=tmp_path / "f" if on_disk else None, pool="max",
                            dtype=torch.bfloat16, progress=False)
    raw = outputs(model, batches, LAYERS)
    for layer in LAYERS:
        assert_bitwise(feats.torch(layer), torch.cat([t.amax(dim=1) for t in raw[layer]]).to(torch.bfloat16))
    ragged = hookkit.extract(Masked(torch.float32), ["net.2"], padded(torch.float32),
                             out=tmp_path / "r" if on_disk else None, dtype=torch.bfloat16, progress=False)
    raw = outputs(Masked(torch.float32), padded(torch.float32), ["net.2"])
    want = torch.cat([t[b["attention_mask"].bool()] for t, b in zip(raw["net.2"], padded(torch.float32),
                                                                       strict=True)])
    assert_bitwise(ragged.torch("net.2"), want.to(torch.bfloat16))


# -- float16: bit for bit ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float16, "float16"])
def test_a_float16_model_is_stored_bit_for_bit(dtype, on_disk, tmp_path):
    model = mlp(torch.float16)
    batches = token_batches(torch.float16)
    feats = hookkit.extract(model, LAYERS, batches, out=tmp_path / "f" if on_disk else None, dtype=dtype,
                            progress=False)
    raw = outputs(model, batches, LAYERS)
    for layer in LAYERS:
        assert feats[layer].dtype == np.float16  # numpy has float16: feats[layer] is the values
        want = torch.cat(raw[layer])
        assert_bitwise(torch.from_numpy(np.array(feats[layer])), want)
        assert_bitwise(feats.torch(layer), want)
    ragged = hookkit.extract(Masked(torch.float16), ["net.2"], padded(torch.float16),
                             out=tmp_path / "r" if on_disk else None, dtype=dtype, progress=False)
    raw = outputs(Masked(torch.float16), padded(torch.float16), ["net.2"])
    want = torch.cat([t[b["attention_mask"].bool()] for t, b in zip(raw["net.2"], padded(torch.float16),
                                                                       strict=True)])
    assert_bitwise(ragged.torch("net.2"), want)


def test_a_float32_model_stored_as_float16_holds_torchs_own_rounding(tmp_path):
    model = mlp()
    batches = token_batches(torch.float32)
    feats = hookkit.extract(model, LAYERS, batches, out=tmp_path / "f", dtype=torch.float16, progress=False)
    raw = outputs(model, batches, LAYERS)
    for layer in LAYERS:
        assert_bitwise(feats.torch(layer), torch.cat(raw[layer]).to(torch.float16))


# -- the files ---------------------------------------------------------------------------------------------------------

def test_a_bfloat16_file_is_a_plain_npy_of_uint16_named_bfloat16_in_the_manifest(tmp_path):
    model = mlp(torch.bfloat16)
    batches = token_batches(torch.bfloat16)
    feats = hookkit.extract(model, LAYERS, batches, out=tmp_path / "f", pool="avg", dtype=torch.bfloat16,
                            progress=False)
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["torch_dtypes"] == {"0": "bfloat16", "2": "bfloat16"}
    assert manifest["dtypes"] == {"0": "<u2", "2": "<u2"}
    assert manifest["settings"]["dtype"] == "torch.bfloat16"
    raw = outputs(model, batches, LAYERS)
    for layer in LAYERS:
        plain = np.load(tmp_path / "f" / f"{layer}.npy")  # plain numpy, no hookkit
        assert plain.dtype == np.uint16 and plain.shape == tuple(feats.torch(layer).shape)
        values = torch.from_numpy(plain).view(torch.bfloat16)  # how another tool reads it (extract's docstring)
        assert_bitwise(values, torch.cat([t.mean(dim=1) for t in raw[layer]]))


def test_bfloat16_files_are_half_the_size_of_float32_ones(tmp_path):
    model = mlp(torch.bfloat16)
    batches = token_batches(torch.bfloat16)
    for dtype in ("bfloat16", None):
        hookkit.extract(model, ["2"], batches, out=tmp_path / str(dtype), dtype=dtype, progress=False)
    header = hookkit.extraction.npy.HEADER_BYTES
    half = (tmp_path / "bfloat16" / "2.npy").stat().st_size - header
    full = (tmp_path / "None" / "2.npy").stat().st_size - header
    assert half * 2 == full == 23 * 7 * 5 * 4


@pytest.mark.parametrize("on_disk", [False, True])
def test_without_dtype_a_bfloat16_layer_is_still_stored_as_float32_exactly(on_disk, tmp_path):
    model = mlp(torch.bfloat16)
    batches = token_batches(torch.bfloat16)
    feats = hookkit.extract(model, LAYERS, batches, out=tmp_path / "f" if on_disk else None, progress=False)
    raw = outputs(model, batches, LAYERS)
    for layer in LAYERS:
        assert feats[layer].dtype == np.float32
        np.testing.assert_array_equal(feats[layer], torch.cat(raw[layer]).float().numpy())
        assert feats.torch(layer).dtype == torch.float32
    if on_disk:
        assert json.loads((tmp_path / "f" / "manifest.json").read_text())["torch_dtypes"]["2"] == "float32"


@pytest.mark.parametrize("other", [torch.float16, torch.uint16, None])
def test_a_bfloat16_folder_is_not_resumed_with_another_dtype(other, tmp_path):
    model = mlp(torch.bfloat16)
    batches = token_batches(torch.bfloat16)
    interrupted(model, LAYERS, batches, tmp_path / "f", dtype=torch.bfloat16)
    with pytest.raises(hookkit.ExtractError, match="dtype differ"):
        hookkit.extract(model, LAYERS, batches, out=tmp_path / "f", dtype=other, progress=False)
    kinds = {str(call_settings(model, LAYERS, pool=None, select=None, dtype=d, stop=True, dataset_id=None)["dtype"])
             for d in (torch.bfloat16, torch.float16, torch.uint16, torch.int16, None)}
    assert len(kinds) == 5


# -- what feats[layer] does for bfloat16 -------------------------------------------------------------------------------

@pytest.mark.parametrize("on_disk", [False, True])
def test_feats_of_a_bfloat16_layer_refuse_numpy_values_and_say_where_they_are(on_disk, tmp_path):
    model = Masked(torch.bfloat16)
    feats = hookkit.extract(model, ["net.0", "net.2"], padded(torch.bfloat16), out=tmp_path / "f" if on_disk else None,
                            dtype=torch.bfloat16, progress=False)
    with pytest.raises(hookkit.ArgumentError, match=r"feats\.torch\('net\.2'\)") as caught:
        feats["net.2"]
    assert ("numpy.load(feats.path('net.2'))" in str(caught.value)) == on_disk
    assert len(feats) == 2 and list(feats) == ["net.0", "net.2"] and "net.2" in feats and "x" not in feats
    assert "net.2: (" in repr(feats) and "bfloat16" in repr(feats) and "uint16" not in repr(feats)
    assert feats.offsets("net.2")[-1] == feats.torch("net.2").shape[0]
    if on_disk:
        assert feats.path("net.2") == tmp_path / "f" / "net.2.npy"
        assert np.load(feats.path("net.2")).dtype == np.uint16
    with pytest.raises(hookkit.NotRecordedError):
        feats.torch("net.1")


# -- Features.torch: no copy -------------------------------------------------------------------------------------------

def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges at which this process maps ``path`` (Linux's /proc/self/maps)."""
    found = []
    real = os.path.realpath(path)
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            found.append((lo, hi))
    return found


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_feats_torch_maps_the_file_instead_of_copying_it(dtype, tmp_path):
    model = Masked(torch.bfloat16)
    feats = hookkit.extract(model, ["net.0", "net.2"], padded(torch.bfloat16, n=200), out=tmp_path / "f", pool="max",
                            dtype=dtype, progress=False)
    ragged = hookkit.extract(model, ["net.0"], padded(torch.bfloat16, n=200), out=tmp_path / "r", dtype=dtype,
                             progress=False)
    for f, layer in ((feats, "net.0"), (feats, "net.2"), (ragged, "net.0")):
        t = f.torch(layer)
        size = t.numel() * t.element_size()
        start = t.data_ptr()
        assert any(lo <= start and start + size <= hi for lo, hi in mapped_ranges(f.path(layer))), layer
        assert t.dtype == (dtype or torch.float32)
        t[0] = 7  # copy-on-write: the tensor changes, the file does not
        assert f.torch(layer)[0].ne(7).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns about a read-only array: the map is writable
        feats.torch("net.0")


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_feats_torch_in_memory_is_a_view_of_the_held_rows(dtype):
    feats = hookkit.extract(mlp(torch.bfloat16), LAYERS, token_batches(torch.bfloat16), dtype=dtype, progress=False)
    for layer in LAYERS:
        a, b = feats.torch(layer), feats.torch(layer)
        assert a.data_ptr() == b.data_ptr()
        if dtype is None:
            assert a.data_ptr() == feats[layer].ctypes.data


# -- load_features -----------------------------------------------------------------------------------------------------

def assert_same_features(got: hookkit.Features, want: hookkit.Features) -> None:
    assert type(got) is hookkit.Features
    assert list(got) == list(want)
    assert got.manifest == want.manifest and got.out == want.out and repr(got) == repr(want)
    for layer in want:
        assert got.path(layer) == want.path(layer)
        a, b = got.torch(layer), want.torch(layer)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        try:
            offsets = want.offsets(layer)
        except hookkit.ArgumentError:
            continue
        np.testing.assert_array_equal(got.offsets(layer), offsets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_load_features_opens_a_finished_folder_as_the_run_that_wrote_it(dtype, tmp_path):
    model = Masked(torch.bfloat16)
    layers = ["net.0", "net.2"]
    ragged = hookkit.extract(model, layers, padded(torch.bfloat16), out=tmp_path / "r", dtype=dtype, progress=False)
    pooled = hookkit.extract(model, layers, padded(torch.bfloat16), out=tmp_path / "p", pool="avg", dtype=dtype,
                             progress=False)
    for want, folder in ((ragged, tmp_path / "r"), (pooled, tmp_path / "p")):
        got = hookkit.load_features(folder)
        assert list(got) == layers
        assert_same_features(got, want)
        assert_same_features(hookkit.load_features(str(folder)), want)
        if dtype is None:
            for layer in layers:
                np.testing.assert_array_equal(got[layer], want[layer])


def test_load_features_refuses_an_unfinished_folder_with_the_call_that_finishes_it(tmp_path):
    model = mlp(torch.bfloat16)
    batches = token_batches(torch.bfloat16)
    out = tmp_path / "f"
    interrupted(model, LAYERS, batches, out, pool="max", dtype=torch.bfloat16, dataset_id="tokens@1")
    with pytest.raises(hookkit.ExtractError) as caught:
        hookkit.load_features(out)
    message = str(caught.value)
    assert "not finished: 12 rows are written" in message
    assert (f"hookkit.extract(model, ['0', '2'], data, out={str(out)!r}, pool='max', dtype=torch.bfloat16, "
            "dataset_id='tokens@1')") in message
    assert "torch.nn.modules.container.Sequential" in message
    # the call it names finishes the folder, and then it opens
    done = hookkit.extract(model, LAYERS, batches, out=out, pool="max", dtype=torch.bfloat16, dataset_id="tokens@1",
                           progress=False)
    assert_same_features(hookkit.load_features(out), done)


def test_load_features_refuses_a_folder_whose_run_stopped_before_its_first_batch(tmp_path):
    out = tmp_path / "f"
    interrupted(mlp(), LAYERS, token_batches(torch.float32), out, stop_at=0)
    with pytest.raises(hookkit.ExtractError, match=r"stopped before its first batch.*hookkit\.extract\(\.\.\.\)"):
        hookkit.load_features(out)


def test_load_features_refuses_a_finished_folder_with_a_missing_or_changed_file(tmp_path):
    model = mlp()
    feats = hookkit.extract(model, LAYERS, token_batches(torch.float32), out=tmp_path / "f", progress=False)
    with open(feats.path("2"), "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(hookkit.ExtractError, match=r"2\.npy has .* bytes .*it was changed.*hookkit\.extract\("):
        hookkit.load_features(tmp_path / "f")
    feats.path("2").unlink()
    with pytest.raises(hookkit.ExtractError, match=r"2\.npy is missing.*hookkit\.extract\(model, \['0', '2'\]"):
        hookkit.load_features(tmp_path / "f")


def test_load_features_refuses_what_is_not_an_extraction_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "file", tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(hookkit.ExtractError, match="not an extraction folder"):
            hookkit.load_features(path)
    with pytest.raises(TypeError):
        hookkit.load_features(3)  # type: ignore[arg-type]


# -- the command line records itself -----------------------------------------------------------------------------------

_FAILING = '''
import torch.nn as nn

FAIL_AT = [2]  # the forward (counted per model) that fails; None: never


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if FAIL_AT[0] is not None and self.calls > FAIL_AT[0]:
            raise RuntimeError("stopped on purpose")
        return x


def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), Failing(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''


def test_the_command_line_is_recorded_and_named_to_finish_an_unfinished_folder(tmp_path, user_module, monkeypatch):
    importorskip_torchvision()  # image folders
    from PIL import Image

    from hookkit.cli import run

    user_module("failing_model", _FAILING)
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.fromarray(np.full((20, 20, 3), i * 20, dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    argv = ["extract", "failing_model:make", "--layers", "3", "--data", "imgs", "--out", "feats", "--image-size",
            "16", "--batch-size", "2", "--dtype", "bfloat16"]
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert run(argv, console=console) == 2  # the model fails on its third batch
    manifest = json.loads((tmp_path / "feats" / "manifest.json").read_text())
    line = shlex.join(["hookkit", *argv])
    assert manifest["command"] == {"line": line, "cwd": str(tmp_path)}
    assert "command" not in manifest["settings"]
    with pytest.raises(hookkit.ExtractError, match="not finished: 4 of 8 rows") as caught:
        hookkit.load_features("feats")
    assert f"run the command that wrote it again in {tmp_path}: {line}" in str(caught.value)

    sys.modules["failing_model"].FAIL_AT[0] = None
    assert run(argv, console=console) == 0, console.file.getvalue()  # the same command resumes (settings match)
    shown = " ".join(console.file.getvalue().split())
    assert "4 of them already written by an earlier run, resumed" in shown and "bfloat16" in shown
    feats = hookkit.load_features("feats")
    assert feats.torch("3").dtype == torch.bfloat16 and feats.torch("3").shape == (8, 4)
    assert feats.manifest["command"]["line"] == line


# -- under torchrun ----------------------------------------------------------------------------------------------------

_WORKER = """
import os, sys
import torch
sys.path.insert(0, {here!r})
from test_extract_dtypes import Masked, padded
import hookkit

torch.set_num_threads(1)
out, pool = sys.argv[1], sys.argv[2]
hookkit.extract(Masked(torch.bfloat16), ["net.0", "net.2"], padded(torch.bfloat16), out=out,
                pool=None if pool == "none" else pool, dtype=torch.bfloat16, progress=False)
os._exit(0)
"""


@pytest.mark.parametrize("pool", ["none", "max"])
def test_two_ranks_write_the_same_bfloat16_files_as_one_process(pool, tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER.format(here=str(Path(__file__).resolve().parent)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "two"), pool],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    results = [(p.returncode, o) for p, o in zip(procs, outputs, strict=True)]
    assert all(code == 0 for code, _ in results), results
    one = hookkit.extract(Masked(torch.bfloat16), ["net.0", "net.2"], padded(torch.bfloat16), out=tmp_path / "one",
                          pool=None if pool == "none" else pool, dtype=torch.bfloat16, progress=False)
    two = hookkit.load_features(tmp_path / "two")
    for layer in one:
        assert two.path(layer).read_bytes() == one.path(layer).read_bytes()
        assert two.torch(layer).dtype == torch.bfloat16
    assert two.manifest["torch_dtypes"] == {"net.0": "bfloat16", "net.2": "bfloat16"}
