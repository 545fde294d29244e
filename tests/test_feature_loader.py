"""Features.loader: every row (token) once per epoch in an order fixed by (seed, epoch), the stored rows exactly,
shares of one permutation across ranks (by argument and in a real gloo group), resumed from a step, read in blocks.

Blocks and windows are made small here (a few rows), so that a few hundred rows span many of them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import hookkit
from hookkit.extraction import loader as _loader

from _extract_worker import model_and_data
from _ranks import needs_gloo, two_ranks

N = 101  # samples of the pooled layer: not a multiple of any batch size used here


class TokenNet(nn.Module):
    """Per-token layers: a ragged layer of each sample's valid tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh())

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def token_batches(n: int = 40, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 10, (n,), generator=g).tolist()
    out = []
    for i in range(0, n, batch):
        chunk = lengths[i:i + batch]
        mask = torch.zeros(len(chunk), max(chunk), dtype=torch.long)
        for j, t in enumerate(chunk):
            mask[j, :t] = 1
        out.append({"x": torch.randn(len(chunk), max(chunk), 6, generator=g), "attention_mask": mask})
    return out


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 96 bytes (3 rows of 8 float32, 2 tokens of 12) and windows of 4 blocks."""
    monkeypatch.setattr(_loader, "_BLOCK_BYTES", 96)
    monkeypatch.setattr(_loader, "_BUFFER_BYTES", 4 * 96)


def pooled(out: Path | None) -> hookkit.Features:
    model, _, batches = model_and_data(N, 8)
    return hookkit.extract(model, ["3"], batches, out=out, progress=False)


def ragged(out: Path | None) -> hookkit.Features:
    torch.manual_seed(0)
    return hookkit.extract(TokenNet().eval(), ["net.1"], token_batches(), out=out, progress=False)


KINDS = {"pooled": (pooled, "3"), "ragged": (ragged, "net.1")}


@pytest.fixture(params=[(k, where) for k in KINDS for where in ("disk", "memory")], ids="-".join)
def feats(request, tmp_path):
    """(features, layer, the layer's rows as a tensor read straight from the file or the array)."""
    make, layer = KINDS[request.param[0]]
    f = make(tmp_path / "out" if request.param[1] == "disk" else None)
    return f, layer, torch.from_numpy(f[layer].copy())


def numbers(batches: list[torch.Tensor], rows: torch.Tensor) -> list[int]:
    """Each yielded row's number in the file, found by its values (the rows here are all different)."""
    where = {r.numpy().tobytes(): i for i, r in enumerate(rows)}
    assert len(where) == len(rows), "test data with two equal rows"
    return [where[r.numpy().tobytes()] for b in batches for r in b]


# -- each row once, in an order fixed by (seed, epoch) -----------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_once_per_epoch_in_batches_of_the_stored_rows(feats, shuffle):
    f, layer, rows = feats
    if layer == "net.1":
        assert len(rows) > len(f.offsets(layer)) - 1  # tokens, not samples
    loader = f.loader(layer, 8, shuffle=shuffle, seed=1)
    batches = list(loader)
    assert sorted(numbers(batches, rows)) == list(range(len(rows)))
    assert len(batches) == len(loader) == math.ceil(len(rows) / 8)
    assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1) and 0 < len(batches[-1]) <= 8
    for b in batches:
        assert b.dtype == rows.dtype and b.is_contiguous() and b._base is None  # owns its memory, not a view
    assert torch.equal(torch.cat(batches), rows[loader.rows()])  # rows() names the rows of the batches, in order


def test_the_order_is_fixed_by_seed_and_epoch_and_changes_with_either(feats):
    f, layer, rows = feats

    def order(**kw: int) -> list[int]:
        return numbers(list(f.loader(layer, 8, **kw)), rows)

    first = order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) == first
    assert order(seed=1, epoch=1) != first
    assert order(seed=2, epoch=0) != first
    assert first != sorted(first)  # shuffled
    windows = _loader._BUFFER_BYTES // (_loader._BLOCK_BYTES // rows[0].nbytes * rows[0].nbytes)
    assert len(rows) > 4 * windows  # many windows, so the blocks' order matters too


def test_shuffle_false_yields_the_file_in_order(feats):
    f, layer, rows = feats
    assert torch.equal(torch.cat(list(f.loader(layer, 7, shuffle=False))), rows)


def test_drop_last_yields_only_full_batches_and_skips_the_permutations_last_rows():
    f = pooled(None)
    full, dropped = f.loader("3", 8, seed=4), f.loader("3", 8, seed=4, drop_last=True)
    assert len(dropped) == N // 8 == len(list(dropped)) and all(len(b) == 8 for b in dropped)
    assert torch.equal(dropped.rows(), full.rows()[:N // 8 * 8])  # the same order, the last N % 8 rows skipped
    assert len(full) == N // 8 + 1 and len(list(full)[-1]) == N % 8


# -- ranks ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_take_disjoint_shares_of_the_same_permutation(world, drop_last):
    f = pooled(None)
    one = f.loader("3", 8, seed=5, epoch=2, drop_last=False).rows()
    loaders = [f.loader("3", 8, seed=5, epoch=2, drop_last=drop_last, rank=r, world=world) for r in range(world)]
    rows = [torch.cat(list(ld)) for ld in loaders]
    assert all(torch.equal(r, torch.from_numpy(f["3"])[ld.rows()]) for r, ld in zip(rows, loaders, strict=True))
    shares = torch.cat([ld.rows() for ld in loaders])
    if drop_last:  # the same number of full batches on every rank; the permutation's last rows skipped
        assert {len(ld) for ld in loaders} == {N // (8 * world)} and all(len(r) == len(ld) * 8
                                                                       for r, ld in zip(rows, loaders, strict=True))
        assert torch.equal(shares, one[:N // (8 * world) * 8 * world])
    else:  # complete and disjoint: the shares, one after the other, are the permutation
        assert torch.equal(shares, one)
        assert {len(ld) for ld in loaders} == {math.ceil(N / world / 8)}


@pytest.mark.parametrize("n, world, batch", [(10, 3, 3), (10, 3, 2), (9, 3, 3), (13, 4, 3), (3, 4, 1), (100, 7, 5)])
def test_ranks_yield_the_same_number_of_batches_whenever_a_split_can(tmp_path, n, world, batch):
    f = hookkit.extract(nn.Sequential(nn.Identity()), ["0"], [torch.randn(n, 2)], progress=False)
    counts = [len(list(f.loader("0", batch, rank=r, world=world))) for r in range(world)]
    assert sum(len(f.loader("0", batch, rank=r, world=world).rows()) for r in range(world)) == n
    possible = not (n % world and (n // world) % batch == 0)  # else one rank would need an empty batch
    assert (len(set(counts)) == 1) == possible, counts
    assert max(counts) - min(counts) <= 1


@needs_gloo
def test_two_gloo_ranks_stream_disjoint_complete_shares_from_the_process_group(tmp_path):
    two_ranks("_loader_worker.py", tmp_path)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, _, batches = model_and_data(101, 8)
    f = hookkit.extract(model, ["3"], batches, out=tmp_path / "feats", progress=False)  # the finished folder
    one = f.loader("3", 8, seed=3, epoch=1).rows()
    assert torch.equal(torch.cat([s[False]["rows"] for s in seen]), one)
    assert seen[0][True]["len"] == seen[1][True]["len"] == 101 // 16
    for r, s in enumerate(seen):
        for drop_last in (False, True):
            want = list(f.loader("3", 8, seed=3, epoch=1, drop_last=drop_last, rank=r, world=2))
            assert len(s[drop_last]["batches"]) == len(want) == s[drop_last]["len"]
            assert all(torch.equal(a, b) for a, b in zip(s[drop_last]["batches"], want, strict=True))


# -- resume and reads -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank, world, shuffle", [(0, 1, True), (1, 2, True), (0, 1, False)])
def test_start_yields_the_remaining_batches_of_the_epoch(feats, rank, world, shuffle):
    f, layer, _ = feats
    full = list(f.loader(layer, 5, seed=2, epoch=3, shuffle=shuffle, rank=rank, world=world))
    for k in range(len(full) + 1):
        rest = f.loader(layer, 5, seed=2, epoch=3, shuffle=shuffle, start=k, rank=rank, world=world)
        got = list(rest)
        assert len(rest) == len(got) == len(full) - k
        assert all(torch.equal(a, b) for a, b in zip(got, full[k:], strict=True))


@pytest.fixture
def reads(monkeypatch):
    """Every (first row, stop row) the loader reads from its source."""
    seen: list[tuple[int, int]] = []
    real = _loader._read

    def spy(src: torch.Tensor, lo: int, hi: int, out: torch.Tensor) -> None:
        seen.append((lo, hi))
        real(src, lo, hi, out)

    monkeypatch.setattr(_loader, "_read", spy)
    return seen


def test_reads_are_whole_blocks_each_read_once_not_one_read_per_row(reads):
    f = pooled(None)  # 101 rows, blocks of 3 rows: 34 blocks
    list(f.loader("3", 4, seed=1))
    assert len(reads) == math.ceil(N / 3)
    assert sorted(reads) == [(lo, min(lo + 3, N)) for lo in range(0, N, 3)]


@pytest.mark.parametrize("rank, world, start", [(1, 2, 0), (0, 2, 3), (0, 1, 20), (2, 3, 1)])
def test_a_loader_reads_only_the_blocks_holding_its_rows_and_start_skips_the_rest(reads, rank, world, start):
    f = pooled(None)  # blocks of 3 rows
    loader = f.loader("3", 4, seed=1, rank=rank, world=world, start=start)
    list(loader)
    blocks = sorted({r // 3 for r in loader.rows().tolist()})
    assert sorted(reads) == [(3 * b, min(3 * b + 3, N)) for b in blocks]
    assert len(blocks) <= math.ceil(len(loader.rows()) / 3) + 2 * 4  # at most the two windows shared with others


def test_windows_are_whole_blocks_drawn_from_all_over_the_file():
    f = hookkit.extract(nn.Sequential(nn.Identity()), ["0"], [torch.randn(96, 8)], progress=False)
    order = f.loader("0", 4, seed=1).rows().tolist()  # blocks of 3 rows, windows of 4 blocks: 8 windows of 12 rows
    windows = [order[i:i + 12] for i in range(0, 96, 12)]
    for w in windows:
        blocks = {r // 3 for r in w}
        assert sorted(w) == sorted(r for b in blocks for r in range(3 * b, 3 * b + 3))  # whole blocks
    assert max(windows[0]) - min(windows[0]) > 24  # its blocks are not the file's first ones
    assert order[:12] != sorted(order[:12])  # the rows of a window are shuffled


# -- arguments ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, words", [
    ({"batch_size": 0}, hookkit.ArgumentError, "batch_size=0"),
    ({"batch_size": 2.0}, hookkit.ArgumentTypeError, "batch_size="),
    ({"batch_size": True}, hookkit.ArgumentTypeError, "batch_size="),
    ({"shuffle": 1}, hookkit.ArgumentTypeError, "shuffle= takes True or False"),
    ({"drop_last": None}, hookkit.ArgumentTypeError, "drop_last= takes True or False"),
    ({"seed": -1}, hookkit.ArgumentError, "seed=-1"),
    ({"seed": "a"}, hookkit.ArgumentTypeError, "seed="),
    ({"epoch": 1.5}, hookkit.ArgumentTypeError, "epoch="),
    ({"start": -1}, hookkit.ArgumentError, "start=-1"),
    ({"start": 27}, hookkit.ArgumentError, "give start= from 0 to 26"),
    ({"rank": 1}, hookkit.ArgumentError, "rank= and world= together"),
    ({"rank": 2, "world": 2}, hookkit.ArgumentError, "from 0 to 1"),
    ({"rank": 0, "world": 0}, hookkit.ArgumentError, "world=0"),
    ({"layer": "nope"}, hookkit.NotRecordedError, "'nope' was not extracted"),
])
def test_argument_mistakes_raise_hookkit_errors_that_name_the_fix(kwargs, error, words):
    f = pooled(None)
    args = {"layer": "3", "batch_size": 4, **kwargs}
    with pytest.raises(error, match=words.replace("(", r"\(")):
        f.loader(args.pop("layer"), args.pop("batch_size"), **args)


@pytest.mark.parametrize("where", ["disk", "memory"])
def test_a_bfloat16_layer_streams_its_stored_bfloat16_rows(tmp_path, where):
    """A layer stored in bfloat16: batches in bfloat16, bit for bit the stored rows, in the order ``rows()`` says."""
    model, _, batches = model_and_data(N, 8)
    f = hookkit.extract(model, ["3"], batches, out=tmp_path / "out" if where == "disk" else None,
                        dtype=torch.bfloat16, progress=False)
    stored = f.torch("3")
    loader = f.loader("3", 16, seed=3)
    got = list(loader)
    assert all(b.dtype == torch.bfloat16 for b in got)
    assert torch.equal(torch.cat(got).view(torch.int16), stored[loader.rows()].view(torch.int16))
    assert sorted(loader.rows().tolist()) == list(range(N))
