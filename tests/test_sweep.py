"""patching_sweep: activation patching from a clean run into a corrupted one, layer x position, against raw hooks."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import hookkit
from hookkit import hook_census

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


class OneCell(nn.Module):
    """The answer depends on exactly one (layer, position): `b` at position 2. `a` runs beside it, unused."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):  # x: [batch, 5, 3]
        self.a(x)  # runs, and the answer does not depend on it
        return self.head(torch.tanh(self.b(x))[:, 2]).squeeze(-1)


def metric(out):
    return out.sum()


def one_cell():
    torch.manual_seed(0)
    return OneCell().eval()


def test_only_the_one_cell_the_answer_depends_on_lights_up():
    model = one_cell()
    clean, corrupt = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    before = hook_census(model)
    sweep = hookkit.patching_sweep(model, clean, corrupt, ["a", "b"], metric, positions=True)
    assert hook_census(model) == before
    assert sweep.layers == ["a", "b"] and sweep.positions == [0, 1, 2, 3, 4]
    assert sweep.clean != pytest.approx(sweep.corrupt)
    lit = (sweep.values - sweep.corrupt).abs() > 1e-9
    assert lit.nonzero().tolist() == [[1, 2]]
    assert sweep.values[1, 2] == pytest.approx(sweep.clean, abs=1e-6)  # patching that cell restores the answer
    torch.testing.assert_close(sweep.restored[1, 2], torch.tensor(1.0, dtype=torch.float64))


def test_clean_equal_to_corrupt_gives_the_clean_metric_everywhere():
    model = one_cell()
    x = torch.randn(2, 5, 3)
    sweep = hookkit.patching_sweep(model, x, x.clone(), ["a", "b"], metric, positions=[0, -1])
    torch.testing.assert_close(sweep.values, torch.full((2, 2), sweep.clean, dtype=torch.float64))
    assert sweep.positions == [0, 4]
    whole = hookkit.patching_sweep(model, x, x.clone(), ["a", "b", "head"], metric)
    torch.testing.assert_close(whole.values, torch.full((3, 1), whole.clean, dtype=torch.float64))


def test_each_cell_equals_the_patch_written_as_a_raw_hook_and_batching_changes_nothing():
    model = one_cell()
    clean, corrupt = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    with torch.no_grad():
        store = {}
        handle = model.b.register_forward_hook(lambda m, a, o: store.__setitem__("b", o.clone()))
        model(clean)
        handle.remove()
        want = torch.empty(5, dtype=torch.float64)
        for p in range(5):
            def patch(m, a, o, p=p):
                o = o.clone()
                o[:, p] = store["b"][:, p]
                return o
            handle = model.b.register_forward_hook(patch)
            want[p] = float(metric(model(corrupt)))
            handle.remove()
    one_by_one = hookkit.patching_sweep(model, clean, corrupt, ["b"], metric, positions=True, batch=1)
    batched = hookkit.patching_sweep(model, clean, corrupt, ["a", "b"], metric, positions=True, batch=7)
    torch.testing.assert_close(one_by_one.values[0], want)
    torch.testing.assert_close(batched.values[1], want)
    assert (one_by_one.forwards, batched.forwards) == (5, 2)  # 10 cells, 7 per forward


def test_whole_outputs_and_op_nodes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
    sweep = hookkit.patching_sweep(model, clean, corrupt, ["0", "1", "2"], lambda o: o[:, 0].mean())
    assert sweep.positions == [None]
    torch.testing.assert_close(sweep.values[:, 0], torch.full((3,), sweep.clean, dtype=torch.float64))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers: pip install 'hookkit[hf]'")
def test_gpt2_blocks_with_tuple_outputs_equal_the_raw_hook_patch():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                                 bos_token_id=0, eos_token_id=0)).eval()
    clean = torch.tensor([[1, 2, 3, 4, 5, 6]])
    corrupt = torch.tensor([[1, 2, 9, 4, 5, 6]])

    def logit_diff(out):
        return out.logits[0, -1, 7] - out.logits[0, -1, 8]

    before = hook_census(model)
    sweep = hookkit.patching_sweep(model, clean, corrupt, "transformer.h.*", logit_diff, positions=True, batch=8)
    assert hook_census(model) == before
    assert sweep.layers == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    with torch.no_grad():
        block = model.transformer.h[1]
        saved = {}
        first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731 - a tuple in older transformers
        handle = block.register_forward_hook(lambda m, a, o: saved.__setitem__("h", first(o).clone()))
        model(clean)
        handle.remove()

        def patch(m, a, o):
            h = first(o).clone()
            h[:, 2] = saved["h"][:, 2]
            return (h, *o[1:]) if isinstance(o, tuple) else h

        handle = block.register_forward_hook(patch)
        want = float(logit_diff(model(corrupt)))
        handle.remove()
    assert sweep.values[1, 2] == pytest.approx(want, abs=1e-5)
    # positions before the corrupted token see the same values in both runs: patching them changes nothing
    torch.testing.assert_close(sweep.values[:, :2], torch.full((3, 2), sweep.corrupt, dtype=torch.float64))
    # the last block at the last position carries everything the logits read
    assert sweep.values[2, 5] == pytest.approx(sweep.clean, abs=1e-5)


def test_bad_input_is_refused_before_anything_runs():
    model = one_cell()
    before = hook_census(model)
    x = torch.randn(1, 5, 3)
    with pytest.raises(hookkit.LayerNotFoundError):
        hookkit.patching_sweep(model, x, x, ["nope"], metric)
    with pytest.raises(ValueError, match="same shape|differ in shape"):
        hookkit.patching_sweep(model, x, torch.randn(1, 4, 3), ["b"], metric)
    with pytest.raises(ValueError, match="position 9 is outside the layers"):
        hookkit.patching_sweep(model, x, x, ["b"], metric, positions=[9])
    with pytest.raises(ValueError, match="batch=0"):
        hookkit.patching_sweep(model, x, x, ["b"], metric, batch=0)
    with pytest.raises(TypeError, match="one number"):
        hookkit.patching_sweep(model, x, x, ["b"], lambda out: out.expand(2))  # a [1] tensor is fine; [2] is not
    with pytest.raises(ValueError, match="'head' has 1 position"):
        hookkit.patching_sweep(model, x, x, ["b", "head"], metric, positions=True)
    assert hook_census(model) == before


def test_a_metric_that_raises_mid_sweep_leaves_no_hook():
    model = one_cell()
    calls = [0]

    def flaky(out):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("metric failed")
        return out.sum()

    before = hook_census(model)
    with pytest.raises(RuntimeError, match="metric failed"):
        hookkit.patching_sweep(model, torch.randn(2, 5, 3), torch.randn(2, 5, 3), ["a", "b"], flaky, positions=True)
    assert hook_census(model) == before


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib: pip install 'hookkit[plot]'")
def test_the_heatmap_png_and_the_rich_table(tmp_path):
    from rich.console import Console

    model = one_cell()
    sweep = hookkit.patching_sweep(model, torch.randn(1, 5, 3), torch.randn(1, 5, 3), ["a", "b"], metric,
                                   positions=True)
    png = sweep.save_png(tmp_path / "sweep.png", labels=list("abcde"))
    with pytest.raises(ValueError, match="too few"):
        sweep.save_png(tmp_path / "no.png", labels=["a"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=120)
    console.print(sweep)
    text = console.export_text()
    assert "layer" in text and f"{float(sweep.values[1, 2]):.3g}" in text and "patched forward" in text
    assert not math.isnan(float(sweep.restored[1, 2]))


class WithNorm(nn.Module):
    """Dropout and BatchNorm: in training mode a cell depends on the other copies of its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3, 1)

    def forward(self, x):  # x: [batch, 5, 3]
        return self.head(self.drop(self.bn(self.a(x)))[:, 2]).squeeze(-1)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_model_in_training_mode_is_refused_before_any_forward(frozen):
    torch.manual_seed(0)
    model = WithNorm().train()
    if frozen:
        model.bn.eval()  # BatchNorm frozen, Dropout still drawing masks: still refused
    clean, corrupt = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    forwards = [0]
    model.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with pytest.raises(hookkit.ArgumentError, match=r"training mode.*'drop' \(Dropout\).*model\.eval\(\)") as e:
        hookkit.patching_sweep(model, clean, corrupt, ["a", "bn"], metric, positions=True, batch=4)
    assert isinstance(e.value, ValueError)
    assert ("'bn' (BatchNorm1d)" in str(e.value)) is not frozen
    assert f"{5 if not frozen else 4} of its modules" in str(e.value)  # the model itself counts
    assert forwards == [0]  # nothing ran
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():  # running_mean, running_var, num_batches_tracked as they were
        assert torch.equal(v, buffers[k]), k
    assert model.training and model.bn.training is not frozen  # modes left as the user set them

    model.eval()  # the fix the message names: batching no longer changes a cell
    one = hookkit.patching_sweep(model, clean, corrupt, ["a", "bn"], metric, positions=True, batch=1)
    many = hookkit.patching_sweep(model, clean, corrupt, ["a", "bn"], metric, positions=True, batch=7)
    torch.testing.assert_close(one.values, many.values)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k


class InPlaceStatement(nn.Module):
    """``h.add_(1)`` as a statement: the model drops the op's returned value and goes on with ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x, by_hand=None):  # x: [batch, 5, 3]
        h = self.a(x)
        h.add_(1)
        if by_hand is not None:
            by_hand(h)
        return self.head(torch.tanh(h)).sum(1).squeeze(-1)


def test_a_sweep_on_an_in_place_op_node_patches_the_tensor_the_model_goes_on_with():
    torch.manual_seed(0)
    model = InPlaceStatement().eval()
    clean, corrupt = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    assert "add_" in hookkit.layer_names(model, clean)
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    whole = hookkit.patching_sweep(model, clean, corrupt, ["add_"], metric)
    cells = hookkit.patching_sweep(model, clean, corrupt, ["add_"], metric, positions=True, batch=3)
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth
    assert whole.values[0, 0].item() == pytest.approx(whole.clean)  # everything after add_ reads the patched h
    assert whole.clean != pytest.approx(whole.corrupt)
    with torch.no_grad():
        clean_h = model.a(clean) + 1
        for p in range(5):
            def write(h, p=p):
                h[:, p] = clean_h[:, p]
            assert cells.values[0, p].item() == pytest.approx(float(metric(model(corrupt, by_hand=write))))


# -- the heatmap's scale and labels ------------------------------------------------------------------------------------
def heatmap(values, clean=1.0, corrupt=0.0, n_pos=None, labels=None):
    """The figure ``save_png`` saves for a Sweep of ``values`` (restored = values when clean 1, corrupt 0)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    layers = [f"transformer.h.{i}.attn" for i in range(values.shape[0])]
    sweep = hookkit.Sweep(values, layers, list(range(values.shape[1])), clean, corrupt, 1, 1.0, 0.1)
    fig = sweep._figure(None, labels)
    (ax, bar_ax) = fig.axes
    return fig, ax, ax.get_images()[0]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib: pip install 'hookkit[plot]'")
def test_the_heatmap_draws_the_fraction_restored_on_a_fixed_0_to_1_scale_with_a_labelled_colour_bar():
    for values in ([[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.01], [0.02, 0.03]]):  # the scale does not follow the data
        fig, ax, image = heatmap([[0.0 + 10 * v for v in row] for row in values], clean=10.0, corrupt=0.0)
        assert image.norm.vmin == 0.0 and image.norm.vmax == 1.0
        assert np.asarray(image.get_array()) == pytest.approx(np.array(values))  # restored, not the metric
        bar = image.colorbar
        assert bar is not None and bar.ax.get_ylabel() == "fraction of the clean-vs-corrupt gap restored"
        assert bar.extend == "neither"
    # red restores: 1 is the reddest colour of the map, 0 is (near) white
    r, g, b, _ = image.cmap(1.0)
    assert r > 0.35 and g < 0.1 and b < 0.1
    assert min(image.cmap(0.0)[:3]) > 0.9


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib: pip install 'hookkit[plot]'")
@pytest.mark.parametrize(("values", "extend", "said"), [
    ([[-0.5, 0.5]], "min", "1 cell(s) below 0 (blue; lowest -0.5)"),
    ([[1.5, 0.5]], "max", "1 cell(s) above 1 (purple; highest 1.5)"),
    ([[1.5, -0.25]], "both", "below 0"),
])
def test_values_outside_0_1_get_an_arrow_on_the_colour_bar_and_are_counted_in_the_title(values, extend, said):
    fig, ax, image = heatmap(values)
    assert image.colorbar.extend == extend
    assert said in ax.get_title()
    under, over = image.cmap.get_under(), image.cmap.get_over()
    assert tuple(under) != tuple(image.cmap(0.0)) and tuple(over) != tuple(image.cmap(1.0))  # not silently 0 or 1


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib: pip install 'hookkit[plot]'")
def test_float_noise_just_outside_0_1_is_drawn_at_the_end_without_a_flag():
    fig, ax, image = heatmap([[-0.009, 1.004, 0.5]])
    assert image.colorbar.extend == "neither" and "cell(s)" not in ax.get_title()
    assert np.asarray(image.get_array()) == pytest.approx(np.array([[0.0, 1.0, 0.5]]))
    fig, ax, image = heatmap([[-0.02, 0.5]])
    assert image.colorbar.extend == "min" and "lowest -0.02" in ax.get_title()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib: pip install 'hookkit[plot]'")
def test_clean_equal_to_corrupt_is_said_in_the_heatmap_title():
    fig, ax, image = heatmap([[1.0, 1.0]], clean=1.0, corrupt=1.0)
    assert "no gap to restore" in ax.get_title()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib: pip install 'hookkit[plot]'")
@pytest.mark.parametrize(("n_layers", "n_pos"), [(2, 3), (48, 30)])
def test_heatmap_labels_keep_a_readable_size_on_any_grid(n_layers, n_pos):
    fig, ax, image = heatmap(torch.rand(n_layers, n_pos), labels=[f"tok{i}" for i in range(n_pos)])
    ticks = ax.get_yticklabels() + ax.get_xticklabels()
    assert len(ax.get_yticklabels()) == n_layers and len(ax.get_xticklabels()) == n_pos
    assert all(t.get_fontsize() >= 9 for t in ticks)
    assert ax.title.get_fontsize() >= 10 and ax.xaxis.label.get_fontsize() >= 10
    width, height = fig.get_size_inches()
    # each row and column gets at least about a line of its labels' height
    assert height / n_layers >= 0.2 or height >= 50 and width / n_pos >= 0.3
