"""Copy-on-write: a default capture holds what a module produced although a later in-place op overwrites it.

hookkit stores tensors without copying and copies a stored tensor (only the part a stored view covers) just before
an in-place op it sees writes into its storage; ``cap.copies`` counts those copies. A write it cannot see (here one
made under ``torch._C.DisableTorchFunction()``, standing in for a custom C++ kernel) still raises
``ModifiedInPlaceError`` on read. The reference is always a raw forward hook that clones at hook time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hookkit

from conftest import hook_census

MODES = {"no_grad": torch.no_grad, "grad": torch.enable_grad, "inference_mode": torch.inference_mode}
# Inference tensors keep no version counter, so a write hookkit cannot see could not be detected on read: under
# inference_mode a default capture copies each stored tensor at hook time (as clone=True) instead of on write, and
# cap.copies (copies made on write) stays 0. Values are the same in every mode.
EAGER = "inference_mode"


def _relu_inplace(h, x):
    F.relu(h, inplace=True)


def _relu_module(h, x):  # stands for ReLU(inplace=True) called from a custom forward (ResNet's BasicBlock)
    nn.ReLU(inplace=True)(h)


def _iadd(h, x):  # ResNet's `out += identity`
    h += x


def _add_(h, x):
    h.add_(x)


def _setitem(h, x):
    h[...] = -x


def _out(h, x):  # with grad enabled torch refuses out= on a tensor that requires grad: write into its detached alias
    torch.add(x, x, out=h.detach() if h.requires_grad else h)


def _through_view(h, x):
    h[:, 1:].mul_(-2)


def _through_data(h, x):  # .data shares the storage but not the version counter: only the mode can see this
    h.data.mul_(-3)


WRITES = {
    "F.relu(inplace=True)": _relu_inplace,
    "ReLU(inplace=True)": _relu_module,
    "out += identity": _iadd,
    "x.add_()": _add_,
    "x[...] = v": _setitem,
    "torch.add(out=)": _out,
    "write through a view": _through_view,
    "write through .data": _through_data,
}


class Writer(nn.Module):
    """``lin``'s output is written in place later in this (custom, hence watched) forward."""

    def __init__(self, write) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.write = write

    def forward(self, x):
        h = self.lin(x)
        self.write(h, x)
        return h


class Part(nn.Module):
    """Returns a view of its input: the first two columns."""

    def forward(self, h):
        return h[:, :2]


class ViewWriter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.part = Part()

    def forward(self, x):
        h = self.lin(x)
        self.part(h)
        h.mul_(-1)
        return h


class Hidden(nn.Module):
    """Writes into ``lin``'s output where no torch function mode can see it (as a custom C++ kernel would)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        with torch._C.DisableTorchFunction():
            h.add_(1)
        return h


class Unrelated(nn.Module):
    """In-place ops only on tensors no capture stores."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        z = h * 2
        z.add_(1)
        F.relu(z, inplace=True)
        z[0] = 0
        return z


class Boom(nn.Module):
    """Overwrites ``lin``'s output in place, then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h.add_(1)
        raise RuntimeError("boom after an in-place write")


def _reference(model: nn.Module, names: list[str]):
    """Raw forward hooks that clone at hook time: {name: [one clone per call]} and the handles to remove."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: got[n].append(o.detach().clone()))
               for n in names]
    return got, handles


def _run(model, names, mode, **options):
    """One forward of ``model`` in grad ``mode`` with a capture of ``names`` and the raw clone reference;
    checks the hook census and the torch function mode stack are as before. Returns (capture, reference, output)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    ref, handles = _reference(model, names)
    try:
        with MODES[mode](), hookkit.capture(model, names, **options) as cap:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    assert hook_census(model) == before
    assert torch._C._len_torch_function_stack() == depth
    return cap, ref, out


def _stored_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("write", WRITES)
def test_a_write_hookkit_sees_leaves_the_stored_value_as_the_module_produced_it(write, mode):
    model = Writer(WRITES[write])
    cap, ref, out = _run(model, ["lin"], mode)
    assert not torch.equal(out, ref["lin"][0]), "the write must change the tensor, or this test proves nothing"
    assert torch.equal(cap["lin"], ref["lin"][0])  # no ModifiedInPlaceError, the value at hook time
    assert cap.copies == (0 if mode == EAGER else 1)


@pytest.mark.parametrize("mode", MODES)
def test_a_write_into_an_unrelated_tensor_makes_no_copy(mode):
    cap, ref, _ = _run(Unrelated(), ["lin"], mode)
    assert torch.equal(cap["lin"], ref["lin"][0])
    assert cap.copies == 0


@pytest.mark.parametrize("mode", MODES)
def test_without_a_write_the_stored_tensor_is_the_module_output_itself(mode):
    model = Unrelated()
    live: list[torch.Tensor] = []
    handle = model.lin.register_forward_hook(lambda m, i, o: live.append(o))
    try:
        cap, ref, _ = _run(model, ["lin"], mode)
    finally:
        handle.remove()
    assert cap.copies == 0
    assert torch.equal(cap["lin"], ref["lin"][0])
    same = cap["lin"].untyped_storage().data_ptr() == live[0].untyped_storage().data_ptr()
    assert same == (mode != EAGER)  # stored, not copied (under inference_mode: copied at hook time)


@pytest.mark.parametrize("mode", MODES)
def test_a_stored_view_is_copied_only_in_the_part_it_covers(mode):
    cap, ref, out = _run(ViewWriter(), ["part"], mode)
    assert not torch.equal(out[:, :2], ref["part"][0]), "the write must change the view, or this proves nothing"
    part = cap["part"]
    assert torch.equal(part, ref["part"][0])
    assert cap.copies == (0 if mode == EAGER else 1)
    assert part.shape == (3, 2)
    assert _stored_bytes(part) == part.numel() * part.element_size()  # two columns, not the eight under them


@pytest.mark.parametrize("mode", MODES)
def test_a_stored_tensor_and_a_stored_view_of_it_both_hold_their_values(mode):
    cap, ref, out = _run(ViewWriter(), ["lin", "part"], mode)
    assert torch.equal(cap["lin"], ref["lin"][0])
    assert torch.equal(cap["part"], ref["part"][0])
    assert (cap.copies == 0) if mode == EAGER else (1 <= cap.copies <= 2)


@pytest.mark.parametrize("mode", MODES)
def test_a_write_hookkit_cannot_see_raises_modified_in_place_error_on_read_never_a_wrong_value(mode):
    cap, ref, out = _run(Hidden(), ["lin"], mode)
    assert torch.equal(out, ref["lin"][0] + 1)  # the write happened, unseen
    assert cap.copies == 0
    if mode == EAGER:  # copied at hook time: the unseen write could not reach it
        assert torch.equal(cap["lin"], ref["lin"][0])
        return
    with pytest.raises(hookkit.ModifiedInPlaceError):
        cap["lin"]
    with pytest.raises(hookkit.ModifiedInPlaceError):
        cap.calls("lin")


@pytest.mark.parametrize("mode", MODES)
def test_a_write_after_the_model_returned_is_not_watched_and_reading_says_so(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    ref, handles = _reference(model, ["0"])
    try:
        with MODES[mode](), hookkit.capture(model, ["0"]) as cap:
            model(x).add_(1)  # the user's own code, outside any forward
    finally:
        for h in handles:
            h.remove()
    assert hook_census(model) == before
    assert torch._C._len_torch_function_stack() == depth
    assert cap.copies == 0
    if mode == EAGER:
        assert torch.equal(cap["0"], ref["0"][0])
        return
    with pytest.raises(hookkit.ModifiedInPlaceError):
        cap["0"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [Hidden, lambda: Writer(_add_), Unrelated], ids=["unseen write", "add_", "no write"])
def test_clone_true_copies_everything_at_hook_time(make, mode):
    model = make()
    live: list[torch.Tensor] = []
    handle = model.lin.register_forward_hook(lambda m, i, o: live.append(o))
    try:
        cap, ref, _ = _run(model, ["lin"], mode, clone=True)
    finally:
        handle.remove()
    assert torch.equal(cap["lin"], ref["lin"][0])
    assert cap["lin"].untyped_storage().data_ptr() != live[0].untyped_storage().data_ptr()
    assert cap.copies == 0  # nothing left to copy on write


@pytest.mark.parametrize("mode", MODES)
def test_relu_inplace_in_a_sequential_is_seen(mode):
    """nn.Sequential's forward is torch.nn's own: the write happens inside ReLU(inplace=True)'s forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))
    cap, ref, _ = _run(model, ["0", "1", "2"], mode)
    assert (ref["0"][0] < 0).any(), "the ReLU must change something, or this test proves nothing"
    for name in ("0", "1", "2"):
        assert torch.equal(cap[name], ref[name][0]), name
    assert cap.copies == (0 if mode == EAGER else 1)


@pytest.mark.parametrize("mode", MODES)
def test_nested_default_captures_both_hold_the_value(mode):
    model = Writer(_relu_inplace)
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    ref, handles = _reference(model, ["lin"])
    try:
        with MODES[mode](), hookkit.capture(model, ["lin"]) as outer, hookkit.capture(model, ["lin"]) as inner:
            model(x)
    finally:
        for h in handles:
            h.remove()
    assert hook_census(model) == before
    assert torch._C._len_torch_function_stack() == depth
    assert torch.equal(outer["lin"], ref["lin"][0])
    assert torch.equal(inner["lin"], ref["lin"][0])


@pytest.mark.parametrize("mode", MODES)
def test_census_and_function_mode_stack_are_restored_when_the_forward_raises(mode):
    model = Boom()
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    ref, handles = _reference(model, ["lin"])
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with MODES[mode](), hookkit.capture(model, ["lin"]) as cap:
                model(x)
    finally:
        for h in handles:
            h.remove()
    assert hook_census(model) == before
    assert torch._C._len_torch_function_stack() == depth
    assert torch.equal(cap["lin"], ref["lin"][0])  # copied before the write, readable after the failure
    assert cap.copies == (0 if mode == EAGER else 1)
