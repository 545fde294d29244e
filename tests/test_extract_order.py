"""Rows are placed by sample index: a DataLoader whose batch_sampler groups samples by length (the batches in any
fixed order) gives the same rows as one in corpus order, row i = dataset sample i, on disk and in memory, for
ragged tokens and pooled rows, under 2 torchrun ranks and after a kill -9 and a resume with other batches. Index
lists that do not give every sample exactly once are refused before anything is written."""

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
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

import hookkit
from hookkit import ExtractError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _order_worker import (  # noqa: E402
    LAYERS,
    LengthBatches,
    Lines,
    N,
    TinyEncoder,
    bucketed,
    by_length,
    corpus_order,
    pad,
)
from _progress import done_mask  # noqa: E402

from _ranks import needs_gloo, two_ranks  # noqa: E402

POOLS = [pytest.param(None, id="ragged"), pytest.param("avg", id="avg")]


@pytest.fixture(autouse=True)
def one_thread():
    """The same kernels in every run: rows are bit-identical whichever batch computed them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_rows(got: hookkit.Features, want: hookkit.Features, pool: str | None) -> None:
    for layer in LAYERS:
        assert np.array_equal(got[layer], want[layer]), layer
        if pool is None:
            assert np.array_equal(got.offsets(layer), want.offsets(layer)), layer


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.npy"))
    assert names and names == sorted(p.name for p in b.glob("*.npy"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def samplers(ds: Lines, batch_size: int) -> dict[str, DataLoader]:
    lists = by_length(ds.lengths(), batch_size, seed=5)
    return {"list": DataLoader(ds, batch_sampler=lists, collate_fn=pad),
            "class": DataLoader(ds, batch_sampler=LengthBatches(ds.lengths(), batch_size, seed=5), collate_fn=pad)}


# -- the same rows as corpus order ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
@pytest.mark.parametrize("kind", ["list", "class"])
def test_length_bucketed_batches_give_the_rows_of_corpus_order(kind, on_disk, pool, tmp_path):
    ds = Lines()
    assert by_length(ds.lengths(), 4, seed=5)[0] != list(range(4))  # the batches really are in another order
    want = hookkit.extract(TinyEncoder(), LAYERS, corpus_order(ds, 4), pool=pool, progress=False,
                           out=tmp_path / "corpus" if on_disk else None)
    got = hookkit.extract(TinyEncoder(), LAYERS, samplers(ds, 4)[kind], pool=pool, progress=False,
                          out=tmp_path / "bucketed" if on_disk else None)
    assert_same_rows(got, want, pool)
    if on_disk:
        assert_same_files(tmp_path / "bucketed", tmp_path / "corpus")
    model = TinyEncoder().eval()
    with torch.no_grad():  # row i is sample i, computed alone
        alone = model.net[:2](model.embed(ds[7]))
    row = got.tokens("net.1", 7) if pool is None else got["net.1"][7]
    np.testing.assert_allclose(row, alone.numpy() if pool is None else alone.mean(0).numpy(), rtol=1e-5, atol=1e-6)


@needs_gloo
def test_two_torchrun_ranks_with_length_buckets_write_the_files_of_one_corpus_order_run(tmp_path):
    two_ranks("_order_worker.py", tmp_path / "two")
    for pool in (None, "avg"):
        one = tmp_path / f"one-{pool}"
        hookkit.extract(TinyEncoder(), LAYERS, corpus_order(Lines(), 4), out=one, pool=pool, progress=False)
        assert_same_files(tmp_path / "two" / str(pool).lower(), one)
    for pool in ("none", "avg"):  # each rank marked its own batches' rows, and only those
        ranks = [done_mask(tmp_path / "two" / pool, r) for r in range(2)]
        assert all(r.any() for r in ranks)


# -- resumed with other batches ---------------------------------------------------------------------------------------

def killed_midway(out: Path, pool: str | None, after: int) -> None:
    """Start the slow bucketed run in a process and kill -9 it once ``after`` batches ran."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "_order_worker.py"), "slow", str(out), str(pool).lower()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            seen += line.strip() == "batch"
            if seen == after:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""


@pytest.mark.parametrize("pool", POOLS)
def test_a_kill_9_then_a_resume_with_other_batches_gives_the_files_of_one_corpus_order_run(pool, tmp_path):
    out = tmp_path / "f"
    killed_midway(out, pool, after=5)  # batches of 4, bucketed one way
    kept = done_mask(out)
    assert 0 < kept.sum() < N and not (kept[:kept.sum()]).all()  # rows kept here and there, not a prefix
    model = TinyEncoder()
    computed: list[int] = []
    model.net[0].register_forward_hook(lambda m, a, o: computed.append(a[0].shape[0]))
    hookkit.extract(model, LAYERS, bucketed(Lines(), 7, seed=2), out=out, pool=pool, progress=False)
    assert not (out / "progress").exists() or not list(out.glob("*.partial"))
    ref = tmp_path / "ref"
    hookkit.extract(TinyEncoder(), LAYERS, corpus_order(Lines(), 4), out=ref, pool=pool, progress=False)
    assert_same_files(out, ref)
    assert 0 < len(computed) < -(-N // 7)  # resumed: only the batches with rows left were computed


def test_a_resume_on_a_changed_sample_0_is_refused_wherever_its_batch_is(tmp_path):
    out = tmp_path / "f"
    killed_midway(out, None, after=3)
    lists = by_length(Lines().lengths(), 6, seed=4)
    holder = next(k for k, b in enumerate(lists) if 0 in b)
    lists[holder] = sorted(lists[holder], reverse=True)
    assert holder != 0 and lists[holder][-1] == 0  # sample 0 last in a later batch: it is still the one checked
    with pytest.raises(ExtractError, match="sample 0 of data differs"):
        hookkit.extract(TinyEncoder(), LAYERS, DataLoader(Lines(changed=True), batch_sampler=lists, collate_fn=pad),
                        out=out, progress=False)
    feats = hookkit.extract(TinyEncoder(), LAYERS, DataLoader(Lines(), batch_sampler=lists, collate_fn=pad),
                            out=out, progress=False)
    want = hookkit.extract(TinyEncoder(), LAYERS, corpus_order(Lines(), 4), progress=False)
    assert_same_rows(feats, want, None)


# -- refusals ---------------------------------------------------------------------------------------------------------

def every_list() -> list[list[int]]:
    return [list(range(i, min(i + 4, N))) for i in range(0, N, 4)]


BAD = {
    "repeated": ([[0, 1, 2], [2, 3], *[[i] for i in range(4, N)]], "gives sample 2 twice .*exactly one batch"),
    "missing": ([b for b in every_list() if 9 not in b], r"leaves 4 of the dataset's 45 samples out \(samples 8, 9"),
    "out of range": ([*every_list(), [N]], f"index {N} in batch 12, but the dataset holds {N} samples"),
    "negative": ([[-1], *every_list()], "index -1 in batch 0"),
    "not ints": ([[0.5], *every_list()], r"gives batch 0 as \[0.5\], not a list of sample indices"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_index_lists_that_do_not_give_every_sample_once_are_refused_before_anything_is_written(case, tmp_path):
    lists, message = BAD[case]
    model = TinyEncoder()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    out = tmp_path / "f"
    with pytest.raises(ExtractError, match=message):
        hookkit.extract(model, LAYERS, DataLoader(Lines(), batch_sampler=lists, collate_fn=pad), out=out,
                        progress=False)
    assert calls == [] and not (out / "manifest.json").exists() and not list(out.glob("*.partial"))
    with pytest.raises(ExtractError, match=message):
        hookkit.extract(model, LAYERS, DataLoader(Lines(), batch_sampler=lists, collate_fn=pad), progress=False)


def test_drop_last_is_refused_since_it_leaves_samples_without_rows(tmp_path):
    data = DataLoader(Lines(), batch_size=4, drop_last=True, collate_fn=pad)
    with pytest.raises(ExtractError, match=r"leaves 1 of the dataset's 45 samples out \(sample 44\).*drop_last=True "
                                           r".*pass drop_last=False"):
        hookkit.extract(TinyEncoder(), LAYERS, data, out=tmp_path / "f", progress=False)
    assert not (tmp_path / "f" / "manifest.json").exists()
    data = DataLoader(Lines(), batch_sampler=BatchSampler(SequentialSampler(range(N)), 4, drop_last=False),
                      collate_fn=pad)
    assert hookkit.extract(TinyEncoder(), LAYERS, data, progress=False, pool="avg")["net.1"].shape[0] == N


def test_a_random_batch_sampler_is_still_refused(tmp_path):
    ds = Lines()
    data = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, drop_last=False), collate_fn=pad)
    with pytest.raises(ExtractError, match="another order on each pass"):
        hookkit.extract(TinyEncoder(), LAYERS, data, out=tmp_path / "f", progress=False)


def test_an_unfinished_folder_of_the_older_progress_format_is_refused_not_misread(tmp_path):
    out = tmp_path / "f"
    killed_midway(out, "avg", after=3)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["progress_format"]  # as an older hookkit wrote it (row ranges in progress/rank-R.json)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExtractError, match="unfinished extraction started by hookkit .* does not read.*delete the "
                                           "folder"):
        hookkit.extract(TinyEncoder(), LAYERS, bucketed(Lines(), 4, seed=1), out=out, pool="avg", progress=False)


def test_ragged_rows_assembled_in_small_blocks_give_the_same_files(tmp_path, monkeypatch):
    from hookkit.extraction import tokens as _tokens

    ds = Lines()
    hookkit.extract(TinyEncoder(), LAYERS, corpus_order(ds, 4), out=tmp_path / "corpus", progress=False)
    monkeypatch.setattr(_tokens, "_BLOCK_BYTES", 5 * 32 * 4)  # 5 tokens of net.1: samples of up to 12 span blocks
    hookkit.extract(TinyEncoder(), LAYERS, samplers(ds, 4)["list"], out=tmp_path / "bucketed", progress=False)
    assert_same_files(tmp_path / "bucketed", tmp_path / "corpus")


@pytest.mark.parametrize("form", [np.asarray, torch.tensor], ids=["numpy", "tensor"])
def test_index_lists_given_as_arrays_are_placed_like_lists(form):
    ds = Lines()
    lists = [form(b) for b in by_length(ds.lengths(), 4, seed=5)]
    got = hookkit.extract(TinyEncoder(), LAYERS, DataLoader(ds, batch_sampler=lists, collate_fn=pad), progress=False)
    assert_same_rows(got, hookkit.extract(TinyEncoder(), LAYERS, corpus_order(ds, 4), progress=False), None)
