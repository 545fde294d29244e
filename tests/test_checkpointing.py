"""Activation checkpointing recomputes forwards during backward: those are not new calls, and gradients still
pair with the original calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import hookkit

from conftest import hook_census


class Checkpointed(nn.Module):
    def __init__(self, use_checkpoint: bool) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.a = nn.Linear(4, 4)
        self.b = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.c = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        h = checkpoint(self.b, h, use_reentrant=False) if self.use_checkpoint else self.b(h)
        return self.c(h)


def test_recomputed_forwards_are_not_new_calls_and_grads_match_the_plain_model():
    model = Checkpointed(use_checkpoint=True)
    plain = copy.deepcopy(model)
    plain.use_checkpoint = False
    x = torch.randn(3, 4)
    names = ["a", "b", "b.0", "b.1", "b.2", "c"]
    before = hook_census(model)
    with hookkit.capture(model, names, grads=True, inputs=True) as cap:
        model(x).pow(2).sum().backward()
    with hookkit.capture(plain, names, grads=True, inputs=True) as ref:
        plain(x).pow(2).sum().backward()
    assert hook_census(model) == before
    for n in names:
        assert len(cap.calls(n)) == len(ref.calls(n)) == 1, n
        torch.testing.assert_close(cap[n], ref[n])
        torch.testing.assert_close(cap.grads[n], ref.grads[n])
        torch.testing.assert_close(cap.grad_inputs[n], ref.grad_inputs[n])


def test_trace_does_not_show_recomputation_as_forward_events():
    import io

    from rich.console import Console

    model = Checkpointed(use_checkpoint=True)
    with hookkit.trace(model, console=Console(file=io.StringIO())) as t:
        model(torch.randn(2, 4)).sum().backward()
    forwards = [e.name for e in t.events if e.kind == "forward"]
    assert forwards == ["a", "b.0", "b.1", "b.2", "b", "c"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reentrant_checkpointing_records_forward_values_once():
    """use_reentrant=True runs the original forward without a graph: values are recorded once; gradients inside the
    checkpointed block are not available then (the graph only exists during the recomputation)."""
    class Reentrant(Checkpointed):
        def forward(self, x):
            return self.c(checkpoint(self.b, self.a(x), use_reentrant=True))

    model = Reentrant(use_checkpoint=True)
    with hookkit.capture(model, ["b.0", "c"], grads=True) as cap:
        model(torch.randn(2, 4)).sum().backward()
    assert len(cap.calls("b.0")) == 1
    assert cap.grads["c"] is not None


# -- edits under checkpointing ---------------------------------------------------------------------------------------
class _Twice(nn.Module):
    """A block whose Linear runs twice per call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(torch.tanh(self.lin(x))))


class SharedBlock(nn.Module):
    """The same block called twice per forward, each call a checkpointed region: four calls of ``block.lin``, two
    in each region, recomputed in backward region by region (the last one first)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_reentrant: bool | None = None  # None: no checkpointing
        self.inp = nn.Linear(4, 4)
        self.block = _Twice()
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(2):
            h = self.block(h) if self.use_reentrant is None else checkpoint(self.block, h,
                                                                            use_reentrant=self.use_reentrant)
        return self.out(h)


def _grads_of(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    y = model(x)
    y.pow(2).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["add", "patch_capture", "ablate_mean"])
@pytest.mark.parametrize("call", [None, 0, 1, 2, 3])
def test_edits_apply_to_the_recomputation_as_to_the_forward_it_repeats(use_reentrant, kind, call):
    torch.manual_seed(0)
    plain = SharedBlock()
    model = copy.deepcopy(plain)
    model.use_reentrant = use_reentrant
    x, other = torch.randn(3, 4), torch.randn(3, 4)
    vector = torch.randn(4)
    with hookkit.capture(plain, ["block.lin"]) as clean:
        plain(other)
    clean_calls = clean.calls("block.lin")
    assert len(clean_calls) == 4

    # the reference: the same edit as a raw torch hook, on the model without checkpointing
    seen = [0]

    def raw(module, args, output):
        i = seen[0]
        seen[0] += 1
        if call is not None and i != call:
            return None
        if kind == "add":
            return output + vector
        if kind == "patch_capture":
            return output * 0 + clean_calls[i]  # keeps the graph, as the edit's clone-and-overwrite does
        return output * 0 + output.mean(dim=0, keepdim=True)

    handle = plain.block.lin.register_forward_hook(raw)
    try:
        want = _grads_of(plain, x)
    finally:
        handle.remove()

    edit = {"add": lambda: hookkit.add(vector, call=call), "patch_capture": lambda: hookkit.patch(clean, call=call),
            "ablate_mean": lambda: hookkit.ablate("mean", over=0, call=call)}[kind]()
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with hookkit.edits(model, {"block.lin": edit}) as ed:
        got = _grads_of(model, x)  # backward inside the block: the recomputation runs with the edit
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth
    assert ed.applied == {"block.lin": 4 if call is None else 1}  # each forward call once, none for recomputing
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")  # layer_names, no grad
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_an_edit_on_an_op_node_inside_a_checkpointed_block_is_refused(use_reentrant):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.lin(x) * 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Scaled()

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=use_reentrant)

    model = Net()
    assert "block.mul" in hookkit.layer_names(model, torch.randn(2, 4))
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with pytest.raises(hookkit.EditError, match=r"'block.mul'.*torch.utils.checkpoint"):
        with hookkit.edits(model, {"block.mul": hookkit.add(torch.ones(4))}):
            model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth
    with hookkit.edits(model, {"block.lin": hookkit.add(torch.ones(4))}) as ed:  # a module's output: applied
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert ed.applied == {"block.lin": 1}
    if not use_reentrant:  # without grad no backward follows (a reentrant region always runs without grad first)
        x = torch.randn(2, 4)
        with torch.no_grad(), hookkit.edits(model, {"block.mul": hookkit.add(torch.ones(4))}):
            got = model(x)
        with torch.no_grad():
            torch.testing.assert_close(got, torch.tanh(model.block.lin(x) * 2 + 1))
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_edits_on_a_hugging_face_model_with_gradient_checkpointing_equal_raw_hooks_without_it(use_reentrant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    plain = transformers.GPT2LMHeadModel(config).train()  # Hugging Face checkpoints only in training mode
    model = copy.deepcopy(plain)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:  # its name before transformers 5.24
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids, other = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))
    pos, vector = (slice(None), 3), torch.randn(16)
    # LayerNorm outputs, which the next Linear saves for backward: a recomputation without the edit would show
    with torch.no_grad(), hookkit.capture(plain, ["transformer.h.0.ln_1"]) as clean:
        plain(other, use_cache=False)

    def loss_and_grads(m):
        m.zero_grad()
        logits = m(ids, use_cache=False).logits
        logits.pow(2).sum().backward()  # (reentrant checkpointing refuses torch.autograd.grad)
        return logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    def patch_raw(module, args, output):
        edited = output.clone()
        edited[pos] = clean["transformer.h.0.ln_1"][pos]
        return edited

    handles = [plain.transformer.h[0].ln_1.register_forward_hook(patch_raw),
               plain.transformer.h[1].ln_2.register_forward_hook(lambda m, a, o: o + vector)]
    try:
        want, want_grads = loss_and_grads(plain)
    finally:
        for h in handles:
            h.remove()
    before, depth = hook_census(model), torch._C._len_torch_function_stack()
    with hookkit.edits(model, {"transformer.h.0.ln_1": hookkit.patch(clean, index=pos, call=0),
                               "transformer.h.1.ln_2": hookkit.add(vector)}) as ed:
        got, got_grads = loss_and_grads(model)
    assert hook_census(model) == before and torch._C._len_torch_function_stack() == depth
    assert ed.applied == {"transformer.h.0.ln_1": 1, "transformer.h.1.ln_2": 1}
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)


class _Outer(nn.Module):
    """A region holding two regions of the same block: checkpoints nested two deep."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Twice()
        self.use_reentrant: bool | None = None

    def forward(self, x):
        for _ in range(2):
            x = self.inner(x) if self.use_reentrant is None else checkpoint(self.inner, x,
                                                                            use_reentrant=self.use_reentrant)
        return x


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.outer = _Outer()
        self.head = nn.Linear(4, 1)
        self.use_reentrant: bool | None = None

    def forward(self, x):
        self.outer.use_reentrant = self.use_reentrant
        for _ in range(2):
            x = self.outer(x) if self.use_reentrant is None else checkpoint(self.outer, x,
                                                                            use_reentrant=self.use_reentrant)
        return self.head(x)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")  # the inner reentrant ones
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("call", [None, 2, 5])
def test_edits_in_nested_checkpoints_pair_each_recomputation_with_its_call(use_reentrant, call):
    torch.manual_seed(0)
    plain = Nested()
    model = copy.deepcopy(plain)
    model.use_reentrant = use_reentrant
    x, vector = torch.randn(3, 4), torch.randn(4)
    seen = [0]

    def raw(module, args, output):
        seen[0] += 1
        return output + vector if call is None or seen[0] - 1 == call else None

    handle = plain.outer.inner.lin.register_forward_hook(raw)
    try:
        want = _grads_of(plain, x)
    finally:
        handle.remove()
    assert seen == [8]  # 2 outer regions x 2 inner regions x 2 calls
    with hookkit.edits(model, {"outer.inner.lin": hookkit.add(vector, call=call)}) as ed:
        got = _grads_of(model, x)
    assert ed.applied == {"outer.inner.lin": 8 if call is None else 1}
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)
