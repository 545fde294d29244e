"""extract() against hostile use (issue 8): folders changed between runs, other batch sizes, other models, two
writers at once, bad options, odd layers and a full disk. Every test is a way a user met wrong rows or a raw error."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import hookkit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _extract_worker import model_and_data  # noqa: E402

HEADER = 512  # hookkit's fixed .npy header


def reference(model, names, x, **kwargs):
    """One forward of the whole dataset with raw hooks that clone: what every extraction must equal."""
    got = {}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o.detach().clone()))
          for n in names]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(x, **kwargs)
    finally:
        model.train(was)
        for h in hs:
            h.remove()
    return {n: got[n].numpy() for n in names}


def batches_of(x, size):
    return [(x[i:i + size], torch.zeros(len(x[i:i + size]))) for i in range(0, len(x), size)]


class Failing:
    """Batches that raise after ``fail_after`` of them: an interrupted run."""

    def __init__(self, batches, fail_after=None):
        self.batches, self.fail_after = batches, fail_after

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.fail_after:
                raise OSError("the data went away")
            yield b


def interrupted(model, names, batches, out, fail_after, **kwargs):
    with pytest.raises(IOError, match="went away"):
        hookkit.extract(model, names, Failing(batches, fail_after), out=out, progress=False, **kwargs)


def forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda *a: calls.append(1))


def assert_exact_files(out, feats):
    """Each finished file holds exactly header + N rows: nothing left past the last row."""
    for name, arr in feats.items():
        path = feats.path(name) if hasattr(feats, "path") else out / f"{name}.npy"
        assert os.path.getsize(path) == HEADER + arr.nbytes, name
        np.testing.assert_array_equal(np.load(path), arr)  # plain numpy, no mmap


# -- 1. a .partial deleted or cut between runs ---------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_partial_file_is_recomputed_not_returned_as_zeros(damage, tmp_path):
    model, x, batches = model_and_data(40, 4)
    out = tmp_path / "feats"
    interrupted(model, ["1", "3"], batches, out, fail_after=6)
    partial = out / "1.npy.partial"
    if damage == "deleted":
        partial.unlink()
    else:
        os.truncate(partial, HEADER + 5 * 16 * 4)  # 5 of the 24 rows progress claims
    with pytest.warns(UserWarning, match="1.npy.partial"):
        feats = hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
    ref = reference(model, ["1", "3"], x)
    for n in ["1", "3"]:
        np.testing.assert_allclose(feats[n], ref[n], rtol=1e-6, atol=1e-6)
    assert_exact_files(out, feats)


# -- 2. resuming with another batch size ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,first,fail_after,second", [(40, 4, 6, 5), (40, 4, 6, 3), (10, 3, 2, 5), (23, 5, 3, 2)])
def test_resuming_with_another_batch_size_gives_every_row(n, first, fail_after, second, tmp_path):
    model, x, _ = model_and_data(n, first)
    out = tmp_path / "feats"
    interrupted(model, ["1", "3"], batches_of(x, first), out, fail_after=fail_after)
    feats = hookkit.extract(model, ["1", "3"], batches_of(x, second), out=out, progress=False)
    ref = reference(model, ["1", "3"], x)
    for name in ["1", "3"]:
        assert feats[name].shape[0] == n
        np.testing.assert_allclose(feats[name], ref[name], rtol=1e-5, atol=1e-6)
    again = hookkit.extract(model, ["1", "3"], batches_of(x, second), out=out, progress=False)
    np.testing.assert_array_equal(again["1"], feats["1"])
    assert_exact_files(out, feats)


def test_only_batches_with_unfinished_rows_are_computed_again(tmp_path):
    model, x, _ = model_and_data(40, 4)
    out = tmp_path / "feats"
    interrupted(model, ["1"], batches_of(x, 4), out, fail_after=6)  # rows 0..23 written
    calls, h = forwards(model)
    try:
        hookkit.extract(model, ["1"], batches_of(x, 8), out=out, progress=False)
    finally:
        h.remove()
    assert len(calls) == 2  # of the 5 batches of 8, rows 0..23 (batches 0-2) are done


def test_cli_resume_with_another_batch_size(tmp_path, monkeypatch):
    from test_cli_extract import invoke, make_images

    from hookkit.cli.images import ImageFiles

    make_images(tmp_path / "imgs", n=7)
    args = ["extract", "torchvision:resnet18", "--layers", "avgpool", "--pool", "avg", "--data",
            str(tmp_path / "imgs"), "--image-size", "32"]
    real = ImageFiles.__getitem__

    def flaky(self, index):
        if index >= 4:
            raise OSError("the disk with the images went away")
        return real(self, index)

    monkeypatch.setattr(ImageFiles, "__getitem__", flaky)
    with pytest.raises(IOError):
        invoke([*args, "--out", str(tmp_path / "out"), "--batch-size", "2"])  # rows 0..3 written
    monkeypatch.setattr(ImageFiles, "__getitem__", real)
    code, text = invoke([*args, "--out", str(tmp_path / "out"), "--batch-size", "3"])
    assert code == 0, text
    assert invoke([*args, "--out", str(tmp_path / "whole"), "--batch-size", "3"])[0] == 0
    got = np.load(tmp_path / "out" / "avgpool.npy")
    assert got.shape == (7, 512)
    np.testing.assert_allclose(got, np.load(tmp_path / "whole" / "avgpool.npy"), rtol=1e-4, atol=1e-5)


# -- 3. the model fingerprint ------------------------------------------------------------------------------------------

def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 8))


def scaled(k):
    return lambda t: t * k


@pytest.mark.parametrize("change", ["permuted rows", "bn statistics", "activation", "pool", "select", "closure"])
def test_another_model_or_callable_is_refused_on_resume(change, tmp_path):
    model = bn_model()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    batches = batches_of(x, 4)
    out = tmp_path / "feats"
    first = {"pool": lambda t: t[:, :4], "select": lambda o: o, "closure": scaled(1)}
    kwargs = {"pool": first["pool"], "select": first["select"]}
    if change == "closure":
        kwargs["pool"] = first["closure"]
    interrupted(model, ["3"], batches, out, fail_after=3, **kwargs)
    with torch.no_grad():
        if change == "permuted rows":  # same sum and sum of squares, other features
            perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
            model[0].weight.copy_(model[0].weight[perm])
            model[0].bias.copy_(model[0].bias[perm])
        elif change == "bn statistics":  # buffers, not parameters
            model[1].running_mean.add_(1)
        elif change == "activation":  # no parameters at all
            model[2] = nn.Sigmoid()
    if change == "pool":
        kwargs["pool"] = lambda t: t[:, 4:]
    elif change == "select":
        kwargs["select"] = lambda o: o * 2
    elif change == "closure":
        kwargs["pool"] = scaled(2)
    with pytest.raises(hookkit.ExtractError, match="differ"):
        hookkit.extract(model, ["3"], batches, out=out, progress=False, **kwargs)


def test_the_same_model_rebuilt_and_the_same_callables_resume(tmp_path):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "feats"
    interrupted(bn_model(), ["3"], batches_of(x, 4), out, fail_after=3, pool=scaled(1))
    feats = hookkit.extract(bn_model(), ["3"], batches_of(x, 4), out=out, progress=False, pool=scaled(1))
    np.testing.assert_allclose(feats["3"], reference(bn_model(), ["3"], x)["3"], rtol=1e-5, atol=1e-6)


# -- 4. two writers at once ----------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "feats"
    worker = [sys.executable, str(HERE / "_extract_worker.py"), "slow", str(out), "60", "4"]
    proc = subprocess.Popen(worker, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("batch")  # it holds the folder now
        model, x, batches = model_and_data(60, 4)
        with pytest.raises(hookkit.ExtractError, match="another process is writing"):
            hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0 and "finished" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
    feats = hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)  # finished: returned as it is
    ref = reference(model, ["1", "3"], x)
    for n in ["1", "3"]:
        np.testing.assert_allclose(feats[n], ref[n], rtol=1e-6, atol=1e-6)


def folder_state(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``out``: its inode, modification time and bytes (a file replaced or rewritten shows)."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def test_a_folder_another_writer_finished_while_this_run_wrote_is_returned_as_it_is(tmp_path, monkeypatch):
    """Where the lock cannot keep a second writer out (a file system without flock), one that finishes the folder
    first wins: the run that finishes after it finds the folder marked complete and returns those files unchanged,
    never finishing (rewriting headers, the manifest, renaming) over them."""
    from hookkit.extraction import manifest as _manifest
    from hookkit.extraction import npyfolder as _npyfolder

    monkeypatch.setattr(_manifest, "fcntl", None)  # no advisory locks: the second writer is not noticed
    model, x, batches = model_and_data(24, 4)
    out = tmp_path / "feats"
    real_finish = _npyfolder.NpyFolder.finish
    seen: dict[str, object] = {}

    def finish_after_another_writer(self, batches_done, rows):
        if not seen:  # this run computed every row; another writer finishes the folder before it does
            seen["other"] = None
            seen["other"] = hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
            seen["state"] = folder_state(out)
        return real_finish(self, batches_done, rows)

    monkeypatch.setattr(_npyfolder.NpyFolder, "finish", finish_after_another_writer)
    calls, handle = forwards(model)
    feats = hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
    handle.remove()
    assert len(calls) == len(batches)  # this run's; the other writer found every row written and computed none
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert folder_state(out) == seen["state"]  # nothing rewritten, replaced or renamed after the other finished
    ref = reference(model, ["1", "3"], x)
    for n in ["1", "3"]:
        np.testing.assert_array_equal(feats[n], seen["other"][n])
        np.testing.assert_allclose(feats[n], ref[n], rtol=1e-6, atol=1e-6)
    assert_exact_files(out, feats)
    again = hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)  # finished: returned at once
    assert folder_state(out) == seen["state"] and again.manifest == feats.manifest


# -- 5. a changed dataset ----------------------------------------------------------------------------------------------

def test_a_shrunken_dataset_is_refused_and_leaves_no_rows_past_the_end(tmp_path):
    model, x, batches = model_and_data(40, 4)
    out = tmp_path / "feats"
    interrupted(model, ["1"], batches, out, fail_after=6)  # rows 0..23 written
    with pytest.raises(hookkit.ExtractError, match="24 rows.*20"):
        hookkit.extract(model, ["1"], batches[:5], out=out, progress=False)
    assert not (out / "1.npy").exists()


class Flaky(torch.utils.data.Dataset):
    def __init__(self, x, fail_at=None):
        self.x, self.fail_at = x, fail_at

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise OSError("the data went away")
        return self.x[i]


def test_a_dataset_of_another_length_is_refused_before_any_work(tmp_path):
    model, x, _ = model_and_data(40, 4)
    out = tmp_path / "feats"
    with pytest.raises(IOError):
        hookkit.extract(model, ["1"], DataLoader(Flaky(x, fail_at=8), batch_size=4), out=out, progress=False)
    calls, h = forwards(model)
    try:
        with pytest.raises(hookkit.ExtractError, match="36 samples.*40"):
            hookkit.extract(model, ["1"], DataLoader(Flaky(x[:36]), batch_size=4), out=out, progress=False)
    finally:
        h.remove()
    assert calls == []
    feats = hookkit.extract(model, ["1"], DataLoader(Flaky(x), batch_size=8), out=out, progress=False)
    np.testing.assert_allclose(feats["1"], reference(model, ["1"], x)["1"], rtol=1e-5, atol=1e-6)


def test_other_content_is_refused(tmp_path):
    model, x, batches = model_and_data(40, 4)
    out = tmp_path / "feats"
    interrupted(model, ["1"], batches, out, fail_after=3)
    other = batches_of(x + 1, 4)
    with pytest.raises(hookkit.ExtractError, match="sample 0"):
        hookkit.extract(model, ["1"], other, out=out, progress=False)


def test_another_dataset_id_is_refused(tmp_path):
    model, x, batches = model_and_data(40, 4)
    out = tmp_path / "feats"
    interrupted(model, ["1"], batches, out, fail_after=3, dataset_id="imagenet-val@v1")
    with pytest.raises(hookkit.ExtractError, match="dataset_id"):
        hookkit.extract(model, ["1"], batches, out=out, progress=False, dataset_id="imagenet-val@v2")
    feats = hookkit.extract(model, ["1"], batches, out=out, progress=False, dataset_id="imagenet-val@v1")
    assert feats.manifest["settings"]["dataset_id"] == "imagenet-val@v1"
    with pytest.raises(TypeError, match="dataset_id"):
        hookkit.extract(model, ["1"], batches, out=tmp_path / "x", progress=False, dataset_id=3)


# -- 6. bad options do not poison the folder ----------------------------------------------------------------------

class Tokens(nn.Module):
    def forward(self, x):
        return {"hidden": x * 2}


def token_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4), Tokens())  # "1": [N, 4], "2": a dict


@pytest.mark.parametrize("bad,error,match", [
    ({"layers": ["1"], "pool": "cls"}, hookkit.ExtractError, "pool='cls'"),
    ({"layers": ["2"], "select": "missing"}, hookkit.ExtractError, "select='missing'"),
    ({"layers": ["2"], "select": 3.5}, TypeError, "select"),
    ({"layers": ["2"], "select": {"3": "hidden"}}, ValueError, "'3'"),
    ({"layers": ["2"], "select": {"2": True}}, TypeError, "select"),
    ({"layers": ["1"], "dtype": torch.float8_e4m3fn}, ValueError, "float8_e4m3fn"),
    ({"layers": ["1"], "dtype": "no-such-dtype"}, ValueError, "no-such-dtype"),
])
def test_a_bad_option_leaves_the_folder_usable_for_the_corrected_call(bad, error, match, tmp_path):
    model = token_model()
    x = torch.randn(10, 3, 4)
    data = [x[:4], x[4:8], x[8:]]
    out = tmp_path / "feats"
    layers = bad.pop("layers")
    with pytest.raises(error, match=match):
        hookkit.extract(model, layers, data, out=out, progress=False, **bad)
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not list(out.glob("*.npy*"))
    feats = hookkit.extract(model, ["1", "2"], data, out=out, progress=False)  # the corrected call
    assert feats["1"].shape == (10, 4)
    np.testing.assert_allclose(feats["2"], feats["1"] * 2, rtol=1e-6)


# -- 7. a layer that runs twice --------------------------------------------------------------------------------------

class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.block(self.block(x)))


def test_a_layer_that_runs_twice_is_refused_with_the_default_stop(tmp_path):
    shared = nn.Linear(6, 6)
    with pytest.raises(hookkit.ExtractError, match="ran more than once"):
        hookkit.extract(nn.Sequential(shared, nn.ReLU(), shared), ["0"], [torch.randn(2, 6)], progress=False)
    with pytest.raises(hookkit.ExtractError, match="ran more than once"):
        hookkit.extract(Twice(), ["block"], [torch.randn(2, 6)] * 3, out=tmp_path, progress=False)
    assert not (tmp_path / "manifest.json").exists()


# -- 8. raw errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_out", [False, True])
def test_an_empty_batch_is_skipped(use_out, tmp_path):
    model, x, _ = model_and_data(10, 4)
    data = [x[:4], x[:0], x[4:], torch.empty(0, 6)]
    feats = hookkit.extract(model, ["1"], data, out=tmp_path / "f" if use_out else None, progress=False)
    np.testing.assert_allclose(feats["1"], reference(model, ["1"], x)["1"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_out", [False, True])
def test_rows_changing_shape_between_batches_name_layer_batch_and_shapes(use_out, tmp_path):
    model = nn.Sequential(nn.Conv1d(1, 2, 3))
    data = [torch.randn(2, 1, 10), torch.randn(2, 1, 12)]
    with pytest.raises(hookkit.ExtractError, match=r"'0'.*batch 1.*\(2, 10\).*batch 0.*\(2, 8\).*pool="):
        hookkit.extract(model, ["0"], data, out=tmp_path / "f" if use_out else None, progress=False)


def test_a_layer_name_with_a_slash_gets_a_safe_file_name(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"enc/0": nn.Linear(6, 5), "/up": nn.Linear(5, 3)})

        def forward(self, x):
            return self.blocks["/up"](self.blocks["enc/0"](x))

    model = Net()
    x = torch.randn(7, 6)
    out = tmp_path / "feats"
    names = ["blocks.enc/0", "blocks./up"]
    feats = hookkit.extract(model, names, [x[:4], x[4:]], out=out, progress=False)
    ref = reference(model, names, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats"]
    for n in names:
        np.testing.assert_allclose(feats[n], ref[n], rtol=1e-6)
        path = out / feats.manifest["files"][n]
        assert path.parent == out
        np.testing.assert_array_equal(np.load(path), feats[n])
    again = hookkit.extract(model, names, [x[:4], x[4:]], out=out, progress=False)
    np.testing.assert_array_equal(again[names[0]], feats[names[0]])


def test_a_corrupt_manifest_is_named_with_the_fix(tmp_path):
    model, x, batches = model_and_data(12, 4)
    interrupted(model, ["1"], batches, tmp_path, fail_after=1)
    (tmp_path / "manifest.json").write_text('{"settings": ')
    with pytest.raises(hookkit.ExtractError, match="manifest.json is unreadable.*delete"):
        hookkit.extract(model, ["1"], batches, out=tmp_path, progress=False)


def test_a_deleted_finished_file_is_named_with_the_fix(tmp_path):
    model, x, batches = model_and_data(12, 4)
    hookkit.extract(model, ["1", "3"], batches, out=tmp_path, progress=False)
    (tmp_path / "3.npy").unlink()
    with pytest.raises(hookkit.ExtractError, match="3.npy.*missing.*delete"):
        hookkit.extract(model, ["1", "3"], batches, out=tmp_path, progress=False)


@pytest.mark.parametrize("full_after", [0, 3, 7])
def test_a_full_disk_is_said_plainly_and_the_same_call_resumes_byte_identical(full_after, tmp_path, monkeypatch):
    model, x, batches = model_and_data(40, 4)
    whole = hookkit.extract(model, ["1", "3"], batches, out=tmp_path / "whole", progress=False)
    real = os.pwrite
    writes = []

    def pwrite(fd, data, offset):
        writes.append(1)
        if len(writes) > full_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    out = tmp_path / "feats"
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(hookkit.ExtractError, match="No space left.*run the same call again") as info:
        hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
    assert "npy" in str(info.value)
    monkeypatch.setattr(os, "pwrite", real)  # space freed
    feats = hookkit.extract(model, ["1", "3"], batches, out=out, progress=False)
    for n in ["1", "3"]:
        assert (out / f"{n}.npy").read_bytes() == (tmp_path / "whole" / f"{n}.npy").read_bytes()
        np.testing.assert_array_equal(feats[n], whole[n])


# -- 16. a pool that returns a view at an offset ----------------------------------------------------------------------

def test_a_pooled_view_at_an_offset_is_copied_before_a_later_inplace_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    x = torch.randn(8, 6)
    feats = hookkit.extract(model, ["0", "2"], [x], pool=lambda t: t[:, 1:], progress=False)
    with torch.no_grad():
        truth = model[0](x)[:, 1:]
    assert truth.min() < 0
    np.testing.assert_allclose(feats["0"], truth.numpy(), rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("pool", [None, "offset"])
def test_on_a_gpu_rows_that_alias_the_activation_are_copied_before_a_later_inplace_op(pool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 2)).cuda()
    x = torch.randn(64, 6)
    fn = (lambda t: t[:, 1:]) if pool == "offset" else None
    feats = hookkit.extract(model, ["0", "2"], [x[:32], x[32:]], pool=fn, progress=False)
    with torch.no_grad():
        truth = model[0](x.cuda()).cpu()
    truth = truth[:, 1:] if pool == "offset" else truth
    assert truth.min() < 0
    np.testing.assert_allclose(feats["0"], truth.numpy(), rtol=1e-5, atol=1e-6)


# -- 2 (ranks). resuming with another number of torchrun ranks ------------------------------------------------------

def test_a_run_interrupted_in_one_process_is_finished_by_two_torchrun_ranks(tmp_path):
    model, x, batches = model_and_data(37, 5)
    out = tmp_path / "feats"
    interrupted(model, ["1", "3"], batches_of(x, 3), out, fail_after=4)  # rows 0..11, batch size 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_extract_worker.py"), "dist", str(out), "37", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = reference(model, ["1", "3"], x)
    for n in ["1", "3"]:
        np.testing.assert_allclose(np.load(out / f"{n}.npy"), ref[n], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["rows"] == 37


def test_a_model_with_uninitialised_lazy_parameters_gets_an_extract_error_not_a_raw_one(tmp_path):
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    with pytest.raises(hookkit.ExtractError, match=r"lazy parameters not yet initialised \(0.weight, 0.bias\)"):
        hookkit.extract(model, ["0"], [torch.randn(2, 4)], out=tmp_path / "f", progress=False)
    model(torch.randn(1, 4))  # as the message says
    feats = hookkit.extract(model, ["0"], [torch.randn(2, 4)], out=tmp_path / "f", progress=False)
    assert feats["0"].shape == (2, 3)
