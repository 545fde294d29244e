"""``hookkit.length_batches``: every index once, the same batches on every pass, the limits kept, similar lengths
together (little padding), and a hookkit error for each bad argument; ``extract`` over it writes row i for sample
i."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import hookkit
from hookkit import ArgumentError, ArgumentTypeError


def varied(n: int = 1000, seed: int = 0) -> list[int]:
    """Lengths of a text corpus: mostly short, some long (a few over a hundred)."""
    rng = random.Random(seed)
    return [min(int(rng.lognormvariate(3, 0.8)) + 2, 300) for _ in range(n)]


def padded_slots(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("limits", [dict(batch_size=32), dict(max_tokens=2048), dict(batch_size=16, max_tokens=512),
                                    dict(batch_size=1), dict(batch_size=5000)])
def test_every_index_is_in_exactly_one_batch(limits):
    lengths = varied()
    batches = list(hookkit.length_batches(lengths, **limits))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(b and b == sorted(b) for b in batches)  # no empty batch; indices in increasing order
    assert all(type(i) is int for i in flat)


def test_the_same_batches_on_every_pass_and_every_call():
    lengths = varied()
    sampler = hookkit.length_batches(lengths, 32)
    first = list(sampler)
    assert list(sampler) == first and list(sampler) == first
    assert list(hookkit.length_batches(list(lengths), 32)) == first
    assert list(hookkit.length_batches(np.array(lengths), 32)) == first
    assert list(hookkit.length_batches(torch.tensor(lengths), 32)) == first
    next(iter(sampler)).append(-1)  # the lists handed out are the caller's
    assert list(sampler) == first
    assert len(sampler) == len(first) == -(-len(lengths) // 32)


def test_batch_size_is_kept_and_only_the_last_batch_is_smaller():
    sizes = [len(b) for b in hookkit.length_batches(varied(1001), 32)]
    assert sizes[:-1] == [32] * (len(sizes) - 1) and sizes[-1] == 1001 % 32


def test_max_tokens_bounds_the_padded_slots_of_each_batch():
    lengths = varied()
    for budget in (300, 1000, 4096):
        batches = list(hookkit.length_batches(lengths, max_tokens=budget))
        assert all(len(b) * max(lengths[i] for i in b) <= budget for b in batches)
        # greedy: adding the next sample (the next shorter one) to a batch would break the budget
        starts = [b for b in batches[:-1]]
        assert all((len(b) + 1) * max(lengths[i] for i in b) > budget for b in starts)


def test_with_both_limits_each_batch_keeps_both():
    lengths = varied()
    batches = list(hookkit.length_batches(lengths, 16, max_tokens=512))
    assert all(len(b) <= 16 and len(b) * max(lengths[i] for i in b) <= 512 for b in batches)
    assert any(len(b) == 16 for b in batches) and any(len(b) < 16 for b in batches[:-1])  # each limit bites


def test_a_sample_over_the_budget_gets_a_batch_of_its_own():
    assert list(hookkit.length_batches([3, 50, 2, 40], max_tokens=10)) == [[1], [3], [0, 2]]
    assert list(hookkit.length_batches([0, 0, 0], max_tokens=2)) == [[0, 1], [2]]  # a length of 0 counts as 1


def test_longest_batch_comes_first_and_equal_lengths_keep_index_order():
    lengths = [4, 7, 4, 1, 7, 4]
    assert list(hookkit.length_batches(lengths, 2)) == [[1, 4], [0, 2], [3, 5]]
    many_ties = [i % 3 for i in range(3000)]  # long enough for numpy's unstable sorts to reorder ties
    batches = list(hookkit.length_batches(many_ties, 10))
    assert batches[0] == list(range(2, 30, 3)) and batches[100] == list(range(1, 29, 3))
    widths = [max(varied()[i] for i in b) for b in hookkit.length_batches(varied(), 32)]
    assert widths == sorted(widths, reverse=True)


def test_similar_lengths_are_grouped_so_padding_is_far_below_corpus_order():
    lengths = varied()
    real = sum(lengths)
    corpus = [list(range(i, min(i + 32, len(lengths)))) for i in range(0, len(lengths), 32)]
    corpus_waste = 1 - real / padded_slots(corpus, lengths)
    bucketed_waste = 1 - real / padded_slots(list(hookkit.length_batches(lengths, 32)), lengths)
    assert corpus_waste > 0.6 and bucketed_waste < 0.15, (corpus_waste, bucketed_waste)  # 73% and 11% here


class Rows(Dataset):
    """Sample i is a row of length lengths[i], filled with i, and its mask."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((self.lengths[i],), float(i))


def pad(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(t) for t in items)
    x = torch.zeros(len(items), width, 1)
    mask = torch.zeros(len(items), width, dtype=torch.int64)
    for row, t in enumerate(items):
        x[row, :len(t), 0], mask[row, :len(t)] = t, 1
    return {"x": x, "attention_mask": mask}


class Identity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_a_dataloader_over_it_gives_the_batches_and_pads_little():
    lengths = varied(200)
    loader = DataLoader(Rows(lengths), batch_sampler=hookkit.length_batches(lengths, 16), collate_fn=pad)
    seen = [int(v) for batch in loader for v in batch["x"][:, 0, 0]]
    assert sorted(seen) == list(range(200)) and len(loader) == 13
    real = [batch["attention_mask"] for batch in loader]
    corpus = [batch["attention_mask"] for batch in DataLoader(Rows(lengths), batch_size=16, collate_fn=pad)]
    assert sum(int(m.sum()) for m in real) / sum(m.numel() for m in real) > 0.75  # 80% of the slots are tokens
    assert sum(int(m.sum()) for m in corpus) / sum(m.numel() for m in corpus) < 0.4  # in corpus order, 37%


def test_repr_says_how_many_batches_and_which_limits():
    sampler = hookkit.length_batches([3, 1, 2], 2, max_tokens=100)
    assert isinstance(sampler, hookkit.LengthBatches) and isinstance(sampler, torch.utils.data.Sampler)
    assert repr(sampler) == "LengthBatches(3 samples in 2 batches, batch_size=2, max_tokens=100, longest first)"


@pytest.mark.parametrize(("lengths", "options", "error", "names"), [
    ([3, -1, 2], dict(batch_size=2), ArgumentError, "lengths[1] is -1, a negative length"),
    (np.array([3, -4]), dict(batch_size=2), ArgumentError, "lengths[1] is -4"),
    ([3, 2.5], dict(batch_size=2), ArgumentTypeError, "lengths[1] is float 2.5, not an int"),
    ([3, True], dict(batch_size=2), ArgumentTypeError, "lengths[1] is bool True"),
    ([3, "4"], dict(batch_size=2), ArgumentTypeError, "lengths[1] is str '4'"),
    (np.array([3.0, 4.0]), dict(batch_size=2), ArgumentTypeError, "holds float64 values, not integers"),
    (torch.tensor([3.0, 4.0]), dict(batch_size=2), ArgumentTypeError, "holds float32 values"),
    (np.array([[3, 4]]), dict(batch_size=2), ArgumentError, "shape (1, 2), not one length per sample"),
    ([], dict(batch_size=2), ArgumentError, "lengths= is empty"),
    ("34", dict(batch_size=2), ArgumentTypeError, "lengths= takes a sequence of ints, got str"),
    (iter([3, 4]), dict(batch_size=2), ArgumentTypeError, "lengths= takes a sequence of ints"),
    (7, dict(batch_size=2), ArgumentTypeError, "lengths= takes a sequence of ints, got int 7"),
    ([3, 4], dict(), ArgumentError, "give batch_size= (samples per batch), max_tokens="),
    ([3, 4], dict(batch_size=0), ArgumentError, "batch_size=0 is out of range"),
    ([3, 4], dict(batch_size=2.0), ArgumentTypeError, "batch_size= takes an int or None"),
    ([3, 4], dict(max_tokens=0), ArgumentError, "max_tokens=0 is out of range"),
    ([3, 4], dict(max_tokens="100"), ArgumentTypeError, "max_tokens= takes an int or None"),
    ([3, 2**64], dict(batch_size=2), ArgumentError, "over the int64 range"),
])
def test_bad_arguments_are_hookkit_errors_naming_what_and_the_fix(lengths, options, error, names):
    with pytest.raises(error) as info:
        hookkit.length_batches(lengths, **options)
    message = str(info.value)
    assert message.startswith("hookkit.length_batches: ") and names in message, message
    if "lengths" in names:
        assert "pass one whole number" in message


def test_extract_over_length_batches_writes_row_i_for_sample_i(tmp_path):
    """What the sampler is for: bucketed batches, rows in dataset order (pooled and ragged, memory and disk)."""
    lengths = varied(64, seed=1)
    model = Identity()
    corpus = DataLoader(Rows(lengths), batch_size=8, collate_fn=pad)
    bucketed = DataLoader(Rows(lengths), batch_sampler=hookkit.length_batches(lengths, 8), collate_fn=pad)
    for pool in ("avg", None):
        for out in (None, tmp_path / f"{pool}"):
            want = hookkit.extract(model, "layer", corpus, pool=pool, progress=False)
            got = hookkit.extract(model, "layer", bucketed, pool=pool, out=out, progress=False)
            np.testing.assert_array_equal(np.asarray(got["layer"]), np.asarray(want["layer"]))
            if pool == "avg":
                assert np.asarray(got["layer"])[:, 0].tolist() == list(range(64))
