"""extract()'s data side: a DataLoader is split so that each rank loads only the batches it computes (counted, not
timed), resumed runs load only what is missing, torchrun processes join their group inside extract(), and what
cannot be split (shuffled samplers, collate_fns that change the sample count) is refused before it runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import hookkit
from hookkit import ExtractError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _shard_worker import LAYERS, Logged, loader, loads, model  # noqa: E402

WORKER = str(HERE / "_shard_worker.py")
N, B = 37, 5  # 8 batches, the last one of 2 samples


def batch_samples(*batches: int, n: int = N, b: int = B) -> Counter:
    """The sample indices of the given batches."""
    return Counter(i for k in batches for i in range(k * b, min((k + 1) * b, n)))


def reference(tmp_path: Path, n: int = N, b: int = B) -> Path:
    """The files of a one-process run that reads every batch from a list (the old RoundRobin path)."""
    out = tmp_path / "reference"
    batches = list(loader(n, b, tmp_path / "reference-logs"))
    hookkit.extract(model(), LAYERS, batches, out=out, progress=False)
    return out


def assert_same_files(a: Path, b: Path) -> None:
    for name in LAYERS:
        assert (a / f"{name}.npy").read_bytes() == (b / f"{name}.npy").read_bytes(), name


def fail_on_forward(net: torch.nn.Module, k: int):
    """Make the k-th forward (0-based) raise: batches 0..k-1 are written, batch k is not."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == k + 1:
            raise RuntimeError("power cut")
    return net.register_forward_pre_hook(hook)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(args: list[str], *, how: str) -> list[str]:
    """Run the worker as 2 ranks, by torchrun itself or by setting torchrun's environment; their outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [proc.stdout]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port})
             for r in range(2)]
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=180)
            assert p.returncode == 0, stderr[-3000:]
            outputs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


# -- load only what you compute ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("how,workers,collate,resume_after", [
    pytest.param("torchrun", 0, "default", None, id="torchrun"),
    pytest.param("env", 2, "custom", None, id="env-2-workers-custom-collate"),
    pytest.param("env", 0, "default", 3, id="env-resuming-a-one-process-run"),
])
def test_two_ranks_each_load_only_their_batches_and_write_the_files_of_one_process(how, workers, collate,
                                                                                    resume_after, tmp_path):
    out, logs = tmp_path / "two", tmp_path / "logs"
    written = set()
    if resume_after is not None:  # a one-process run stopped after `resume_after` batches, finished by two ranks
        net = model()
        handle = fail_on_forward(net, resume_after)
        with pytest.raises(ExtractError, match=f"batch {resume_after}"):
            hookkit.extract(net, LAYERS, loader(N, B, tmp_path / "first-logs"), out=out, progress=False)
        handle.remove()
        written = set(range(resume_after))
    outputs = launch_two([str(out), str(logs), str(N), str(B), str(workers), collate], how=how)

    got = loads(logs)
    assert set(got) == {"0", "1"}
    rank0 = [k for k in range(0, 8, 2) if k not in written]
    rank1 = [k for k in range(1, 8, 2) if k not in written]
    # Each rank loads its own batches and, to check sample 0 before it writes, the data's first batch: one batch more.
    assert got["0"] == batch_samples(0, *[k for k in rank0 if k != 0])
    assert got["1"] == batch_samples(0, *rank1)
    # Together: every sample still missing once, and batch 0 once more per rank that does not compute it.
    expected = batch_samples(*rank0, *rank1)
    for _ in range(1 if 0 in rank0 else 2):
        expected += batch_samples(0)
    assert got["0"] + got["1"] == expected
    if workers:  # loaded in the DataLoader's worker processes, as the user's loader would
        assert all(len(list(logs.glob(f"rank{r}-pid*.log"))) == workers for r in "01")
    assert_same_files(reference(tmp_path), out)
    assert "group joined after extract: True" in "".join(outputs)


def test_a_resumed_run_loads_only_the_missing_batches_and_the_first_one(tmp_path):
    out, logs = tmp_path / "f", tmp_path / "logs"
    net = model()
    handle = fail_on_forward(net, 5)
    with pytest.raises(ExtractError, match="batch 5"):
        hookkit.extract(net, LAYERS, loader(N, B, tmp_path / "first-logs"), out=out, progress=False)
    handle.remove()
    assert sum(loads(tmp_path / "first-logs")["-"].values()) <= 6 * B  # batches 0..5, none read ahead

    hookkit.extract(net, LAYERS, loader(N, B, logs), out=out, progress=False)
    assert loads(logs)["-"] == batch_samples(0, 5, 6, 7)  # batch 0 for the sample-0 check, then what is missing
    assert_same_files(reference(tmp_path), out)


def test_a_dataloader_run_equals_the_list_run_for_uneven_batches(tmp_path):
    sizes = [3, 1, 7, 2, 4, 11, 9]  # every sample once (a drop_last=True loader, which leaves some out, is refused)

    class Uneven:  # a batch_sampler with batches of different sizes
        def __iter__(self):
            start = 0
            for size in sizes:
                yield list(range(start, start + size))
                start += size

        def __len__(self):
            return len(sizes)

    data = DataLoader(Logged(N, tmp_path / "a"), batch_sampler=Uneven())
    feats = hookkit.extract(model(), LAYERS, data, out=tmp_path / "loader", progress=False)
    hookkit.extract(model(), LAYERS, list(data), out=tmp_path / "list", progress=False)
    assert feats["1"].shape[0] == sum(sizes) == N
    assert_same_files(tmp_path / "list", tmp_path / "loader")


def test_a_fixed_custom_order_places_row_i_at_dataset_sample_i(tmp_path):
    order = [(7 * i) % N for i in range(N)]  # a permutation, the same on every pass
    data = DataLoader(Logged(N, tmp_path / "logs"), batch_size=B, sampler=order)
    feats = hookkit.extract(model(), LAYERS, data, progress=False)
    net = model().eval()
    with torch.no_grad():
        expected = net[:2](data.dataset.x)  # in dataset order, whatever order the sampler gives the samples in
    np.testing.assert_allclose(feats["1"], expected.numpy(), rtol=1e-6, atol=1e-6)


# -- refusals ---------------------------------------------------------------------------------------------------------

def forward_calls(net: torch.nn.Module) -> list:
    calls: list = []
    net.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("make", [
    pytest.param(lambda ds: DataLoader(ds, batch_size=B, shuffle=True), id="shuffle=True"),
    pytest.param(lambda ds: DataLoader(ds, batch_size=B, sampler=RandomSampler(ds, generator=torch.Generator()
                                                                               .manual_seed(0))), id="RandomSampler"),
    pytest.param(lambda ds: DataLoader(ds, batch_size=None, shuffle=True), id="batch_size=None"),
])
def test_a_sampler_with_another_order_on_each_pass_is_refused_before_anything_runs(make, tmp_path):
    # Refused in a fresh one-process run too: rows would not follow the dataset, and the run could not be resumed.
    out = tmp_path / "f"
    net = model()
    calls = forward_calls(net)
    with pytest.raises(ExtractError, match="another order on each pass.*shuffle=False"):
        hookkit.extract(net, LAYERS, make(Logged(N, tmp_path / "logs")), out=out, progress=False)
    assert calls == [] and loads(tmp_path / "logs") == {}
    assert not (out / "manifest.json").exists() and not list(out.glob("*.npy*"))
    hookkit.extract(net, LAYERS, loader(N, B, tmp_path / "logs"), out=out, progress=False)  # the corrected call
    assert_same_files(reference(tmp_path), out)


def test_a_distributed_sampler_is_refused_since_extract_splits_the_data_itself(tmp_path):
    ds = Logged(N, tmp_path / "logs")
    data = DataLoader(ds, batch_size=B, sampler=DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ExtractError, match="DistributedSampler.*without a DistributedSampler"):
        hookkit.extract(model(), LAYERS, data, progress=False)


def test_a_collate_fn_that_changes_the_sample_count_is_refused_naming_the_batch(tmp_path):
    def drop_last_sample(samples):
        return torch.stack([x for x, _ in samples[:-1]])

    data = DataLoader(Logged(N, tmp_path / "logs"), batch_size=B, collate_fn=drop_last_sample)
    with pytest.raises(ExtractError, match=r"batch 0 holds 4 samples.* gave it 5 indices: a collate_fn that changes "
                                           r"the number of samples"):
        hookkit.extract(model(), LAYERS, data, out=tmp_path / "f", progress=False)


# -- data that is read whole -------------------------------------------------------------------------------------------

def test_data_read_only_to_be_skipped_warns_once_at_the_callers_line(tmp_path):
    out = tmp_path / "f"
    batches = list(loader(N, B, tmp_path / "logs"))
    net = model()
    handle = fail_on_forward(net, 3)
    with warnings.catch_warnings(record=True) as fresh:
        warnings.simplefilter("always")
        with pytest.raises(ExtractError):
            hookkit.extract(net, LAYERS, batches, out=out, progress=False)
    handle.remove()
    with warnings.catch_warnings(record=True) as resumed:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        hookkit.extract(net, LAYERS, batches, out=out, progress=False)
    ours = [w for w in resumed if "reads every batch" in str(w.message)]
    assert not [w for w in fresh if "reads every batch" in str(w.message)]  # nothing skipped: nothing to say
    assert len(ours) == 1
    assert "the batches already written" in str(ours[0].message) and "data is a list" in str(ours[0].message)
    assert "DataLoader over a map-style dataset" in str(ours[0].message)
    assert (ours[0].filename, ours[0].lineno) == (__file__, line)
    assert_same_files(reference(tmp_path), out)


# -- torchrun without init_process_group -------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["no MASTER_ADDR", "no torch.distributed"])
def test_a_torchrun_process_that_cannot_join_its_group_is_refused_and_nothing_is_written(failure, tmp_path,
                                                                                          monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    if failure == "no torch.distributed":
        monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    out = tmp_path / "f"
    net = model()
    calls = forward_calls(net)
    with pytest.raises(ExtractError, match=r"WORLD_SIZE=2 .*torchrun started 2 processes") as info:
        hookkit.extract(net, LAYERS, loader(N, B, tmp_path / "logs"), out=out, progress=False)
    fix = "init_process_group() yourself" if failure == "no MASTER_ADDR" else "unset WORLD_SIZE"
    assert fix in str(info.value)
    if failure == "no MASTER_ADDR":
        assert "MASTER_ADDR" in str(info.value)  # what failed
    assert calls == [] and not out.exists() and not torch.distributed.is_initialized()
