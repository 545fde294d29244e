"""feature_grid / save_feature_grid: layout, per-channel scaling, channel selection, NaN handling, errors, PNGs,
and the feature-maps example."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _optional import importorskip_torchvision

# Feature grids are drawn by torchvision (pip install 'hookkit[torchvision]'): the whole file needs it.
torchvision = importorskip_torchvision()

from PIL import Image

import hookkit
from hookkit.extraction.grid import _VIRIDIS, feature_grid, save_feature_grid

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "feature_maps.py"


def expected_size(k: int, h: int, w: int, nrow: int, padding: int) -> tuple[int, int, int]:
    """make_grid's layout, worked out by hand: min(nrow, k) tiles per row, ceil(k / that) rows, ``padding`` pixels
    before every tile and after the last one; a single tile comes back alone."""
    if k == 1:
        return (3, h, w)
    cols = min(nrow, k)
    rows = math.ceil(k / cols)
    return (3, rows * (h + padding) + padding, cols * (w + padding) + padding)


def tile(grid: torch.Tensor, k: int, h: int, w: int, nrow: int, padding: int) -> torch.Tensor:
    """The k-th tile of a grid, cut out by position (row-major)."""
    r, c = divmod(k, nrow)
    y, x = padding + r * (h + padding), padding + c * (w + padding)
    return grid[:, y:y + h, x:x + w]


def read_png(path: Path) -> torch.Tensor:
    """A PNG as a uint8 tensor [3, H, W], read back with PIL."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def scaled(channel: torch.Tensor) -> torch.Tensor:
    lo, hi = channel.min(), channel.max()
    return (channel - lo) / (hi - lo)


# -- layout --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "c, h, w, nrow, padding",
    [(64, 7, 5, None, 1), (10, 8, 8, None, 1), (10, 8, 8, 3, 2), (5, 4, 6, 8, 0), (7, 3, 3, 1, 1), (2, 5, 5, None, 3),
     (1, 9, 4, None, 1)],
)
def test_output_size_is_make_grids_layout_for_the_tiles(c, h, w, nrow, padding):
    grid = feature_grid(torch.randn(2, c, h, w), nrow=nrow, padding=padding)
    n = nrow if nrow is not None else math.ceil(math.sqrt(c))
    assert grid.shape == expected_size(c, h, w, n, padding)
    assert grid.dtype == torch.float32


def test_default_nrow_is_ceil_sqrt_of_the_tile_count():
    grid = feature_grid(torch.randn(1, 10, 6, 6))  # 4 per row, 3 rows
    assert grid.shape == (3, 3 * 7 + 1, 4 * 7 + 1)
    grid = feature_grid(torch.randn(1, 64, 6, 6), channels=9)  # counts the tiles drawn, not the layer's channels
    assert grid.shape == (3, 3 * 7 + 1, 3 * 7 + 1)


def test_tiles_hold_the_scaled_channels_in_order_with_white_padding_between():
    act = torch.randn(3, 6, 5, 4)
    grid = feature_grid(act, sample=1, nrow=4, padding=2)
    for k in range(6):
        t = tile(grid, k, 5, 4, 4, 2)
        torch.testing.assert_close(t, scaled(act[1, k]).expand(3, -1, -1))
    mask = torch.ones(grid.shape[1:], dtype=torch.bool)
    for k in range(6):
        r, c = divmod(k, 4)
        mask[2 + r * 7:2 + r * 7 + 5, 2 + c * 6:2 + c * 6 + 4] = False
    assert (grid[:, mask] == 1).all()  # the gaps, and the unused 2 slots of the last row, are white


def test_matches_make_grid_of_the_scaled_channels():
    act = torch.randn(1, 11, 6, 7)
    tiles = torch.stack([scaled(ch) for ch in act[0]]).unsqueeze(1).expand(-1, 3, -1, -1)
    torch.testing.assert_close(feature_grid(act, nrow=5, padding=1),
                               torchvision.utils.make_grid(tiles, nrow=5, padding=1, pad_value=1.0))


# -- scaling -------------------------------------------------------------------------------------------------------
def test_each_channel_is_scaled_to_0_1_by_its_own_min_and_max():
    act = torch.zeros(1, 3, 4, 4)
    act[0, 0] = torch.linspace(5, 7, 16).view(4, 4)  # [5, 7]
    act[0, 1] = -1000 + 0.001 * torch.arange(16.0).view(4, 4)  # tiny range far from 0
    act[0, 2] = 3.0  # constant
    grid = feature_grid(act, nrow=3, padding=1)
    t0, t1, t2 = (tile(grid, k, 4, 4, 3, 1)[0] for k in range(3))
    torch.testing.assert_close(t0, (act[0, 0] - 5) / 2)
    assert t0.min() == 0 and t0.max() == 1  # exactly: the min and max land on the ends
    assert t0[1, 3] == pytest.approx((act[0, 0, 1, 3].item() - 5) / 2)
    assert t1.min() == 0 and t1.max() == 1
    exact = act[0, 1].double()
    torch.testing.assert_close(t1, ((exact - exact.min()) / (exact.max() - exact.min())).float())
    assert (t2 == 0).all()  # a constant map is 0, not NaN


def test_global_normalization_uses_one_range_for_all_tiles():
    act = torch.stack([torch.full((3, 3), 0.0), torch.full((3, 3), 5.0), torch.linspace(0, 10, 9).view(3, 3)])
    grid = feature_grid(act, normalize="global", nrow=3, padding=0)
    torch.testing.assert_close(grid[0], torch.cat([act[0], act[1], act[2]], dim=1) / 10)


def test_integer_and_half_inputs_are_drawn():
    act = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(1, 2, 4, 4)
    grid = feature_grid(act, padding=0, nrow=2)
    torch.testing.assert_close(grid[0, :, :4], torch.arange(16.0).view(4, 4) / 15)
    assert feature_grid(torch.randn(1, 4, 3, 3, dtype=torch.float16)).dtype == torch.float32


def test_a_3d_tensor_is_one_sample():
    act = torch.randn(4, 5, 6, 6)
    torch.testing.assert_close(feature_grid(act[2]), feature_grid(act, sample=2))
    torch.testing.assert_close(feature_grid(act, sample=-1), feature_grid(act, sample=3))


# -- channel selection ---------------------------------------------------------------------------------------------
def test_channels_int_draws_the_first_n():
    act = torch.randn(1, 10, 5, 5)
    grid = feature_grid(act, channels=4, nrow=4, padding=1)
    assert grid.shape == expected_size(4, 5, 5, 4, 1)
    for k in range(4):
        torch.testing.assert_close(tile(grid, k, 5, 5, 4, 1), scaled(act[0, k]).expand(3, -1, -1))
    assert feature_grid(act, channels=99).shape == feature_grid(act).shape  # at most what the layer has


@pytest.mark.parametrize("channels", [[7, 2, 9], (7, 2, 9), torch.tensor([7, 2, 9]), [-3, 2, -1]])
def test_channels_list_draws_exactly_those_in_the_order_given(channels):
    act = torch.randn(2, 10, 5, 5)
    grid = feature_grid(act, sample=1, channels=channels, nrow=3, padding=1)
    assert grid.shape == expected_size(3, 5, 5, 3, 1)
    for k, c in enumerate([7, 2, 9]):
        torch.testing.assert_close(tile(grid, k, 5, 5, 3, 1), scaled(act[1, c]).expand(3, -1, -1))


# -- colours -------------------------------------------------------------------------------------------------------
def test_grayscale_repeats_one_value_in_rgb_and_viridis_spans_its_table():
    act = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    gray = feature_grid(act)
    assert gray.shape == (3, 8, 8) and (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert torch.equal(feature_grid(act, cmap="gray"), gray)
    col = feature_grid(act, cmap="viridis")
    lut = torch.tensor(_VIRIDIS) / 255
    torch.testing.assert_close(col[:, 0, 0], lut[0])  # min -> dark purple
    torch.testing.assert_close(col[:, 7, 7], lut[-1])  # max -> yellow
    assert col.min() >= 0 and col.max() <= 1
    assert not torch.equal(col[0], col[1])  # a colour map, not gray


def test_viridis_table_is_matplotlibs():
    # The published 9-stop viridis palette (#440154 ... #fde725).
    hexes = ["440154", "472d7b", "3b528b", "2c728e", "21918c", "28ae80", "5ec962", "addc30", "fde725"]
    assert [tuple(bytes.fromhex(h)) for h in hexes] == list(_VIRIDIS)


# -- non-finite values ---------------------------------------------------------------------------------------------
def test_nan_and_inf_are_drawn_as_0_counted_in_a_warning_and_left_out_of_the_range():
    act = torch.linspace(5, 7, 16).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    act[0, 0, 0, 0] = float("nan")
    act[0, 0, 3, 3] = float("inf")
    act[0, 1, 2, 2] = float("-inf")
    act[0, 2] = float("nan")  # a channel with nothing finite
    with pytest.warns(RuntimeWarning, match=r"feature_grid: 19 of 48 values .* NaN or Inf") as record:
        grid = feature_grid(act, nrow=3, padding=1)
    assert record[0].filename == __file__  # stacklevel points at the caller
    assert not grid.isnan().any() and grid.min() >= 0 and grid.max() <= 1
    t0, t1, t2 = (tile(grid, k, 4, 4, 3, 1)[0] for k in range(3))
    assert t0[0, 0] == 0 and t0[3, 3] == 0 and t1[2, 2] == 0
    # min / max over the finite values only: t0's finite range is act[0, 0, 0, 1] .. act[0, 0, 3, 2]
    finite = act[0, 0, 0, 1].item(), act[0, 0, 3, 2].item()
    assert t0[0, 1] == 0 and t0[3, 2] == 1
    assert t0[1, 1] == pytest.approx((act[0, 0, 1, 1].item() - finite[0]) / (finite[1] - finite[0]), abs=1e-6)
    assert (t2 == 0).all()


def test_only_the_drawn_sample_and_channels_are_checked_for_nan():
    act = torch.randn(2, 4, 3, 3)
    act[1, 0, 0, 0] = float("nan")
    act[0, 3, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_grid(act, sample=0, channels=3)
    with pytest.warns(RuntimeWarning, match="1 of 36"):
        feature_grid(act, sample=1)


def test_huge_range_does_not_overflow():
    act = torch.tensor([[-3e38, 0.0], [1.0, 3e38]]).view(1, 1, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid = feature_grid(act)
    torch.testing.assert_close(grid[0], torch.tensor([[0.0, 0.5], [0.5, 1.0]]))


# -- tensors with grad, devices ------------------------------------------------------------------------------------
def test_detaches_and_leaves_the_input_and_grad_mode_alone():
    act = torch.randn(1, 4, 5, 5, requires_grad=True)
    before = act.detach().clone()
    grid = feature_grid(act)
    assert not grid.requires_grad and grid.grad_fn is None
    assert torch.is_grad_enabled()
    assert torch.equal(act.detach(), before)


def test_output_of_a_captured_conv_layer():
    model = torchvision.models.resnet18().eval()
    with hookkit.capture(model, ["conv1", "layer1"]) as cap:
        model(torch.randn(2, 3, 64, 64))
    grid = feature_grid(cap["conv1"], sample=1)
    assert grid.shape == expected_size(64, 32, 32, 8, 1)
    assert not grid.isnan().any() and grid.min() == 0 and grid.max() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_matches_cpu():
    act = torch.randn(2, 9, 7, 7)
    act[0, 1, 2, 2] = float("nan")
    with pytest.warns(RuntimeWarning):
        cpu = feature_grid(act, cmap="viridis")
    with pytest.warns(RuntimeWarning):
        gpu = feature_grid(act.cuda(), cmap="viridis")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9), nrow=st.integers(1, 8),
       padding=st.integers(0, 3), scale=st.floats(1e-3, 1e6))
def test_any_shape_gives_make_grids_size_and_values_in_0_1(c, h, w, nrow, padding, scale):
    act = torch.randn(1, c, h, w) * scale
    grid = feature_grid(act, nrow=nrow, padding=padding)
    assert grid.shape == expected_size(c, h, w, nrow, padding)
    assert grid.min() >= 0 and grid.max() <= 1 and not grid.isnan().any()


# -- errors --------------------------------------------------------------------------------------------------------
def test_not_a_tensor_is_a_type_error_naming_the_expected_shape():
    with pytest.raises(TypeError, match=r"\[N, C, H, W\].*got ndarray"):
        feature_grid(torch.randn(1, 2, 3, 3).numpy())
    with pytest.raises(TypeError, match=r"got tuple.*cap\[name\]\[0\]"):
        feature_grid((torch.randn(1, 2, 3, 3),))


@pytest.mark.parametrize("shape", [(8, 512), (5,), (1, 2, 3, 4, 5)])
def test_wrong_number_of_dimensions_names_the_shape_found_and_expected(shape):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*\[C, H, W\].*got shape " + re_shape(shape)):
        feature_grid(torch.randn(shape))


def re_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_linear_output_gets_a_hint():
    with pytest.raises(ValueError, match="no spatial maps"):
        feature_grid(torch.randn(8, 512))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"sample": 3}, ValueError, r"sample=3 is out of range for a batch of 3 .*valid samples: 0\.\.2"),
        ({"sample": -4}, ValueError, r"sample=-4 is out of range"),
        ({"sample": 1.0}, TypeError, r"sample must be an int, got float"),
        ({"sample": True}, TypeError, r"sample must be an int, got the bool"),
        ({"channels": [0, 5]}, ValueError, r"channel index 5 is out of range: the sample has 5 channels.*0\.\.4"),
        ({"channels": [-6]}, ValueError, r"channel index -6 is out of range"),
        ({"channels": []}, ValueError, r"channels=\[\] selects nothing"),
        ({"channels": 0}, ValueError, r"channels=0: ask for at least one channel"),
        ({"channels": "0,1"}, TypeError, r"channels must be None \(all\), an int"),
        ({"channels": [0.5]}, TypeError, r"each channel index must be an int"),
        ({"channels": torch.tensor([0.0])}, TypeError, r"1-D tensor of ints"),
        ({"nrow": 0}, ValueError, r"nrow=0"),
        ({"padding": -1}, ValueError, r"padding=-1"),
        ({"normalize": "batch"}, ValueError, r"normalize='batch': choose 'channel'.*'global'"),
        ({"cmap": "jet"}, ValueError, r"cmap='jet': choose None or 'gray'.*'viridis'"),
    ],
)
def test_bad_options_say_what_was_wrong(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        feature_grid(torch.randn(3, 5, 4, 4), **kwargs)


def test_a_single_sample_only_has_sample_0():
    with pytest.raises(ValueError, match=r"sample=1 is out of range: a \[C, H, W\] tensor .* holds one sample"):
        feature_grid(torch.randn(5, 4, 4), sample=1)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1, 0, 4, 4), (1, 3, 0, 4)])
def test_empty_tensors_are_value_errors(shape):
    with pytest.raises(ValueError):
        feature_grid(torch.zeros(shape))


def test_meta_and_complex_tensors_are_refused():
    with pytest.raises(ValueError, match="meta tensor"):
        feature_grid(torch.empty(1, 2, 3, 3, device="meta"))
    with pytest.raises(TypeError, match="complex64"):
        feature_grid(torch.randn(1, 2, 3, 3, dtype=torch.complex64))


# -- save_feature_grid ---------------------------------------------------------------------------------------------
def test_save_without_annotations_writes_the_grid_pixel_for_pixel_and_creates_folders(tmp_path):
    act = torch.randn(2, 6, 9, 7)
    target = tmp_path / "a" / "b" / "maps.png"
    path = save_feature_grid(act, target, sample=1, nrow=3, cmap="viridis", annotate=False)
    assert path == target and isinstance(path, Path) and path.is_file()
    grid = feature_grid(act, sample=1, nrow=3, cmap="viridis")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (grid.shape[2], grid.shape[1])  # PIL gives (width, height)
    pixels = read_png(path)
    assert pixels.shape == grid.shape and pixels.dtype == torch.uint8
    assert torch.equal(pixels, grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8))


def test_save_accepts_a_str_and_overwrites(tmp_path):
    target = str(tmp_path / "x.PNG")
    save_feature_grid(torch.randn(1, 4, 3, 3), target, annotate=False)
    path = save_feature_grid(torch.randn(1, 9, 3, 3), target, annotate=False)
    assert read_png(path).shape == expected_size(9, 3, 3, 3, 1)


@pytest.mark.parametrize("name", ["maps.jpg", "maps", "maps.png.txt"])
def test_save_refuses_other_formats_before_writing_anything(tmp_path, name):
    with pytest.raises(ValueError, match=r"writes PNG files.*ending in \.png"):
        save_feature_grid(torch.randn(1, 4, 3, 3), tmp_path / "new" / name)
    assert not (tmp_path / "new").exists()


def test_save_checks_the_activation_before_creating_folders(tmp_path):
    with pytest.raises(ValueError, match="got shape"):
        save_feature_grid(torch.randn(4, 8), tmp_path / "new" / "maps.png")
    assert not (tmp_path / "new").exists()
    with pytest.raises(TypeError, match="path must be a str or pathlib.Path"):
        save_feature_grid(torch.randn(1, 4, 3, 3), 42)


def test_save_warning_points_at_the_caller(tmp_path):
    act = torch.randn(1, 2, 3, 3)
    act[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 18") as record:
        save_feature_grid(act, tmp_path / "nan.png")
    assert record[0].filename == __file__


# -- the annotated picture: a title and the channel numbers ------------------------------------------------------------
@pytest.fixture
def drawn_text(monkeypatch):
    """Every text PIL draws, as (x, y, text), recorded while it is drawn."""
    from PIL import ImageDraw

    texts = []
    original = ImageDraw.ImageDraw.text

    def text(self, xy, content, *args, **kwargs):
        texts.append((xy[0], xy[1], content, kwargs.get("font")))
        return original(self, xy, content, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return texts


def test_save_draws_each_tiles_channel_number_above_it(tmp_path, drawn_text):
    act = torch.randn(2, 12, 20, 30)
    path = save_feature_grid(act, tmp_path / "maps.png", channels=[7, 2, -1, 0, 5], nrow=3, padding=1)
    numbers = [(x, y, text) for x, y, text, _ in drawn_text if text.isdigit()]
    assert [text for _, _, text in numbers] == ["7", "2", "11", "0", "5"]  # in the order drawn, -1 as 11
    xs = [x for x, _, _ in numbers]
    ys = [y for _, y, _ in numbers]
    assert xs[:3] == sorted(set(xs[:3])) and xs[3:] == xs[:2]  # 3 per row, the second row under the first
    assert ys[0] == ys[1] == ys[2] < ys[3] == ys[4]
    assert xs[1] - xs[0] == 2 * 30 + 2  # tiles under 48 pixels are enlarged by a whole factor (here 2), 2 apart
    assert path.is_file()
    assert all(font.size >= 10 for *_, text, font in drawn_text)  # readable


def test_save_has_a_title_naming_the_layer_and_what_it_shows(tmp_path, drawn_text):
    act = torch.randn(1, 64, 8, 8)
    save_feature_grid(act, tmp_path / "a.png", channels=16, title="layer1")
    title = " ".join(text for _, _, text, _ in drawn_text if not text.isdigit())
    assert title == "layer1: 16 of 64 channels of sample 0, each scaled to its own min / max"
    drawn_text.clear()
    save_feature_grid(act[:, :4], tmp_path / "b.png", normalize="global")
    title = " ".join(text for _, _, text, _ in drawn_text if not text.isdigit())
    assert title == "All 4 channels of sample 0, one scale for all tiles"
    assert min(font.size for _, _, text, font in drawn_text if not text.isdigit()) >= 12


def test_save_keeps_the_maps_pixels_below_their_numbers(tmp_path):
    act = torch.randn(1, 4, 50, 60)  # 50 x 60 tiles: no enlargement
    path = save_feature_grid(act, tmp_path / "m.png", nrow=2)
    pixels = read_png(path)
    grid = feature_grid(act, nrow=2, padding=0).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    first = grid[:, :50, :60]  # channel 0, as make_grid draws it
    found = [(y, x) for y in range(pixels.shape[1] - 49) for x in range(pixels.shape[2] - 59)
             if torch.equal(pixels[:, y:y + 50, x:x + 60], first)]
    assert len(found) == 1 and found[0][0] > 12  # once, under its title and its number


# -- the example ---------------------------------------------------------------------------------------------------
def test_feature_maps_example_writes_three_pngs(tmp_path):
    out = tmp_path / "fm"
    result = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(out)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    sizes = {}
    for name in ("input", "conv1", "layer1"):
        path = out / f"{name}.png"
        assert path.is_file() and str(path) in result.stdout
        with Image.open(path) as im:
            sizes[name] = im.size
    assert sizes["input"] == (224, 224)
    # 64 maps of 112 x 112 and of 56 x 56, 8 per row 2 pixels apart; a title and a strip of numbers per row on top
    assert sizes["conv1"][0] == 8 * 114 + 2 and sizes["conv1"][1] > 8 * 114 + 2
    assert sizes["layer1"][0] == 8 * 58 + 2 and sizes["layer1"][1] > 8 * 58 + 2
