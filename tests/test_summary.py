"""hookkit.summary(): one forward pass, one row per module call, compared with raw torch hooks; hooks come off."""

from __future__ import annotations

import dataclasses
import gc
import io
import weakref

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

import hookkit
from hookkit import Summary, SummaryError, SummaryRow, summary
from hookkit.core.stats import describe

from _optional import needs_torchvision, torchvision
from conftest import NestedOutputs, SharedReLU, hook_census


# -- raw torch hooks: what summary() must agree with --------------------------------------------------------------
def raw_calls(model: nn.Module, *inputs, **kwargs) -> list[dict]:
    """Every submodule call in start order, with its output seen by a plain forward hook (stats taken right away,
    before any later in-place op)."""
    calls: list[dict] = []
    stack: list[dict] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(mod, args, name=name):
            call = {"name": name, "module": mod}
            calls.append(call)
            stack.append(call)

        def post(mod, args, output):
            call = stack.pop()
            assert call["module"] is mod
            tensors = [output] if isinstance(output, torch.Tensor) else hookkit.core.tree.leaves(output)
            call["shapes"] = tuple(tuple(t.shape) for t in tensors)
            call["text"] = describe(output, stats=False)
            first = tensors[0].detach().double() if tensors else None
            call["mean"] = None if first is None else first.mean().item()
            call["min"] = None if first is None else first.min().item()
            call["max"] = None if first is None else first.max().item()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def render(s: Summary, width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(s)
    return out.getvalue()


class SmallConvNet(nn.Module):
    """The golden file's model: a conv, a block of two, a shared activation, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.act(self.block(x))
        return self.head(self.pool(x).flatten(1))


class Mismatch(nn.Module):
    """Its head expects 5 features and gets 4: the forward fails in ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.act(self.stem(x)))


class Tied(nn.Module):
    """A decoder that shares its weight with the encoder: the parameter counts once."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4, bias=False)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(self.enc(x))


# -- what the rows hold ---------------------------------------------------------------------------------------------
@needs_torchvision
def test_rows_match_raw_forward_hooks_on_every_resnet18_module():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    raw = raw_calls(model, x)
    s = summary(model, x)

    assert [(r.layer, r.class_name) for r in s.rows] == [(c["name"], type(c["module"]).__name__) for c in raw]
    assert {r.layer for r in s.rows} == {n for n, _ in model.named_modules() if n}  # every module has a row
    for row, call in zip(s.rows, raw, strict=True):
        assert row.output_shapes == call["shapes"], row.name
        assert row.output == call["text"], row.name
        assert row.depth == row.layer.count(".") + 1
        assert row.mean == pytest.approx(call["mean"], rel=1e-4, abs=1e-6), row.name
        assert (row.min, row.max) == pytest.approx((call["min"], call["max"]), rel=1e-5, abs=1e-6), row.name
    assert s.output == "f32[2, 1000]" and s.output_shapes == ((2, 1000),)


@needs_torchvision
def test_param_counts_are_numel_sums_of_each_module_with_shared_parameters_once():
    model = torchvision.models.resnet18().eval()
    model.conv1.requires_grad_(False)
    model.layer1[0].bn1.weight.requires_grad_(False)
    s = summary(model, torch.randn(1, 3, 32, 32))
    for row in s.rows:
        module = model.get_submodule(row.layer)
        assert row.params == sum(p.numel() for p in module.parameters()), row.name
        assert row.trainable == sum(p.numel() for p in module.parameters() if p.requires_grad), row.name
    params = list(model.parameters())
    assert s.total_params == sum(p.numel() for p in params)
    assert s.trainable_params == s.total_params - model.conv1.weight.numel() - 64
    assert s.param_bytes == 4 * s.total_params

    tied = summary(Tied(), torch.randn(1, 4))
    assert tied.total_params == 16 + 4  # the shared weight once, plus the decoder's bias
    assert [r.params for r in tied.rows] == [16, 20]


def test_a_module_called_three_times_gets_three_rows_in_call_order():
    model = SharedReLU()
    x = torch.randn(3, 6)
    raw = raw_calls(model, x)
    s = summary(model, x)
    # each call named as layer_names and capture name it (FX's numbering within one forward)
    assert [r.name for r in s.rows] == ["fc1", "relu", "fc2", "relu_1", "relu_2", "head"]
    assert {"relu", "relu_1", "relu_2"} <= set(hookkit.layer_names(model, x))
    relu_rows = [r for r in s.rows if r.layer == "relu"]
    assert [r.call for r in relu_rows] == [1, 2, 3]
    raw_relu = [c for c in raw if c["name"] == "relu"]
    assert [r.mean for r in relu_rows] == pytest.approx([c["mean"] for c in raw_relu], rel=1e-5)
    assert len({r.mean for r in relu_rows}) == 3  # three different calls, not the last one three times
    assert "relu_2" in str(s)


def test_nested_outputs_show_every_tensor_shape_and_none():
    model = NestedOutputs()
    x = torch.randn(2, 4)
    raw = {c["name"]: c for c in raw_calls(model, x)}
    s = summary(model, x)
    by_name = {r.name: r for r in s.rows}
    assert by_name["tup"].output == "(f32[2, 4], None, f32[2, 4])"
    for name, row in by_name.items():
        assert row.output == raw[name]["text"], name
        assert row.output_shapes == raw[name]["shapes"], name
    assert by_name["dict"].output_shapes == ((2, 4), (2, 4), (2, 4))
    for name, row in by_name.items():  # statistics are of the first tensor of each output
        assert row.mean == pytest.approx(raw[name]["mean"], rel=1e-5), name
    assert by_name["tup"].min == pytest.approx(raw["lin"]["min"] * 2, rel=1e-5)  # x * 2, not x + 1


@needs_torchvision
def test_indentation_is_relative_to_the_shallowest_row_shown():
    model = torchvision.models.resnet18().eval()
    s = summary(model, torch.randn(1, 3, 32, 32), layers=["layer1.0", "layer1.0.*"], timing=False)
    first, *rest = str(s).splitlines()[2:2 + len(s.rows)]
    assert first.startswith("layer1.0 ")
    assert rest and all(line.startswith("  layer1.0.") for line in rest)


def test_forward_kwargs_reach_the_model_which_runs_under_no_grad():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.out = nn.Identity()

        def forward(self, x, *, scale=1.0):
            return self.out(self.fc(x) * scale)

    model = Scaled()
    x = torch.randn(4, 2)
    seen = []
    model.fc.register_forward_pre_hook(lambda *a: seen.append(torch.is_grad_enabled()))
    plain, scaled = summary(model, x, timing=False), summary(model, x, scale=-2.0, timing=False)
    assert scaled.rows[1].mean == pytest.approx(-2 * plain.rows[1].mean, rel=1e-5)
    assert summary(model, x=x, timing=False).rows == plain.rows
    assert seen == [False, False, False]


def test_nan_and_inf_counts_of_a_model_that_produces_them():
    class Log(nn.Module):
        def forward(self, x):
            return x.log()

    model = nn.Sequential(nn.Identity(), Log())
    x = torch.tensor([[-1.0, 0.0, 1.0, 2.0, -3.0]])  # log: nan, -inf, 0, 0.69, nan
    s = summary(model, x, timing=False)
    ident, log = s.rows
    assert (ident.nan, ident.inf) == (0, 0)
    assert (log.nan, log.inf) == (int(torch.isnan(x.log()).sum()), int(torch.isinf(x.log()).sum())) == (2, 1)
    assert log.min == 0.0 and log.max == pytest.approx(torch.tensor(2.0).log().item())  # of the finite values
    text = str(s)
    assert "Non-finite" in text and "2 NaN 1 Inf" in text
    assert "1 with NaN/Inf (first: 1)" in text

    finite = str(summary(nn.Sequential(nn.Linear(2, 2)), torch.ones(1, 2), timing=False))
    assert "Non-finite" not in finite and "no NaN/Inf" in finite


# -- the model is left as it was ------------------------------------------------------------------------------------
@needs_torchvision
def test_hooks_come_off_and_user_hooks_survive():
    model = torchvision.models.resnet18().eval()
    mine = [model.layer1.register_forward_hook(lambda *a: None), model.register_forward_pre_hook(lambda *a: None)]
    before = hook_census(model)
    summary(model, torch.randn(1, 3, 32, 32))
    assert hook_census(model) == before
    summary(model, torch.randn(1, 3, 32, 32), layers=["layer1", nn.Conv2d])
    assert hook_census(model) == before
    for h in mine:
        h.remove()


def test_failed_forward_raises_summary_error_naming_the_module_and_removes_hooks():
    model = Mismatch()
    before = hook_census(model)
    with pytest.raises(SummaryError) as info:
        summary(model, torch.randn(2, 3))
    assert hook_census(model) == before
    err = info.value
    assert isinstance(err, hookkit.HookkitError) and isinstance(err, RuntimeError)
    assert isinstance(err.__cause__, RuntimeError) and not isinstance(err.__cause__, SummaryError)
    message = str(err)
    assert message.startswith("forward failed in head (Linear): RuntimeError: ")
    assert str(err.__cause__) in message
    assert message.endswith("; layers executed before: stem, act")


def test_failure_inside_a_nested_module_names_the_innermost_and_keeps_only_finished_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Linear(5, 2)))
    before = hook_census(model)
    with pytest.raises(SummaryError, match=r"forward failed in 1\.1 \(Linear\): .*; layers executed before: 0, 1\.0$"):
        summary(model, torch.randn(2, 3))
    assert hook_census(model) == before


def test_failure_in_the_root_forward_and_a_long_history():
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            raise ValueError("bad head")

    with pytest.raises(SummaryError) as info:
        summary(Late(), torch.randn(1, 2))
    message = str(info.value)
    assert message.startswith("forward failed in <root> (Late")
    assert "ValueError: bad head" in message
    assert message.endswith("layers executed before: …, layers.3, layers.4, layers.5, layers.6, layers.7")
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_training_flag_and_grad_mode_are_unchanged(train, grad):
    model = SmallConvNet().train(train)
    flags = {n: m.training for n, m in model.named_modules()}
    with torch.set_grad_enabled(grad):
        summary(model, torch.randn(2, 1, 8, 8))
        assert torch.is_grad_enabled() is grad
        with pytest.raises(SummaryError):
            summary(Mismatch().train(train), torch.randn(2, 3))
        assert torch.is_grad_enabled() is grad
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_train_mode_batchnorm_statistics_are_put_back():
    model = SmallConvNet().train()
    bn = model.block[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = summary(model, torch.randn(4, 1, 8, 8) * 3 + 1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a buffer or parameter changed"
    assert after["block.1.num_batches_tracked"].item() == 0
    row = next(r for r in s.rows if r.layer == "block.1")
    assert row.mean == pytest.approx(0.0, abs=1e-5)  # train mode normalised with the batch's own statistics
    assert bn.training


def test_summary_keeps_no_tensor_and_not_the_model():
    model = SmallConvNet()
    s = summary(model, torch.randn(1, 1, 8, 8))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None

    def no_tensor(value) -> bool:
        if isinstance(value, (torch.Tensor, nn.Module)):
            return False
        if isinstance(value, (list, tuple)):
            return all(no_tensor(v) for v in value)
        if dataclasses.is_dataclass(value):
            return all(no_tensor(getattr(value, f.name)) for f in dataclasses.fields(value))
        return isinstance(value, (str, int, float, type(None)))

    assert no_tensor(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rows[0].params = 0  # type: ignore[misc]


# -- what it refuses ------------------------------------------------------------------------------------------------
@needs_torchvision
def test_bad_layer_name_raises_lookup_error_before_any_hook():
    model = torchvision.models.resnet18().eval()
    before = hook_census(model)
    with pytest.raises(LookupError, match=r"no layer 'layer9' in ResNet\..*Did you mean"):
        summary(model, torch.randn(1, 3, 32, 32), layers=["conv1", "layer9"])
    assert hook_census(model) == before


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_and_bad_depth_are_refused():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(hookkit.UnsupportedModelError):
        summary(scripted, torch.randn(1, 2))
    with pytest.raises(ValueError, match="depth"):
        summary(nn.Linear(2, 2), torch.randn(1, 2), depth=0)


@needs_torchvision
def test_layers_limit_the_rows_to_the_selection():
    model = torchvision.models.resnet18().eval()
    s = summary(model, torch.randn(1, 3, 32, 32), layers=["layer1.*", "fc"])
    assert [r.name for r in s.rows] == ["layer1.0", "layer1.1", "fc"]
    assert s.total_params == sum(p.numel() for p in model.parameters())  # totals stay the model's


def test_a_data_parallel_wrapper_is_seen_through_with_the_rows_of_the_model_inside():
    model = SmallConvNet().eval()
    x = torch.randn(2, 1, 8, 8)
    bare = summary(model, x, timing=False)
    wrapped = summary(nn.DataParallel(model), x, timing=False)  # (on CPU DataParallel calls the model itself)
    assert [r.name for r in wrapped.rows] == [r.name for r in bare.rows] == ["stem", "act", "block", "block.0",
                                                                            "block.1", "act_1", "pool", "head"]
    assert wrapped.rows == bare.rows
    with pytest.raises(SummaryError, match=r"^forward failed in head \(Linear\): "):
        summary(nn.DataParallel(Mismatch()), torch.randn(2, 3))


def test_a_module_selected_by_its_second_name_gets_rows_of_that_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model.add_module("again", model[1])  # the same ReLU under "1" and "again"
    s = summary(model, torch.randn(1, 3), layers=["again"], timing=False)
    assert [(r.name, r.layer, r.call) for r in s.rows] == [("again", "again", 1), ("again_1", "again", 2)]


# -- time --------------------------------------------------------------------------------------------------------
@needs_torchvision
def test_time_includes_children_and_is_off_with_timing_false():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    s = summary(model, x)
    assert all(r.time_ms is not None and r.time_ms >= 0 for r in s.rows)
    for parent in s.rows:
        children = [r for r in s.rows if r.layer.rpartition(".")[0] == parent.layer]
        if children:
            assert parent.time_ms >= sum(r.time_ms for r in children) - 1e-6, parent.name
    assert s.time_ms is not None and s.time_ms >= sum(r.time_ms for r in s.rows if r.depth == 1) - 1e-6
    assert "Time (ms)" in str(s)

    quiet = summary(model, x, timing=False)
    assert quiet.time_ms is None and all(r.time_ms is None for r in quiet.rows)
    assert "Time" not in str(quiet) and " ms" not in str(quiet)


# -- rendering ----------------------------------------------------------------------------------------------------
def test_small_convnet_render_matches_golden(golden):
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    x = torch.randn(1, 1, 8, 8)
    s = summary(model, x, timing=False)
    assert [r.name for r in s.rows] == ["stem", "act", "block", "block.0", "block.1", "act_1", "pool", "head"]
    golden("summary_small.txt", str(s) + "\n")


@needs_torchvision
@pytest.mark.slow
def test_resnet50_table_fits_120_columns_with_one_line_per_module_call():
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    n_calls = len(raw_calls(model, x))
    s = summary(model, x)
    assert len(s.rows) == n_calls
    for text in (render(s), str(s)):
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 120
        assert len(lines) == 2 + n_calls + 1  # header and rule, a line per call (nothing wrapped), the footer
        assert lines[0].split() == ["Layer", "Class", "Output", "shape", "Params", "Mean", "Std", "Min", "Max",
                                    "Time", "(ms)"]
        # Names, shapes and numbers are shown whole; only a long class name gives way (AdaptiveAvgPool2d).
        for row, line in zip(s.rows, lines[2:], strict=False):  # the table has more lines (its footer) than rows
            name, cls = line.split()[:2]
            assert name == row.name
            assert cls == row.class_name or (cls.endswith("…") and row.class_name.startswith(cls[:-1]))
            assert f"  {row.output}  " in line and f"  {row.params:,}  " in line
        assert sum("…" in line for line in lines) <= 1


@needs_torchvision
def test_depth_shows_only_shallow_rows_but_keeps_every_row():
    model = torchvision.models.resnet18().eval()
    s = summary(model, torch.randn(1, 3, 32, 32), depth=1, timing=False)
    top = [n for n, _ in model.named_children()]
    assert [r.name for r in s.shown_rows] == top
    assert len(s.rows) > len(top)
    lines = str(s).splitlines()
    assert len(lines) == 2 + len(top) + 1
    assert f"{len(s.rows)} module calls ({len(top)} shown, depth <= 1)" in lines[-1]
    deeper = dataclasses.replace(s, depth=2)
    assert len(str(deeper).splitlines()) == 2 + sum(r.depth <= 2 for r in s.rows) + 1


def test_long_layer_names_keep_their_first_and_last_parts():
    inner: nn.Module = nn.Linear(2, 2)
    for name in ("out_proj", "self_attn", "11", "layers", "encoder", "model"):
        inner = _Wrap(name, inner)
    s = summary(inner, torch.randn(1, 2), timing=False)
    assert s.rows[-1].name == "model.encoder.layers.11.self_attn.out_proj"  # 42 characters
    shown = str(s).splitlines()[2 + len(s.rows) - 1].split()[0]
    assert shown == "model.….layers.11.self_attn.out_proj"
    assert str(s).splitlines()[2 + len(s.rows) - 2].split()[0] == "model.encoder.layers.11.self_attn"
    # On a narrow console the names give way before the numbers, still ending with the part that tells them apart.
    lines = render(s, 80).splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line.split() for line in lines[2:2 + len(s.rows)]]
    assert [cells[0] for cells in rows][:2] == ["model", "model.encoder"]
    assert rows[-1][0].startswith("…") and rows[-1][0].endswith(".out_proj")
    assert all(cells[-4:] == rows[0][-4:] for cells in rows)  # mean, std, min, max shown whole on every row


class _Wrap(nn.Module):
    def __init__(self, name: str, inner: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, inner)

    def forward(self, x):
        return getattr(self, self.name)(x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(min_value=40, max_value=200))
def test_rendered_lines_never_exceed_the_console_width(width):
    model = nn.Sequential(SmallConvNet(), nn.Softmax(dim=-1))
    s = summary(model, torch.randn(1, 1, 8, 8))
    assert max(len(line) for line in render(s, width).splitlines()) <= width


def test_str_is_plain_text_and_repr_is_one_line():
    s = summary(SharedReLU(), torch.randn(1, 6), timing=False)
    text = str(s)
    assert "\x1b[" not in text and text == text.rstrip()
    assert text.splitlines()[-1].startswith("SharedReLU: 98 params")
    assert repr(s) == "<hookkit.Summary of SharedReLU: 6 module calls, 98 params, output f32[1, 2]>"
    assert isinstance(s.rows[0], SummaryRow)
