"""extract() on token outputs of padded batches: mask-aware pooling, ragged token layers (in memory, on disk, resumed,
split across ranks), the background writer and the order of syncs. A tiny token model keeps these fast; the real
MiniLM weights are in tests/test_extract_text.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import hookkit
from hookkit.core import fs as _fs
from hookkit.extraction import npy as _npy
from hookkit.extraction import npyfolder as _npyfolder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _progress import done_ranges  # noqa: E402

LAYERS = ["net.1", "net.3"]


class TokenNet(nn.Module):
    """Per-token layers: the rows of a valid token do not depend on the padding beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sequences(n: int = 40, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(t), 16, generator=g) for t in torch.randint(1, 12, (n,), generator=g)]


def padded(seqs: list[torch.Tensor], batch: int, *, pad: float = 0.0, key: str = "attention_mask") -> list[dict]:
    """Dict batches, each padded to its own longest sequence with ``pad``."""
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        t = max(len(s) for s in chunk)
        x = torch.full((len(chunk), t, 16), pad)
        mask = torch.zeros(len(chunk), t, dtype=torch.long)
        for j, s in enumerate(chunk):
            x[j, :len(s)] = s
            mask[j, :len(s)] = 1
        out.append({"x": x, key: mask})
    return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TokenNet().eval()


def own(model: TokenNet, s: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's output for one sequence alone, unpadded."""
    depth = {"net.1": 2, "net.3": 4}[layer]
    with torch.no_grad():
        return model.net[:depth](s)


# -- mask-aware pooling ------------------------------------------------------------------------------------------------

def test_avg_pools_only_valid_tokens_as_sentence_transformers_and_not_the_naive_mean(model):
    seqs = sequences()
    batches = padded(seqs, 8, pad=3.0)  # padding that would move a naive mean a lot
    feats = hookkit.extract(model, LAYERS, batches, pool="avg", progress=False)
    for layer in LAYERS:
        want = torch.stack([own(model, s, layer).mean(0) for s in seqs])
        torch.testing.assert_close(torch.from_numpy(feats[layer]), want, rtol=1e-5, atol=1e-6)
    # sentence-transformers' formula on the padded batch itself, op for op: equal to the last bit
    with torch.no_grad():
        h = model.net[:4](batches[0]["x"])
        m = batches[0]["attention_mask"].unsqueeze(-1).expand(h.size()).to(h.dtype)
        formula = torch.sum(h * m, 1) / torch.clamp(m.sum(1), min=1e-9)
        naive = h.mean(1)
    assert torch.equal(torch.from_numpy(feats["net.3"][:8]), formula)
    assert (torch.from_numpy(feats["net.3"][:8]) - naive).abs().max() > 0.05
    naive_feats = hookkit.extract(model, ["net.3"], batches, pool="avg", mask=False, progress=False)
    np.testing.assert_array_equal(naive_feats["net.3"][:8], naive.numpy())  # mask=False: the old, naive mean


def test_a_samples_pooled_features_do_not_depend_on_what_it_was_batched_with(model):
    seqs = sequences()
    alone = hookkit.extract(model, ["net.3"], padded(seqs, 1), pool="avg", progress=False)["net.3"]
    for batch in (3, 8, 40):
        together = hookkit.extract(model, ["net.3"], padded(seqs, batch), pool="avg", progress=False)["net.3"]
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_max_ignores_padding_and_cls_is_the_first_token(model):
    seqs = sequences()
    batches = padded(seqs, 8, pad=50.0)  # padding that would win every max
    feats = hookkit.extract(model, ["net.3"], batches, pool="max", progress=False)
    want = torch.stack([own(model, s, "net.3").amax(0) for s in seqs])
    torch.testing.assert_close(torch.from_numpy(feats["net.3"]), want, rtol=1e-5, atol=1e-6)
    cls = hookkit.extract(model, ["net.3"], batches, pool="cls", progress=False)
    torch.testing.assert_close(torch.from_numpy(cls["net.3"]), torch.stack([own(model, s, "net.3")[0] for s in seqs]),
                               rtol=1e-5, atol=1e-6)


def test_mask_as_a_key_or_a_callable_for_other_layouts(model):
    seqs = sequences()
    by_key = hookkit.extract(model, ["net.3"], padded(seqs, 8, key="valid", pad=3.0), pool="avg", mask="valid",
                             progress=False)
    as_tuples = [(b["x"], b["attention_mask"]) for b in padded(seqs, 8, pad=3.0)]

    class Positional(nn.Module):
        def __init__(self, inner: TokenNet) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    by_callable = hookkit.extract(Positional(model), ["inner.net.3"], as_tuples, pool="avg", mask=lambda b: b[1],
                                  progress=False)
    want = torch.stack([own(model, s, "net.3").mean(0) for s in seqs]).numpy()
    np.testing.assert_allclose(by_key["net.3"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_callable["inner.net.3"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask, batches, error, match", [
    (True, None, TypeError, "mask=True"),
    ("valid", "tuples", hookkit.ExtractError, "is a tuple: pass a callable"),
    ("valid", None, hookkit.ExtractError, "has no such key"),
    (lambda b: b["attention_mask"][:, :1, None], None, hookkit.ExtractError, r"expected \[N, T\]"),
    (lambda b: b["attention_mask"][:, :2], None, hookkit.ExtractError, "cannot tell its padding"),
])
def test_a_bad_mask_is_named_with_the_fix_and_nothing_is_written(model, mask, batches, error, match, tmp_path):
    data = padded(sequences(), 8)
    if batches == "tuples":
        data = [(b["x"],) for b in data]
    with pytest.raises(error, match=match):
        hookkit.extract(model, ["net.3"], data, pool="avg", mask=mask, out=tmp_path / "f", progress=False)
    assert not (tmp_path / "f" / "manifest.json").exists()
    assert not list((tmp_path / "f").glob("*.partial"))


# -- ragged token layers -----------------------------------------------------------------------------------------------

def test_ragged_tokens_equal_each_sequences_own_forward_in_memory_and_on_disk(model, tmp_path):
    seqs = sequences()
    mem = hookkit.extract(model, LAYERS, padded(seqs, 8), progress=False)
    disk = hookkit.extract(model, LAYERS, padded(seqs, 8), out=tmp_path / "f", progress=False)
    total = sum(len(s) for s in seqs)
    for layer in LAYERS:
        assert mem[layer].shape == (total, 64 if layer == "net.1" else 32)
        want_offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
        np.testing.assert_array_equal(mem.offsets(layer), want_offsets)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(torch.from_numpy(np.array(mem.tokens(layer, i))), own(model, s, layer),
                                       rtol=1e-5, atol=1e-6)
        # numpy alone reads the folder
        flat = np.load(tmp_path / "f" / f"{layer}.npy")
        offsets = np.load(tmp_path / "f" / f"{layer}.offsets.npy")
        assert offsets.dtype == np.int64 and offsets.shape == (len(seqs) + 1,)
        np.testing.assert_array_equal(flat, mem[layer])
        np.testing.assert_array_equal(offsets, want_offsets)
        np.testing.assert_array_equal(disk.tokens(layer, 5), flat[offsets[5]:offsets[6]])
        assert disk.path(layer) == tmp_path / "f" / f"{layer}.npy"
    assert sorted(p.name for p in (tmp_path / "f").iterdir() if p.is_file()) == [
        "manifest.json", "net.1.npy", "net.1.offsets.npy", "net.3.npy", "net.3.offsets.npy"]
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["shapes"]["net.3"] == [total, 32] and manifest["ragged"]["net.3"]["tokens"] == total


def test_tokens_and_offsets_refuse_what_is_not_there(model):
    feats = hookkit.extract(model, LAYERS, padded(sequences(5), 2), progress=False)
    with pytest.raises(IndexError, match="there are 5 samples"):
        feats.tokens("net.3", 5)
    np.testing.assert_array_equal(feats.tokens("net.3", -1), feats.tokens("net.3", 4))
    pooled = hookkit.extract(model, ["net.3"], padded(sequences(5), 2), pool="avg", progress=False)
    with pytest.raises(ValueError, match="one row per sample"):
        pooled.offsets("net.3")


def test_padded_batches_without_a_mask_are_an_extract_error_naming_layer_batch_and_fix(model, tmp_path):
    data = [(b["x"],) for b in padded(sequences(), 8)]  # padded to other lengths, no mask
    for out in (None, tmp_path / "f"):
        with pytest.raises(hookkit.ExtractError, match=r"'net.3': batch 1 gave rows of shape .* attention_mask"):
            hookkit.extract(model, ["net.3"], data, out=out, progress=False)


def fail_on(model: TokenNet, k: int) -> list[int]:
    """Make ``model`` raise on its k-th forward from now on (k = 0: never); returns the list of calls counted."""
    calls: list[int] = []

    def hook(module: nn.Module, args: tuple) -> None:
        calls.append(1)
        if len(calls) == k:
            raise RuntimeError("interrupted")

    model.net[0].register_forward_pre_hook(hook)
    return calls


def interrupted(model: TokenNet, k: int, batches: list[dict], out: Path) -> TokenNet:
    """Extract into ``out`` until ``model`` raises on its k-th forward; returns the same model, rebuilt (no hook)."""
    fail_on(model, k)
    with pytest.raises(hookkit.ExtractError, match=f"batch {k - 1}"):
        hookkit.extract(model, LAYERS, batches, out=out, progress=False)
    torch.manual_seed(0)
    return TokenNet().eval()


def test_ragged_resume_after_an_interruption_gives_the_uninterrupted_files(model, tmp_path):
    torch.set_num_threads(1)  # the same kernels in every run
    seqs = sequences(60)
    hookkit.extract(model, LAYERS, padded(seqs, 8), out=tmp_path / "ref", progress=False)
    model = interrupted(model, 5, padded(seqs, 8), tmp_path / "f")
    assert (tmp_path / "f" / "net.3.npy.rank-0.partial").exists()
    calls = fail_on(model, 0)
    hookkit.extract(model, LAYERS, padded(seqs, 8), out=tmp_path / "f", progress=False)
    assert len(calls) == 8 - 4  # only the batches not written before
    for name in ("net.1.npy", "net.1.offsets.npy", "net.3.npy", "net.3.offsets.npy"):
        assert (tmp_path / "f" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not list((tmp_path / "f").glob("*.partial"))


def test_a_ragged_run_resumed_with_another_batch_size_keeps_its_rows_in_order(model, tmp_path):
    seqs = sequences(60)
    model = interrupted(model, 4, padded(seqs, 8), tmp_path / "f")
    assert padded(seqs, 8)[0]["x"].shape[1] != padded(seqs, 2)[0]["x"].shape[1]  # sample 0 padded otherwise
    feats = hookkit.extract(model, LAYERS, padded(seqs, 2), out=tmp_path / "f", progress=False)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(torch.from_numpy(np.array(feats.tokens("net.3", i))), own(model, s, "net.3"),
                                   rtol=1e-5, atol=1e-6)


def test_a_cut_chunk_is_noticed_and_its_rows_computed_again(model, tmp_path):
    seqs = sequences(60)
    model = interrupted(model, 6, padded(seqs, 8), tmp_path / "f")
    chunk = tmp_path / "f" / "net.3.npy.rank-0.partial"
    os.truncate(chunk, chunk.stat().st_size - 32 * 4 * 3)  # the last three tokens gone
    with pytest.warns(UserWarning, match="token files of 'net.3' lost rows"):
        feats = hookkit.extract(model, LAYERS, padded(seqs, 8), out=tmp_path / "f", progress=False)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(torch.from_numpy(np.array(feats.tokens("net.3", i))), own(model, s, "net.3"),
                                   rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(out: Path, *args: str) -> None:
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    procs = [subprocess.Popen([sys.executable, str(HERE / "_tokens_worker.py"), str(out), *args],
                              env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    return [(p.returncode, o) for p, o in zip(procs, outputs, strict=True)]


def test_two_ranks_write_the_same_ragged_files_as_one_process(tmp_path):
    results = _two_ranks(tmp_path / "two", "ok")
    assert all(code == 0 for code, _ in results), results
    single = subprocess.run([sys.executable, str(HERE / "_tokens_worker.py"), str(tmp_path / "one"), "ok"],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stdout + single.stderr
    for name in ("net.1.npy", "net.1.offsets.npy", "net.3.npy", "net.3.offsets.npy"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not list((tmp_path / "two").glob("*.partial"))


def test_ranks_whose_rows_differ_in_shape_are_refused_before_they_mix_in_the_file(tmp_path):
    results = _two_ranks(tmp_path / "f", "unmasked")
    errors = [o for code, o in results if code != 0]
    assert errors and any("rank 0's batch 0 gave" in o or "rank 1's batch 1 gave" in o for o in errors), results


# -- the background writer and durability ------------------------------------------------------------------------------

def test_the_next_forward_runs_while_a_batch_is_written(model, tmp_path, monkeypatch):
    """Batch 0's write waits until batch 1's forward began: without a background writer it would wait forever (the
    timeout fails the test)."""
    second_forward = threading.Event()
    overlapped = []
    real_write = _npyfolder.NpyFolder.write

    def slow_write(self, first_row, rows, *, batch):
        if batch == 0:
            overlapped.append(second_forward.wait(timeout=10))
        return real_write(self, first_row, rows, batch=batch)

    monkeypatch.setattr(_npyfolder.NpyFolder, "write", slow_write)
    calls = fail_on(model, 0)
    model.net[0].register_forward_pre_hook(lambda m, a: second_forward.set() if len(calls) == 2 else None)
    hookkit.extract(model, LAYERS, padded(sequences(), 8), out=tmp_path / "f", progress=False)
    assert overlapped == [True]


def test_a_failed_write_surfaces_at_once_and_every_batch_recorded_as_done_stays(model, tmp_path, monkeypatch):
    seqs = sequences(80)
    hookkit.extract(model, ["net.3"], padded(seqs, 8), pool="avg", out=tmp_path / "ref", progress=False)
    real = _npy.RowFile.write
    count = [0]

    def failing(self, first_row, rows):
        count[0] += 1
        if count[0] == 4:
            raise OSError(5, "Input/output error")
        return real(self, first_row, rows)

    monkeypatch.setattr(_npy.RowFile, "write", failing)
    forwards = fail_on(model, 0)
    with pytest.raises(hookkit.ExtractError, match="could not write"):
        hookkit.extract(model, ["net.3"], padded(seqs, 8), pool="avg", out=tmp_path / "f", progress=False)
    assert len(forwards) <= 4 + 3  # the loop stops within the writer's queue (2) and the batch in hand
    assert done_ranges(tmp_path / "f") == [[0, 24]]  # batches 0-2 written and recorded; nothing after the failure
    monkeypatch.setattr(_npy.RowFile, "write", real)
    forwards.clear()
    hookkit.extract(model, ["net.3"], padded(seqs, 8), pool="avg", out=tmp_path / "f", progress=False)
    assert len(forwards) == 10 - 3
    assert (tmp_path / "f" / "net.3.npy").read_bytes() == (tmp_path / "ref" / "net.3.npy").read_bytes()


@pytest.mark.parametrize("on_disk", [False, True])
def test_ragged_tokens_of_a_bfloat16_model_without_dtype_are_stored_as_float32_exactly(model, on_disk, tmp_path):
    """numpy has no bfloat16: a ragged layer of a bfloat16 model is stored as float32 (every bfloat16 value is one
    float32 exactly), as pooled rows are, unless dtype= says otherwise."""
    model = model.to(torch.bfloat16)
    batches = [{**b, "x": b["x"].to(torch.bfloat16)} for b in padded(sequences(20), 8)]
    out = tmp_path / "f" if on_disk else None
    feats = hookkit.extract(model, LAYERS, batches, out=out, progress=False)
    for layer in LAYERS:
        depth = {"net.1": 2, "net.3": 4}[layer]
        with torch.no_grad():
            want = torch.cat([model.net[:depth](b["x"])[b["attention_mask"].bool()] for b in batches])
        assert feats[layer].dtype == np.float32
        np.testing.assert_array_equal(feats[layer], want.float().numpy())
    if on_disk:
        assert np.load(tmp_path / "f" / "net.3.npy").dtype == np.float32


def test_a_batch_is_recorded_as_done_only_after_its_rows_are_synced(model, tmp_path, monkeypatch):
    events: list[str] = []
    real_sync, real_replace = _fs.sync, os.replace

    def sync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append("sync json" if Path(path).name.startswith(".rank-0.json.") else f"sync {path}")
        real_sync(fd)
    monkeypatch.setattr(_fs, "sync", sync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    hookkit.extract(model, LAYERS, padded(sequences(24), 8), out=tmp_path / "f", progress=False)
    records = [i for i, e in enumerate(events) if e.endswith("/progress/rank-0.rows")]  # a batch's rows marked done
    assert len(records) == 3
    layouts = events.index("replace rank-0.json")  # the row shapes, recorded once, before any row is marked
    assert events[layouts - 1] == "sync json" and layouts < records[0]
    for k, at in enumerate(records):
        before = events[records[k - 1] if k else 0:at]
        synced = [e.rsplit("/", 1)[-1] for e in before if e.startswith("sync /")]
        assert set(synced) >= {"net.1.npy.rank-0.partial", "net.1.npy.index.partial", "net.3.npy.rank-0.partial",
                               "net.3.npy.index.partial"}, before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_pinned_copies_on_a_side_stream_give_the_rows_of_the_cpu_run(model, tmp_path):
    seqs = sequences(60)
    cpu = hookkit.extract(model, LAYERS, padded(seqs, 8), out=tmp_path / "cpu", progress=False)
    gpu = hookkit.extract(model.cuda(), LAYERS, padded(seqs, 8), out=tmp_path / "gpu", progress=False)
    pooled = hookkit.extract(model, ["net.3"], padded(seqs, 8), pool="avg", out=tmp_path / "avg", progress=False)
    for layer in LAYERS:
        np.testing.assert_array_equal(gpu.offsets(layer), cpu.offsets(layer))
        np.testing.assert_allclose(gpu[layer], cpu[layer], rtol=1e-4, atol=1e-5)
    want = torch.stack([own(model.cpu(), s, "net.3").mean(0) for s in seqs]).numpy()
    np.testing.assert_allclose(pooled["net.3"], want, rtol=1e-4, atol=1e-5)


# -- a sample with no valid token --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["max", "avg"])
def test_a_sample_whose_mask_is_all_zeros_is_refused_naming_it_and_earlier_batches_are_kept(model, tmp_path, pool):
    """Max over no token used to give float32's lowest number (-3.4e38) in every feature, and the mean 0 / 0 a row
    of zeros: neither is a feature of the sample. It is refused before anything of its batch is written; the
    batches before it stay, and a run with the sample fixed resumes from there."""
    seqs = sequences(24)
    batches = padded(seqs, 8)
    broken = [dict(b) for b in batches]
    broken[1] = {"x": batches[1]["x"], "attention_mask": batches[1]["attention_mask"].clone()}
    broken[1]["attention_mask"][3] = 0  # sample 8 + 3 = 11
    census = hookkit.hook_census(model)
    modes = torch.overrides._get_current_function_mode_stack()
    with pytest.raises(hookkit.ExtractError, match=rf"sample 11 \(row 3 of batch 1\) has no valid token: its mask "
                       rf"is all zeros, so pool='{pool}' over the valid tokens of 'net.1' has no value"):
        hookkit.extract(model, LAYERS, broken, out=tmp_path / "feats", pool=pool, progress=False)
    assert hookkit.hook_census(model) == census and torch.overrides._get_current_function_mode_stack() == modes
    with pytest.raises(hookkit.ExtractError, match="sample 11 "):  # in memory too
        hookkit.extract(model, LAYERS, broken, pool=pool, progress=False)
    assert done_ranges(tmp_path / "feats") == [[0, 8]]  # batch 0 is kept, nothing of batch 1

    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="skips the batches already written"):
            feats = hookkit.extract(model, LAYERS, batches, out=tmp_path / "feats", pool=pool, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # resumed: batches 1 and 2 only
    for layer in LAYERS:
        reduce = (lambda h: h.amax(0)) if pool == "max" else (lambda h: h.mean(0))
        want = torch.stack([reduce(own(model, s, layer)) for s in seqs])
        torch.testing.assert_close(torch.from_numpy(np.array(feats[layer])), want, rtol=1e-5, atol=1e-6)


def test_without_pooling_a_sample_with_no_valid_token_has_no_tokens(model):
    """pool=None keeps each sample's valid tokens: none is a well-defined answer, not refused."""
    seqs = sequences(8)
    (batch,) = padded(seqs, 8)
    batch["attention_mask"][2] = 0
    feats = hookkit.extract(model, ["net.1"], [batch], progress=False)
    offsets = feats.offsets("net.1")
    assert offsets[3] == offsets[2] and len(feats.tokens("net.1", 2)) == 0
    torch.testing.assert_close(torch.from_numpy(np.array(feats.tokens("net.1", 3))), own(model, seqs[3], "net.1"))
