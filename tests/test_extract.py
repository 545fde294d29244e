"""extract(): a whole dataset's features, equal to one big forward pass, streamed, resumable, torchrun-ready."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import hookkit

from _optional import needs_torchvision, torchvision
from conftest import hook_census

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _progress import done_ranges  # noqa: E402

from _extract_worker import model_and_data  # noqa: E402


def raw_outputs(model, names, *args, **kwargs):
    """The reference: one forward of the whole dataset, raw hooks that clone."""
    got = {}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            model.eval()
            model(*args, **kwargs)
    finally:
        for h in hs:
            h.remove()
    return got


class Counting:
    """An iterable of batches that counts how many were taken, and can fail after k of them."""

    def __init__(self, batches, fail_after=None):
        self.batches, self.fail_after, self.taken = batches, fail_after, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            if self.fail_after is not None and self.taken == self.fail_after:
                raise OSError("disk went away")
            self.taken += 1
            yield b


def forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("use_out", [False, True])
def test_equals_one_big_forward_for_every_batch_kind(kind, use_out, tmp_path):
    model, x, batches = model_and_data(23, 5)  # 23 rows: the last batch is short
    data = {"tensor": [b[0] for b in batches], "tuple": batches,
            "dict": [{"input": b[0]} for b in batches]}[kind]
    if kind == "dict":
        class KW(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input):
                return self.inner(input)

        model = KW(model)
        names = ["inner.1", "inner.3"]
    else:
        names = ["1", "3"]
    feats = hookkit.extract(model, names, data, out=tmp_path / "f" if use_out else None, progress=False)
    ref = raw_outputs(model, names, x) if kind != "dict" else raw_outputs(model, names, input=x)
    for n in names:
        assert feats[n].shape == (23, *ref[n].shape[1:])
        np.testing.assert_allclose(feats[n], ref[n].numpy(), rtol=1e-6, atol=1e-6)
        if use_out:
            assert isinstance(feats[n], np.memmap)
            np.testing.assert_array_equal(np.load(tmp_path / "f" / f"{n}.npy"), feats[n])


@needs_torchvision
@pytest.mark.parametrize("pool", ["avg", "max", "flatten", None, "custom"])
def test_pooling_of_conv_activations(pool, tmp_path):
    model = torchvision.models.resnet18().eval()
    x = torch.randn(6, 3, 32, 32)
    fn = (lambda t: t[:, :4].mean(dim=(2, 3))) if pool == "custom" else pool
    feats = hookkit.extract(model, ["layer2", "avgpool"], [x[:4], x[4:]], out=tmp_path, pool=fn, progress=False)
    ref = raw_outputs(model, ["layer2"], x)["layer2"]
    expected = {"avg": ref.mean(dim=(2, 3)), "max": ref.amax(dim=(2, 3)), "flatten": ref.reshape(6, -1),
                None: ref, "custom": ref[:, :4].mean(dim=(2, 3))}[pool]
    np.testing.assert_allclose(feats["layer2"], expected.numpy(), rtol=1e-5, atol=1e-5)


@needs_torchvision
def test_inplace_relu_after_the_layer_does_not_leak_into_its_rows():
    """bn1 is followed by ReLU(inplace=True): rows are taken at hook time, before the ReLU overwrites them."""
    model = torchvision.models.resnet18().eval()
    x = torch.randn(4, 3, 32, 32)
    feats = hookkit.extract(model, ["bn1"], [x], pool="flatten", progress=False)
    with torch.no_grad():
        truth = model.bn1(model.conv1(x)).reshape(4, -1)
    assert truth.min() < 0
    np.testing.assert_allclose(feats["bn1"], truth.numpy(), rtol=1e-5, atol=1e-5)


def test_select_picks_from_structured_outputs_and_cls_pools_tokens():
    class Tokens(nn.Module):
        def forward(self, x):
            return {"hidden": x * 2, "aux": (x.sum(-1), None)}

    model = nn.Sequential(nn.Linear(4, 4), Tokens())
    x = torch.randn(5, 3, 4)
    first = hookkit.extract(model, ["1"], [x], pool="cls", progress=False)  # default: the first tensor
    by_key = hookkit.extract(model, ["1"], [x], pool="cls", select="hidden", progress=False)
    by_fn = hookkit.extract(model, ["1"], [x], select={"1": lambda out: out["aux"][0]}, progress=False)
    with torch.no_grad():
        h = model[0](x) * 2
    np.testing.assert_allclose(first["1"], h[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(by_key["1"], h[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(by_fn["1"], model[0](x).sum(-1).detach().numpy(), rtol=1e-5)


def test_dtype_float16_halves_the_files(tmp_path):
    model, x, batches = model_and_data(10, 4)
    f32 = hookkit.extract(model, ["1"], batches, out=tmp_path / "a", progress=False)
    f16 = hookkit.extract(model, ["1"], batches, out=tmp_path / "b", dtype=torch.float16, progress=False)
    assert f16["1"].dtype == np.float16
    size = lambda p: os.path.getsize(p) - 512  # noqa: E731 - data bytes after the fixed header
    assert size(tmp_path / "b" / "1.npy") * 2 == size(tmp_path / "a" / "1.npy")
    np.testing.assert_allclose(f16["1"], f32["1"], rtol=1e-3, atol=1e-3)


def test_model_mode_is_restored_and_hooks_removed_also_on_error(tmp_path):
    model, x, batches = model_and_data(10, 4)
    model.train()
    before = hook_census(model)
    hookkit.extract(model, ["1"], batches, progress=False)
    assert model.training and hook_census(model) == before
    with pytest.raises(hookkit.ExtractError):
        hookkit.extract(model, ["1"], batches + [torch.randn(2, 7)], progress=False)
    assert model.training and hook_census(model) == before


def test_stop_runs_only_up_to_the_deepest_requested_layer():
    model, x, batches = model_and_data(15, 5)
    ran = []
    h = model[4].register_forward_hook(lambda *a: ran.append(1))
    try:
        hookkit.extract(model, ["1"], batches, progress=False)
        assert len(ran) == 1  # the first batch runs the whole forward (a layer that runs twice is refused)
        ran.clear()
        hookkit.extract(model, ["1"], batches, progress=False, stop=False)
        assert len(ran) == 3
    finally:
        h.remove()


# -- resume -----------------------------------------------------------------------------------------------------------

def test_interrupted_run_resumes_after_the_last_complete_batch(tmp_path):
    model, x, batches = model_and_data(40, 4)  # 10 batches
    out = tmp_path / "feats"
    calls, h = forward_counter(model)
    try:
        with pytest.raises(IOError):
            hookkit.extract(model, ["1", "3"], Counting(batches, fail_after=6), out=out, progress=False)
        assert len(calls) == 6
        assert not (out / "1.npy").exists() and (out / "1.npy.partial").exists()  # never mistaken for complete
        calls.clear()
        feats = hookkit.extract(model, ["1", "3"], Counting(batches), out=out, progress=False)
        assert len(calls) == 4  # only the unfinished batches
        calls.clear()
        source = Counting(batches)
        again = hookkit.extract(model, ["1", "3"], source, out=out, progress=False)
        assert calls == [] and source.taken == 0  # a finished run returns at once
    finally:
        h.remove()
    ref = raw_outputs(model, ["1", "3"], x)
    for n in ["1", "3"]:
        np.testing.assert_allclose(feats[n], ref[n].numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(again[n], feats[n])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 40 and manifest["shapes"]["1"] == [40, 16]


def test_a_run_with_other_arguments_is_refused_and_nothing_is_lost(tmp_path):
    model, x, batches = model_and_data(12, 4)
    out = tmp_path / "feats"
    hookkit.extract(model, ["1"], batches, out=out, progress=False)
    before = (out / "1.npy").read_bytes()
    with pytest.raises(hookkit.ExtractError, match="pool differ.*another out= folder"):
        hookkit.extract(model, ["1"], batches, out=out, pool="max", progress=False)
    with torch.no_grad():
        model[0].weight.add_(1)  # other weights: the features would differ
    with pytest.raises(hookkit.ExtractError, match="model differ"):
        hookkit.extract(model, ["1"], batches, out=out, progress=False)
    assert (out / "1.npy").read_bytes() == before


def test_kill_9_midway_leaves_files_the_next_run_completes(tmp_path):
    out = tmp_path / "feats"
    worker = [sys.executable, str(HERE / "_extract_worker.py"), "slow", str(out), "60", "4"]  # 15 batches
    proc = subprocess.Popen(worker, stdout=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("batch")
        if seen == 7:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "1.npy").exists()
    model, x, batches = model_and_data(60, 4)
    calls, h = forward_counter(model)
    try:
        feats = hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
    finally:
        h.remove()
    assert 8 <= len(calls) <= 9  # at most the batch that was being written is done again
    ref = raw_outputs(model, ["1", "3"], x)
    for n in ["1", "3"]:
        np.testing.assert_allclose(feats[n], ref[n].numpy(), rtol=1e-6, atol=1e-6)


# -- torchrun ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch", [(37, 5), (40, 4)])
def test_torchrun_two_processes_write_the_same_files_as_one(n, batch, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    model, x, batches = model_and_data(n, batch)
    hookkit.extract(model, ["1", "3"], batches, out=one, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_extract_worker.py"), "dist", str(two), str(n), str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["1", "3"]:
        assert (one / f"{name}.npy").read_bytes() == (two / f"{name}.npy").read_bytes()
    ranks = sorted(p.name for p in (two / "progress").glob("rank-*.json"))
    assert ranks == ["rank-0.json", "rank-1.json"]


# -- bad input ---------------------------------------------------------------------------------------------------------

def test_empty_data_is_an_error():
    model, _, _ = model_and_data(4, 4)
    with pytest.raises(hookkit.ExtractError, match="no batches"):
        hookkit.extract(model, ["1"], [], progress=False)


def test_a_batch_the_model_rejects_is_named_and_earlier_rows_stay(tmp_path):
    model, x, batches = model_and_data(12, 4)
    bad = batches[:2] + [torch.randn(4, 7)] + batches[2:]
    with pytest.raises(hookkit.ExtractError, match="failed on batch 2 \\(4 samples\\)"):
        hookkit.extract(model, ["1"], bad, out=tmp_path, progress=False)
    assert done_ranges(tmp_path) == [[0, 8]]  # rows, not batches: a resumed run may use another batch size


def test_the_final_renames_are_followed_by_a_sync_of_the_folder(tmp_path, monkeypatch):
    """The finished files get their final names by renames, which a power cut could undo unless the folder is
    synced after them."""
    from hookkit.core import fs as _fs

    events: list[str] = []
    real_replace, real_sync_folder = os.replace, _fs.sync_folder
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    monkeypatch.setattr(_fs, "sync_folder", lambda folder: (events.append(f"sync {Path(folder)}"),
                                                            real_sync_folder(folder))[1])
    model, x, batches = model_and_data(8, 4)
    hookkit.extract(model, ["1", "3"], batches, out=tmp_path / "f", progress=False)
    last = max(events.index(f"replace {n}.npy") for n in ["1", "3"])
    assert f"sync {tmp_path / 'f'}" in events[last + 1:]


def test_an_out_that_is_a_file_is_refused_before_the_model_runs(tmp_path):
    """extract checks out= as the command line checks --out (one function, each naming its own option)."""
    model, x, batches = model_and_data(8, 4)
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(hookkit.ExtractError, match=r"out='.*notes.txt' is a file, not a folder; pass a folder"):
        hookkit.extract(model, ["1"], batches, out=target, progress=False)
    assert calls == [] and target.read_text() == "keep me"


def test_unwritable_out_and_layer_that_never_runs(tmp_path):
    model, x, batches = model_and_data(8, 4)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(hookkit.ExtractError, match=r"out=.*lies below .*, which is a file and so cannot hold"):
        hookkit.extract(model, ["1"], batches, out=blocker / "sub", progress=False)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(hookkit.ExtractError, match="'b' did not run on batch 0"):
        hookkit.extract(Skips(), ["a", "b"], batches, progress=False)
    with pytest.raises(LookupError):
        hookkit.extract(model, ["nope"], batches, progress=False)
    with pytest.raises(ValueError, match="pool="):
        hookkit.extract(model, ["1"], batches, pool="mean", progress=False)


def test_a_layer_that_runs_twice_is_refused():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(hookkit.ExtractError, match="ran more than once"):
        hookkit.extract(model, ["0"], [torch.randn(2, 6)], progress=False, stop=False)


def test_progress_bar_only_on_a_terminal_with_rate_and_bytes():
    import io

    from rich.console import Console

    from hookkit.extraction.extract import _progress

    assert _progress(True, 3, Console(file=io.StringIO())) is None  # a file / pipe / CI: silent
    assert _progress(False, 3, Console(file=io.StringIO(), force_terminal=True)) is None
    screen = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    bar = _progress(True, 4, screen)
    bar.update(2, 128, 3 * 2**20)
    bar.stop()
    text = screen.file.getvalue()
    assert "2/4" in text and "images/s" in text and "3.0 MiB written" in text


@needs_torchvision
def test_each_modules_own_mode_is_restored_not_just_the_roots():
    """A DataParallel wrapper is in train mode around an eval model: restoring model.train() would flip the
    wrapped model into train mode (and its BatchNorms would use batch statistics from then on)."""
    inner = torchvision.models.resnet18().eval()
    wrapper = nn.DataParallel(inner)
    inner.layer1.train()
    modes = {name: m.training for name, m in wrapper.named_modules()}
    hookkit.extract(wrapper, ["layer2"], [torch.randn(2, 3, 32, 32)], progress=False)
    assert {name: m.training for name, m in wrapper.named_modules()} == modes
